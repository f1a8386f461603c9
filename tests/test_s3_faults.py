"""What a real S3 server (SeaweedFS) can do to a run: go away during a checkpoint upload, reject keys, deny writes."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest

import seaweed
from helpers import ROOT, free_port, invoke, prepared_run, s3_environment, seaweed_server, tiny
from kantai_batch import lease, s3
from kantai_batch.manifest import MARKER, file_sha256

pytestmark = pytest.mark.slow

BUCKET = "kantai-outage"
RUN = "runs/outage"
CHECKPOINTS = f"{RUN}/checkpoints"
# Four checkpoints; two kept. Small enough to train twice within a couple of CPU minutes.
JOB = tiny("train.max_steps=200", "train.save_steps=50", "train.logging_steps=50")


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[seaweed.SeaweedS3]:
    """A server of this test's own, since the test stops and restarts it; boto3's environment points at it."""
    server = seaweed_server(tmp_path / "seaweedfs")
    try:
        with s3_environment(server.endpoint):
            yield server
    finally:
        server.stop(grace_s=0)


def _keys(prefix: str, bucket: str = BUCKET) -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


def _complete_checkpoints() -> list[int]:
    return sorted(int(key.split("/")[0].split("-")[1]) for key in _keys(f"{CHECKPOINTS}/") if key.endswith(MARKER))


def _pretrain(cache: Path, tmp_path: Path, **env: str) -> subprocess.Popen:
    """``pretrain`` as its own process (a pod), with its own local disk.

    A pod that stops while the store is down cannot release its lease: the next waits a term for it,
    10 s here rather than the default minute."""
    return subprocess.Popen(
        [sys.executable, "-m", "kantai_batch", "pretrain", "--run-dir", f"s3://{BUCKET}/{RUN}", "--no-tracking", *JOB],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "KANTAI_CACHE_DIR": str(cache),
            lease.TERM_ENV: "10",
            **env,
        },  # fmt: skip
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"pretrain exited {proc.returncode} before {what}:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def _local_checkpoint(cache: Path, step: int) -> Path:
    return cache / "runs" / BUCKET / CHECKPOINTS / f"checkpoint-{step}"


def _assert_intact(step: int, tmp_path: Path) -> None:
    """Every file the checkpoint's manifest lists is in S3 with the size and SHA-256 it records."""
    client = boto3.client("s3")
    prefix = f"{CHECKPOINTS}/checkpoint-{step}"
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/{MARKER}")["Body"].read())
    assert manifest["files"], "an empty manifest"
    for name, expected in manifest["files"].items():
        local = tmp_path / "verify" / str(step) / name
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"{prefix}/{name}", str(local))
        assert file_sha256(local) == expected["sha256"], name


def test_s3_outage_during_checkpoint_uploads(own_s3, corpus_file: Path, tmp_path: Path):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    boto3.client("s3").upload_file(str(corpus_file), BUCKET, "corpora/kantian.txt")
    run_dir = f"s3://{BUCKET}/{RUN}"
    invoke("prepare", "--run-dir", run_dir, "--corpus", f"s3://{BUCKET}/corpora/kantian.txt")
    invoke("train-tokenizer", "--run-dir", run_dir, *JOB)
    invoke("tokenize", "--run-dir", run_dir, *JOB)

    # 1. The server is killed the moment checkpoint-100 is marked locally, i.e. as its upload starts,
    # and stays down: the upload fails after the client's bounded retries (the defaults: 10 attempts,
    # at most 26 s of waiting for refused connections) and training stops with one line, exit 4.
    first = tmp_path / "pod-1"
    proc = _pretrain(first, tmp_path)
    _wait(lambda: (_local_checkpoint(first, 100) / MARKER).exists(), proc, "checkpoint-100 marked locally")
    own_s3.stop(grace_s=0)
    down = time.monotonic()
    _, stderr = proc.communicate(timeout=240)
    print(f"pretrain exited {proc.returncode}, {time.monotonic() - down:.1f} s after the server was killed")
    own_s3.start()
    assert proc.returncode == 4, stderr
    # The line may follow the Trainer's progress bar, which ends without a newline.
    errors = [
        line[line.index("kantai-batch: error:") :] for line in stderr.splitlines() if "kantai-batch: error:" in line
    ]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    last = errors[0]
    prefix = f"kantai-batch: error: checkpoint s3://{BUCKET}/{CHECKPOINTS}/checkpoint-"
    assert last.startswith(prefix) and " was not committed (" in last and "resumes from it" in last, last
    failed = int(last[len(prefix) :].split(" ")[0])
    # Usually 100; 150 when the upload of 100 beat the kill (the server then went down before 150).
    assert failed in (100, 150), last
    print(last)  # for the record: what a user sees
    complete = _complete_checkpoints()
    assert complete and complete[-1] == failed - 50, "the checkpoint before the failed one is the newest complete"
    assert f"checkpoint-{failed}/{MARKER}" not in _keys(f"{CHECKPOINTS}/")
    _assert_intact(complete[-1], tmp_path)
    assert not _keys(f"{RUN}/model/"), "no model from a stopped training"

    # 2. A new pod resumes from it. This time the store goes away as an upload is about to start and
    # comes straight back: with retries that surely outlast a restart of a few seconds
    # (AWS_MAX_ATTEMPTS=20: the last 11 waits are up to 20 s each) training goes on.
    second = tmp_path / "pod-2"
    proc = _pretrain(second, tmp_path, AWS_MAX_ATTEMPTS="20")
    _stop_before_an_upload(proc, second, own_s3, steps=range(failed, 201, 50))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads(
        boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{RUN}/model/train_summary.json")["Body"].read()
    )
    assert summary["resumed_from_step"] == complete[-1] and summary["global_step"] == 200
    assert _complete_checkpoints() == [150, 200], "save_total_limit 2, every upload committed"
    _assert_intact(200, tmp_path)


def _stop_before_an_upload(proc: subprocess.Popen, cache: Path, server: seaweed.SeaweedS3, steps: range) -> int:
    """Kill the server while ``proc`` is frozen between writing a checkpoint and uploading it; restart it.

    The Trainer creates the checkpoint folder first and the marker (just before the upload is
    handed to its thread) last; freezing the process once the folder exists but before the marker
    does makes the upload start against a dead server. Returns the step whose upload met the outage.
    """
    for step in steps:
        folder = _local_checkpoint(cache, step)
        _wait(folder.exists, proc, f"checkpoint-{step} locally")
        proc.send_signal(signal.SIGSTOP)
        if (folder / MARKER).exists():  # the save was faster than this poll: try the next checkpoint
            proc.send_signal(signal.SIGCONT)
            continue
        server.stop(grace_s=0)
        proc.send_signal(signal.SIGCONT)
        server.start()
        return step
    pytest.fail(f"never caught a checkpoint before its upload in steps {list(steps)}")


def _write_nothing_with(access_key: str, secret_key: str, code: str, s3_server, bucket: str, tmp_path, corpus_file):
    corpus = f"s3://{bucket}/corpora/kantian.txt"
    boto3.client("s3").upload_file(str(corpus_file), bucket, "corpora/kantian.txt")
    run_dir = f"s3://{bucket}/runs/denied"
    with s3_environment(s3_server.endpoint, access_key=access_key, secret_key=secret_key):
        result = invoke("run", "--run-dir", run_dir, "--corpus", corpus, "--no-tracking", *tiny(), expect=2)
        assert result.stderr.strip() == (
            f"kantai-batch: error: {run_dir}: the S3 credentials were rejected ({code}): check AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (or the profile)"
        )
        # A local run dir reading the corpus from S3: the corpus is named, the run dir never made.
        local = tmp_path / "local-run"
        result = invoke("prepare", "--run-dir", str(local), "--corpus", corpus, expect=2)
        assert result.stderr.strip().startswith(f"kantai-batch: error: {corpus}: the S3 credentials were rejected")
        assert len(result.stderr.strip().splitlines()) == 1
        assert not local.exists()
    assert _keys("runs/", bucket) == set(), "nothing written to S3"
    assert not Path(os.environ["KANTAI_CACHE_DIR"]).exists(), "nothing written locally either"


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(cache))
    return cache


@pytest.mark.parametrize(
    ("access_key", "secret_key", "code"),
    [
        (seaweed.ACCESS_KEY, "wrong-secret", "SignatureDoesNotMatch"),
        ("no-such-key", seaweed.SECRET_KEY, "InvalidAccessKeyId"),
    ],
)
def test_rejected_credentials_are_a_config_error_before_anything_is_written(
    access_key, secret_key, code, s3_server, bucket: str, tmp_path: Path, corpus_file: Path, fresh_cache: Path
):
    _write_nothing_with(access_key, secret_key, code, s3_server, bucket, tmp_path, corpus_file)


def test_a_read_only_identity_is_denied_the_write(s3_server, bucket: str, corpus_file: Path, fresh_cache: Path):
    run_dir = f"s3://{bucket}/runs/read-only"
    with s3_environment(s3_server.endpoint, access_key=seaweed.READER_KEY, secret_key=seaweed.READER_SECRET):
        result = invoke("prepare", "--run-dir", run_dir, "--corpus", str(corpus_file), expect=3)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    # Refused at the folder's lease, before any work: the first write a commit to the store makes.
    assert message.startswith(f"kantai-batch: error: {run_dir}/.corpus.lease")
    assert "access denied (AccessDenied)" in message
    assert _keys("runs/", bucket) == set()


def test_prepared_run_is_unchanged_by_a_rejected_pretrain(
    s3_server, bucket: str, corpus_file: Path, fresh_cache: Path, tmp_path: Path
):
    """A wrong secret on a later phase: exit 2, and the phases already in S3 are untouched."""
    run_dir = f"s3://{bucket}/runs/kept"
    prepared_run(run_dir, corpus_file)
    before = {key: _etag(bucket, f"runs/{key}") for key in _keys("runs/", bucket)}
    with s3_environment(s3_server.endpoint, secret_key="wrong-secret"):
        result = invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny(), expect=2)
    assert "the S3 credentials were rejected (SignatureDoesNotMatch)" in result.stderr
    after = {key: _etag(bucket, f"runs/{key}") for key in _keys("runs/", bucket)}
    assert after == before and f"kept/tokenizer/{MARKER}" in after


def _etag(bucket: str, key: str) -> str:
    return boto3.client("s3").head_object(Bucket=bucket, Key=key)["ETag"]


@pytest.mark.parametrize(("name", "value"), [("AWS_MAX_ATTEMPTS", "many"), ("AWS_RETRY_MODE", "bogus")])
def test_invalid_retry_settings_are_a_config_error(name, value, s3_endpoint, bucket: str, monkeypatch, fresh_cache):
    monkeypatch.setenv(name, value)
    s3.client.cache_clear()
    try:
        result = invoke("prepare", "--run-dir", f"s3://{bucket}/runs/x", "--corpus", "unused.txt", expect=2)
    finally:
        monkeypatch.delenv(name)
        s3.client.cache_clear()
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and value in message and "AWS_MAX_ATTEMPTS, AWS_RETRY_MODE" in message


def test_no_credentials_are_a_config_error(s3_endpoint, bucket: str, tmp_path: Path, monkeypatch, fresh_cache):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookups off loopback
    s3.client.cache_clear()
    try:
        result = invoke("prepare", "--run-dir", f"s3://{bucket}/runs/x", "--corpus", "unused.txt", expect=2)
    finally:
        s3.client.cache_clear()
    assert result.stderr.strip() == (
        f"kantai-batch: error: s3://{bucket}/runs/x: no AWS credentials (environment, profile or web identity)"
    )


@pytest.mark.parametrize(
    ("unset", "extra", "expected"),
    [
        ("AWS_SECRET_ACCESS_KEY", {}, "missing: AWS_SECRET_ACCESS_KEY"),
        (None, {"AWS_PROFILE": "no-such-profile"}, "(no-such-profile) could not be found"),
    ],
)
def test_incomplete_credentials_are_a_config_error(
    unset, extra, expected, s3_endpoint, bucket: str, tmp_path: Path, monkeypatch, fresh_cache
):
    if unset:
        monkeypatch.delenv(unset)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3.client.cache_clear()
    try:
        result = invoke("prepare", "--run-dir", f"s3://{bucket}/runs/x", "--corpus", "unused.txt", expect=2)
    finally:
        s3.client.cache_clear()
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "the AWS credentials or profile are incomplete" in message, message
    assert expected in message


def test_a_download_whose_stream_keeps_breaking_is_a_one_line_error(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch, fresh_cache
):
    from botocore.exceptions import ResponseStreamingError
    from botocore.response import StreamingBody

    boto3.client("s3").put_object(Bucket=bucket, Key="books/kant.txt", Body=b"Reason and its limits.\n" * 5000)

    def broken(self, amt=None):  # what a connection cut in the middle of every body looks like to boto3
        raise ResponseStreamingError(error="Connection broken: IncompleteRead")

    monkeypatch.setattr(StreamingBody, "read", broken)
    result = invoke(
        "prepare", "--run-dir", str(tmp_path / "run"), "--corpus", f"s3://{bucket}/books/kant.txt", expect=4
    )
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"kantai-batch: error: s3://{bucket}/books/kant.txt: cannot download")
    assert not (tmp_path / "run" / "corpus").exists()


class _FlakyInstanceMetadata(http.server.BaseHTTPRequestHandler):
    """EC2 instance metadata (IMDSv2) serving a node role's credentials, whose first answers are errors,
    as a node under load gives them."""

    failures_left = 2
    asked: list[str] = []

    def do_PUT(self):  # the session token
        self._answer(b"token")

    def do_GET(self):
        role = "/latest/meta-data/iam/security-credentials/"
        if self.path == role:
            self._answer(b"kantai-node")
        elif self.path == role + "kantai-node":
            expires = (datetime.now(timezone.utc) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = {"Code": "Success", "AccessKeyId": seaweed.ACCESS_KEY, "SecretAccessKey": seaweed.SECRET_KEY,
                    "Token": "", "Expiration": expires}  # fmt: skip
            self._answer(json.dumps(body).encode())
        else:
            self.send_error(404)

    def _answer(self, body: bytes) -> None:
        type(self).asked.append(self.path)
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_credentials_from_instance_metadata_survive_its_first_errors(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch, fresh_cache
):
    """botocore asks instance metadata once by default: one error answer would be "no credentials", a
    configuration error that fails the Job for good on a node whose role is fine."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyInstanceMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_EC2_METADATA_DISABLED", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_METADATA_SERVICE_NUM_ATTEMPTS",
                 "AWS_METADATA_SERVICE_TIMEOUT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    s3.client.cache_clear()
    try:
        # Past the run dir's first listing, which needs the credentials, to the corpus that is not there.
        missing = tmp_path / "missing.txt"
        failed = invoke("prepare", "--run-dir", f"s3://{bucket}/runs/x", "--corpus", str(missing), expect=None)
    finally:
        s3.client.cache_clear()
        server.shutdown()
    assert str(missing) in failed.stderr and "no AWS credentials" not in failed.stderr, failed.stderr
    assert failed.exit_code != 0 and _FlakyInstanceMetadata.failures_left == 0


@pytest.mark.parametrize(
    ("run_dir", "says"),
    [
        # Bucket names S3 cannot have: botocore's reason is below its header line; a retry cannot help.
        ("s3://kb k/x", 'Invalid bucket name "kb k"'),
        ("s3://my_bucket:colon/x", 'Invalid bucket name "my_bucket:colon"'),
    ],
)
def test_an_impossible_bucket_name_is_a_config_error_with_the_reason(s3_endpoint, run_dir: str, says: str, fresh_cache):
    result = invoke("prepare", "--run-dir", run_dir, "--corpus", "unused.txt", expect=2)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and says in message and message.startswith(f"kantai-batch: error: {run_dir}")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("AWS_ENDPOINT_URL_S3", "localhost:8333", "the S3 endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the AWS"),
        ("AWS_ENDPOINT_URL_S3", "http://[::1", "the S3 endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the AWS"),
        ("AWS_DEFAULT_REGION", "us east", "the S3 region (AWS_REGION, AWS_DEFAULT_REGION or the AWS config file)"),
        ("AWS_REQUEST_CHECKSUM_CALCULATION", "bogus", "S3 checksum settings (AWS_REQUEST_CHECKSUM_CALCULATION,"),
    ],
)
def test_a_bad_endpoint_region_or_checksum_setting_names_itself_not_the_retry_settings(
    name, value, says, s3_endpoint, bucket: str, monkeypatch, fresh_cache
):
    """Endpoint and region were reported as "S3 client settings (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE ...) are
    invalid"; a checksum setting as the store out of reach (exit 4)."""
    monkeypatch.setenv(name, value)
    s3.client.cache_clear()
    try:
        result = invoke("prepare", "--run-dir", f"s3://{bucket}/runs/x", "--corpus", "unused.txt", expect=2)
    finally:
        monkeypatch.undo()
        s3.client.cache_clear()
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and says in message and "AWS_MAX_ATTEMPTS" not in message
    assert value in message or value == "http://[::1", "the value it refused, where botocore's answer names it"


@pytest.mark.parametrize("body", [b"", b"[1, 2]", b'{"completed_at": "x"}'])
def test_a_damaged_remote_marker_is_a_one_line_error(
    s3_endpoint, bucket: str, corpus_file: Path, fresh_cache, tmp_path: Path, monkeypatch, body: bytes
):
    """A local marker that is no manifest was one line; a remote one was a JSON traceback (exit 1)."""
    run_dir = f"s3://{bucket}/runs/damaged"
    prepared_run(run_dir, corpus_file)  # type: ignore[arg-type]
    boto3.client("s3").put_object(Bucket=bucket, Key=f"runs/damaged/tokenizer/{MARKER}", Body=body)
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "another-pod"))
    result = invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny(), expect=3)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"kantai-batch: error: {run_dir}/tokenizer/{MARKER} is not a manifest"
    )
    assert lines[0].endswith(f"delete {run_dir}/tokenizer to redo what wrote it")


@pytest.mark.parametrize(
    ("code", "error", "says"),
    [
        ("AccessDenied", "InputDataError", "access denied (AccessDenied) while trying to delete"),
        ("InternalError", "SourceUnavailableError", "cannot delete: InternalError refused"),
    ],
    ids=["denied", "other"],
)
def test_keys_a_multi_delete_refuses_are_an_error(monkeypatch, code: str, error: str, says: str):
    """A multi-delete answers 200 and lists the keys it refused: a marker left standing would vouch for
    files about to be replaced. Denied is for good (exit 3); anything else a retry may mend (exit 4)."""
    from kantai_batch import errors

    says = f"s3://kantai/runs/x/model/{MARKER}: {says}"

    class Refusing:  # the store refuses the marker's delete and takes the others
        def delete_objects(self, Bucket: str, Delete: dict) -> dict:
            key = Delete["Objects"][0]["Key"]
            return {"Deleted": Delete["Objects"][1:], "Errors": [{"Key": key, "Code": code, "Message": "refused"}]}

    monkeypatch.setattr(s3, "client", Refusing)
    with pytest.raises(getattr(errors, error), match=re.escape(says)):
        s3.delete_keys(s3.S3Uri.parse("s3://kantai/runs/x/model"), [MARKER, "model.safetensors"])


def test_a_second_machine_training_one_s3_run_dir_is_refused_while_the_first_renews_its_lease(
    s3_endpoint, bucket: str, corpus_file: Path, tmp_path: Path, monkeypatch, caplog
):
    """The file lock holds on one machine's disk: a second machine trained the same s3:// run dir beside the
    first, each setting aside and pruning the other's checkpoints."""
    from kantai_batch.rundir import PRETRAIN_LEASE

    run_dir = f"s3://{bucket}/runs/leased"
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "first-machine"))
    prepared_run(run_dir, corpus_file)  # type: ignore[arg-type]
    monkeypatch.setenv("KANTAI_LEASE_S", "1.5")
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "second-machine"))
    remote = s3.S3Uri.parse(run_dir)
    with lease.held(remote, PRETRAIN_LEASE, "the first machine's training"):
        result = invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny(), expect=4)
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"kantai-batch: error: {run_dir}/checkpoints is being written by process {os.getpid()} on ")
    )
    assert not _keys("runs/leased/checkpoints/", bucket), "nothing written"
    assert not _keys(f"runs/leased/{PRETRAIN_LEASE}", bucket), "released at the end"

    # A lease its holder no longer renews (a pod killed outright) is taken over after one term.
    boto3.client("s3").put_object(Bucket=bucket, Key=f"runs/leased/{PRETRAIN_LEASE}", Body=b'{"holder": "gone"}')
    with caplog.at_level(logging.WARNING, logger="kantai_batch"):
        invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny("train.max_steps=5"))
    assert "was not renewed for 1.5s; its holder is gone, took it over" in caplog.text
    assert not _keys(f"runs/leased/{PRETRAIN_LEASE}", bucket)


@pytest.mark.floors
def test_a_lease_is_held_renewed_taken_back_or_lost_and_won_by_one_of_two_takers(s3_endpoint, bucket: str, monkeypatch):
    import threading

    from kantai_batch.errors import SourceUnavailableError

    monkeypatch.setenv("KANTAI_LEASE_S", "0.9")
    folder = s3.S3Uri.parse(f"s3://{bucket}/runs/lease")
    key = "runs/lease/.lease"
    stored = lambda: json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())  # noqa: E731
    with lease.held(folder, ".lease", "the training") as held:
        assert stored()["token"] == held.token, "held while the block runs"
        before = stored()["renewal"]
        time.sleep(1.0)
        assert stored()["renewal"] != before, "renewed"
        # Deleted by hand or a lifecycle rule: taken back, not lost.
        boto3.client("s3").delete_object(Bucket=bucket, Key=key)
        time.sleep(1.0)
        assert stored()["token"] == held.token and not held.lost.is_set()
        # Another's now (this process stalled past its term): lost, and writing stops.
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b'{"holder": "another", "token": "x"}')
        time.sleep(1.0)
        assert held.lost.is_set()
        with pytest.raises(SourceUnavailableError, match="lost its lease .*stopped without writing more"):
            held.require()
    assert stored()["token"] == "x", "a lost lease is not released: it is another's"

    # Two machines waiting on one stale lease: exactly one takes it over, the other sees it renewed.
    outcomes: list[str] = []

    def take() -> None:
        try:
            with lease.held(folder, ".lease", "the training"):
                outcomes.append("took")
                time.sleep(2.5)
        except SourceUnavailableError:
            outcomes.append("refused")

    takers = [threading.Thread(target=take) for _ in range(2)]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join(timeout=30)
    assert sorted(outcomes) == ["refused", "took"]


def test_a_lease_is_waited_on_for_its_holders_term_when_that_is_the_longer(s3_endpoint, bucket: str, monkeypatch):
    """A process told a shorter KANTAI_LEASE_S than the holder's waited only its own term, shorter than
    the holder's renewal interval, and took a live holder's lease over."""
    monkeypatch.setenv("KANTAI_LEASE_S", "0.3")
    folder = s3.S3Uri.parse(f"s3://{bucket}/runs/terms")
    body = json.dumps({"holder": "a slower machine", "token": "x", "term_s": 2.5}).encode()
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/terms/.lease", Body=body)
    began = time.monotonic()
    with lease.held(folder, ".lease", "the training"):
        waited = time.monotonic() - began
    assert waited >= 2.5, f"took it over after {waited:.1f}s"

    # A term the launch's other processes could not wait out (they wait within train.collective_timeout_s):
    # refused at once, not slept through until they time out. A damaged term is bounded.
    from kantai_batch.errors import SourceUnavailableError

    body = json.dumps({"holder": "a long lease", "token": "y", "term_s": 900}).encode()
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/terms/.lease", Body=body)
    with pytest.raises(
        SourceUnavailableError, match=r"leased by a long lease for 900 s .*wait for each other \(600 s\)"
    ):
        with lease.held(folder, ".lease", "the training", wait_s=600):
            pass
    assert lease._term_of({"term_s": 1e300}) == 86_400 and lease._term_of({"term_s": "soon"}) == 0


def test_a_holder_whose_renewal_hangs_stops_writing_before_another_can_take_the_lease(
    s3_endpoint, bucket: str, monkeypatch
):
    """The renewer set the lease lost only once a renewal failed: one stuck in a request for longer than
    the term left ``require`` passing while a waiting machine took the lease over and trained."""
    from kantai_batch.errors import SourceUnavailableError

    monkeypatch.setenv("KANTAI_LEASE_S", "0.9")
    answered, writes = s3.put_if, []

    def hanging(uri, body, **condition):
        writes.append(uri)
        if len(writes) > 1:  # the renewals: the store stops answering
            time.sleep(3)
        return answered(uri, body, **condition)

    monkeypatch.setattr(s3, "put_if", hanging)
    with lease.held(s3.S3Uri.parse(f"s3://{bucket}/runs/hung"), ".lease", "the training") as held:
        held.require()
        time.sleep(0.75)  # past two thirds of the term since the lease was written
        with pytest.raises(SourceUnavailableError, match="lost its lease"):
            held.require()


class _Store:
    """While ``down`` is set, every conditional write fails as an unreachable store does; ``written``
    counts those that got through."""

    def __init__(self, monkeypatch) -> None:
        from kantai_batch.errors import SourceUnavailableError

        self.down, self.written, answered = threading.Event(), 0, s3.put_if

        def flaky(uri, body, **condition):
            if self.down.is_set():
                raise SourceUnavailableError(f"{uri}: cannot write: Could not connect to the endpoint URL")
            etag = answered(uri, body, **condition)
            self.written += etag is not None
            return etag

        monkeypatch.setattr(s3, "put_if", flaky)

    def back(self) -> None:
        """The store answers again: return once a renewal got through (later on a loaded machine)."""
        before = self.written
        self.down.clear()
        deadline = time.monotonic() + 30
        while self.written == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.written > before, "no renewal got through once the store was back"


_AWAY_TERM = "3"


def test_a_lease_unrenewed_while_the_store_was_away_is_the_holders_again_unless_another_took_it(
    s3_endpoint, bucket: str, monkeypatch
):
    """Renewals failing for most of a term marked the lease lost for good: a phase's whole work was thrown
    away at its commit although no other machine had written the lease."""
    from kantai_batch.errors import SourceUnavailableError

    # A term a loaded machine renews within (each request gets a twelfth of it).
    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    store = _Store(monkeypatch)
    folder, key = s3.S3Uri.parse(f"s3://{bucket}/runs/away"), "runs/away/.lease"
    with lease.held(folder, ".lease", "the phase") as held:
        store.down.set()
        time.sleep(2.5)  # past two thirds of the term without a renewal
        with pytest.raises(SourceUnavailableError, match="lost its lease"):
            held.require()  # refused while the store is away: another may be taking it over
        store.back()  # a renewal gets through: its own write was still there
        held.require()
    assert not _keys(key, bucket), "released at the end"

    with lease.held(folder, ".lease", "the phase") as held:
        store.down.set()
        time.sleep(2.5)
        # Meanwhile another machine took it over (it reached the store).
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b'{"holder": "another", "token": "x"}')
        store.down.clear()
        time.sleep(2.0)  # renewals, refused: the write there is another's
        with pytest.raises(SourceUnavailableError, match="lost its lease"):
            held.require()
    assert json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())["token"] == "x"


def test_a_writer_whose_lease_the_clock_marked_lost_renews_it_itself_once_the_store_is_back(
    s3_endpoint, bucket: str, monkeypatch
):
    """A store back between two thirds of a term and the renewer's next tick, just before a commit, failed
    the phase with exit 4 although nobody else had written the lease (found by an outage fuzz)."""
    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    store = _Store(monkeypatch)
    folder = s3.S3Uri.parse(f"s3://{bucket}/runs/back")
    with lease.held(folder, ".lease", "the phase") as held:
        store.down.set()
        assert held.lost.wait(10), "the renewer marks the lease lost once it is overdue"
        store.down.clear()  # back, a slot before the renewer tries again
        written = store.written
        held.require()
        assert store.written == written + 1, "the writer renewed it itself"
        assert not held.lost.is_set()
    assert not _keys("runs/back/.lease", bucket), "released"


def test_a_writer_whose_lease_the_clock_marked_lost_waits_for_the_renewal_in_flight(
    s3_endpoint, bucket: str, monkeypatch
):
    """The store back while the renewer's own request was in flight (its retry after a timeout or a refused
    connection): the commit refused with exit 4 at once, and that request renewed the lease a moment later."""
    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    store = _Store(monkeypatch)
    stall, in_flight, answered = threading.Event(), threading.Event(), threading.Event()
    flaky = s3.put_if

    def slow(uri, body, **condition):
        if stall.is_set() and threading.current_thread().name == "kantai-lease":
            stall.clear()
            in_flight.set()
            answered.wait(10)  # the request in flight meanwhile: the store comes back before its retry
        return flaky(uri, body, **condition)

    monkeypatch.setattr(s3, "put_if", slow)
    folder = s3.S3Uri.parse(f"s3://{bucket}/runs/inflight")
    with lease.held(folder, ".lease", "the phase") as held:
        store.down.set()
        assert held.lost.wait(10), "the renewer marks the lease lost once it is overdue"
        stall.set()
        assert in_flight.wait(10), "the renewer tries again"
        store.down.clear()
        threading.Timer(0.2, answered.set).start()
        held.require()  # waits for the renewal in flight, which finds the lease still its own
        assert not held.lost.is_set()
    assert not _keys("runs/inflight/.lease", bucket), "released"


def test_a_commit_survives_the_store_away_for_a_while_during_its_work(s3_endpoint, bucket: str, tmp_path, monkeypatch):
    from kantai_batch.rundir import RunDir

    # A term a loaded machine renews within (each request gets a twelfth of it).
    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    store = _Store(monkeypatch)
    run = RunDir(tmp_path / "mirror", s3.S3Uri.parse(f"s3://{bucket}/runs/blip"))
    with run.committed(run.corpus) as out:
        (out / "train.txt").write_text("hours of work\n", encoding="utf-8")
        store.down.set()
        time.sleep(3.5)  # longer than a term: a store restarting, a network partition healing
        store.back()
    assert set(run.marker(run.corpus)["files"]) == {"train.txt"}
    assert not _keys("runs/blip/.corpus.lease", bucket), "released"


def test_a_bounded_request_to_a_store_that_never_answers_gives_up_within_its_time(monkeypatch):
    """A lease renewal with the project's client (10 attempts of up to 70 s) would outlast its term."""
    import socket

    from kantai_batch.errors import SourceUnavailableError

    silent = socket.create_server(("127.0.0.1", 0))  # takes connections (the kernel's backlog), answers nothing
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")  # the environment's bounds do not stretch it
    s3.client.cache_clear()
    # Built before the clock starts: making a client is CPU work that a loaded machine stretched past the
    # bound (up to 3 s of 5.6 s on a 2-core machine under load); only the request's time is bounded.
    s3.client(1.0)
    outcome: list[BaseException] = []
    began = time.monotonic()

    def put() -> None:
        try:
            s3.put_if(s3.S3Uri.parse("s3://kantai/runs/x/.lease"), b"{}", within_s=1.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    try:
        request = threading.Thread(target=put, daemon=True)
        request.start()
        request.join(timeout=10)
    finally:
        silent.close()
        s3.client.cache_clear()
    assert not request.is_alive(), "still waiting for the store"
    assert outcome and isinstance(outcome[0], SourceUnavailableError), outcome
    # Two attempts of 0.25 s timeouts: 0.5 s. A write that waited for the store's "100 Continue" took 2.5 s.
    assert time.monotonic() - began < 1.5


def test_a_training_that_lost_its_lease_seals_and_publishes_no_checkpoint(tmp_path: Path):
    from types import SimpleNamespace

    from kantai_batch.checkpoints import CheckpointMarkerCallback
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.rundir import RunDir

    def lost() -> None:
        raise SourceUnavailableError("lost its lease")

    run = RunDir(tmp_path / "run")
    saved = run.checkpoints / "checkpoint-10"
    saved.mkdir(parents=True)
    (saved / "model.safetensors").write_bytes(b"weights")
    callback = CheckpointMarkerCallback(run, keep=2, still_ours=lost)
    state = SimpleNamespace(is_world_process_zero=True, global_step=10)
    with pytest.raises(SourceUnavailableError, match="lost its lease"):
        callback.on_save(SimpleNamespace(world_size=1), state, SimpleNamespace())
    assert not (saved / MARKER).exists(), "not sealed: the run dir may be another machine's now"


def test_a_lease_term_the_other_processes_could_not_wait_out_is_a_config_error(monkeypatch):
    from kantai_batch.errors import JobConfigError

    monkeypatch.setenv("KANTAI_LEASE_S", "60")
    lease.require_term_within(600, "train.collective_timeout_s")
    with pytest.raises(JobConfigError, match=r"KANTAI_LEASE_S 60 must be at most half of train.collective_timeout_s"):
        lease.require_term_within(100, "train.collective_timeout_s")
    monkeypatch.setenv("KANTAI_LEASE_S", "soon")
    with pytest.raises(JobConfigError, match="KANTAI_LEASE_S must be a number of seconds above 0, got 'soon'"):
        lease.require_term_within(600, "train.collective_timeout_s")


def test_run_refuses_a_lease_term_the_training_cannot_wait_out_before_its_first_phase(
    s3_endpoint, bucket: str, corpus_file: Path, fresh_cache
):
    """Checked only as the training began: `run` prepared, trained the tokenizer and tokenized first."""
    run_dir = f"s3://{bucket}/runs/short-wait"
    args = ("run", "--run-dir", run_dir, "--corpus", str(corpus_file), "--no-tracking")
    result = invoke(*args, *tiny("train.collective_timeout_s=100"), expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        "kantai-batch: error: KANTAI_LEASE_S 60 must be at most half of train.collective_timeout_s (100 s): "
        "the other processes of the launch wait for the lease within it"
    )
    assert not _keys("runs/short-wait/", bucket), "no phase ran"


def test_every_nodes_rng_states_reach_the_checkpoint_in_s3(s3_endpoint, bucket: str, corpus_file: Path, tmp_path: Path):
    """Each process saves its RNG state to its own node's disk, and the main process alone publishes the
    checkpoint: the other nodes' states never reached the store, so their dropout after a resume differed."""
    run_dir = f"s3://{bucket}/runs/nodes"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KANTAI_CACHE_DIR", str(tmp_path / "prepared"))
        prepared_run(run_dir, corpus_file)  # type: ignore[arg-type]
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "KANTAI_CACHE_DIR": str(tmp_path / f"node{rank}"),  # a disk of its own
               "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}  # fmt: skip
        command = [sys.executable, "-m", "kantai_batch", "launch", "pretrain", "--run-dir", run_dir, "--no-tracking"]
        command += tiny("train.max_steps=10", "train.save_steps=10")
        nodes.append(
            subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    stored = _keys("runs/nodes/checkpoints/checkpoint-10/", bucket)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= stored, sorted(stored)
    marker = json.loads(
        boto3.client("s3")
        .get_object(Bucket=bucket, Key=f"runs/nodes/checkpoints/checkpoint-10/{MARKER}")["Body"]
        .read()
    )
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"]), "vouched for by the marker"


def test_a_renewal_whose_answer_was_lost_keeps_the_lease_its_own(s3_endpoint, bucket: str, monkeypatch):
    """The store took a renewal but the connection dropped before its answer: the client's retry found the
    ETag changed (by that very write) and the holder called its own lease "another process's", stopping
    the phase with exit 4 and leaving the lease for the rerun to wait a term on."""
    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    answered, writes = s3.put_if, []

    def answer_lost(uri, body, **condition):
        writes.append(uri)
        etag = answered(uri, body, **condition)
        return None if len(writes) == 2 else etag  # the first renewal: written, its answer lost

    monkeypatch.setattr(s3, "put_if", answer_lost)
    folder = s3.S3Uri.parse(f"s3://{bucket}/runs/answer-lost")
    with lease.held(folder, ".lease", "the phase") as held:
        deadline = time.monotonic() + 30  # the lost answer, then another renewal (later on a loaded machine)
        while len(writes) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(writes) >= 3
        held.require()
    assert not _keys("runs/answer-lost/.lease", bucket), "released at the end"


def test_a_renewal_that_finds_an_earlier_renewal_of_its_own_counts_the_lease_renewed_no_later_than_that(
    s3_endpoint, bucket: str, monkeypatch
):
    """A renewal the store took but whose answer never came (the connection dropped, the retries gave up)
    left the holder behind on the ETag: the next renewal, refused, found that earlier write its own and
    counted the lease renewed *now* – a slot later than the store last saw it change, so the holder could
    go on writing for that slot after another machine was entitled to take the lease over."""
    from kantai_batch.errors import SourceUnavailableError

    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    answered, sent_at, calls = s3.put_if, {}, []

    def first_renewal_unanswered(uri, body, **condition):
        calls.append(uri)
        sent = time.monotonic()
        etag = answered(uri, body, **condition)
        if etag is not None:
            sent_at[etag] = sent
        if len(calls) == 2:  # the first renewal: written, then no answer
            raise SourceUnavailableError("the store stopped answering")
        return etag

    monkeypatch.setattr(s3, "put_if", first_renewal_unanswered)
    with lease.held(s3.S3Uri.parse(f"s3://{bucket}/runs/earlier"), ".lease", "the phase") as held:
        acquired = held._etag
        deadline = time.monotonic() + 30
        while held._etag == acquired and time.monotonic() < deadline:
            time.sleep(0.05)
        with held._renewing:
            assert held._etag != acquired, "renewed after the unanswered renewal"
            assert sent_at[held._etag] >= held._renewed_at, "counted renewed no later than the store's write"
        held.require()


def test_an_earlier_renewal_of_its_own_found_most_of_a_term_late_leaves_the_lease_lost_until_renewed(
    s3_endpoint, bucket: str, monkeypatch
):
    """The store away for most of a term after taking a renewal unheard: the renewal that found that write
    once the store was back called the lease "renewed again" and ours, though by the write's own send time
    another machine was about to be entitled to take it over; only a renewal conditional on it makes it so."""
    from kantai_batch.errors import SourceUnavailableError

    held = lease.Lease(s3.S3Uri.parse(f"s3://{bucket}/runs/late"), ".lease", "the phase", term=3.0)
    held._renewed_at, held._etag = time.monotonic(), s3.put_if(held.uri, held._body())
    slot, answered = held.term / lease._RENEWALS, s3.put_if

    def taken_unheard(uri, body, **condition):
        answered(uri, body, **condition)
        raise SourceUnavailableError("the store stopped answering")

    monkeypatch.setattr(s3, "put_if", taken_unheard)
    with pytest.raises(SourceUnavailableError):
        held._renew_once(slot)
    sent = time.monotonic()  # after the write taken unheard was sent
    monkeypatch.setattr(s3, "put_if", answered)
    time.sleep(held.term * (lease._RENEWALS - 1) / lease._RENEWALS - (time.monotonic() - sent) + 0.1)
    held.lost.set()  # as the renewer marks it, the store still away

    assert held._renew_once(slot), "the write found is this process's own"
    assert held.lost.is_set(), "counted from a send most of a term ago: not ours again yet"
    assert held._renew_once(slot), "renewed, conditional on the write found"
    assert not held.lost.is_set() and not held._overdue()
    held.require()


def test_a_commit_whose_lease_another_took_over_during_its_upload_writes_no_marker(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch
):
    """The lease was checked once before the upload: a writer cut off from the store mid-upload for a term
    went on, once it was back, to write its marker over the folder the machine that took the lease over had
    committed meanwhile (its marker, the other's files: a folder no reader can use), and exited 0."""
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.rundir import RunDir

    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    run = RunDir(tmp_path / "mirror", s3.S3Uri.parse(f"s3://{bucket}/runs/taken"))
    uploaded, taken, refused, read = s3.upload_file, threading.Event(), threading.Event(), s3.read_with_etag

    def read_back(uri, **bounds):  # the renewer, its conditional renewal refused, reads whose the lease is
        found = read(uri, **bounds)
        if taken.is_set():
            refused.set()
        return found

    def taken_over_meanwhile(path, uri):
        if not taken.is_set():
            boto3.client("s3").put_object(Bucket=bucket, Key="runs/taken/.corpus.lease", Body=b'{"token": "x"}')
            taken.set()
            assert refused.wait(30), "the holder's next renewal finds it another's"
            time.sleep(0.2)  # and marks it lost, with no request between
        uploaded(path, uri)

    monkeypatch.setattr(s3, "read_with_etag", read_back)
    monkeypatch.setattr(s3, "upload_file", taken_over_meanwhile)
    with pytest.raises(SourceUnavailableError, match="lost its lease"):
        with run.committed(run.corpus) as out:
            (out / "train.txt").write_text("mine\n", encoding="utf-8")
    assert run.marker(run.corpus) is None, "no marker written over another's commit"


def _leases_held(monkeypatch) -> list:
    """The leases this process acquires from now on, in order (to wait on what their holders learn)."""
    held, acquire = [], lease.Lease.acquire

    def recorded(self) -> None:
        acquire(self)
        held.append(self)

    monkeypatch.setattr(lease.Lease, "acquire", recorded)
    return held


def _take_over(bucket: str, key: str, held) -> None:
    """Another machine writes the lease; return once its holder has marked it lost (its next renewal)."""
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b'{"holder": "another", "token": "x"}')
    assert held.lost.wait(30), "the holder's next renewal finds it another's"


def test_a_lease_lost_while_the_store_was_away_is_not_created_again_after_another_machine_let_it_go(
    s3_endpoint, bucket: str, monkeypatch
):
    """A holder cut off from the store for a term, whose lease another machine took over, used and released
    meanwhile, found it missing once back and created it afresh as if it had been deleted by hand: it then
    went on to write over the folder the other machine had committed."""
    from kantai_batch.errors import SourceUnavailableError

    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    store = _Store(monkeypatch)
    folder, key = s3.S3Uri.parse(f"s3://{bucket}/runs/let-go"), "runs/let-go/.lease"
    with lease.held(folder, ".lease", "the phase") as held:
        store.down.set()
        assert held.lost.wait(10), "the renewer marks the lease lost once it is overdue"
        # Meanwhile another machine took it over, committed, and released it.
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b'{"holder": "another", "token": "x"}')
        boto3.client("s3").delete_object(Bucket=bucket, Key=key)
        store.down.clear()
        # The renewer's first renewal with the store back decides: the lease found another's (gone), or
        # created again and the holder's (the failure this guards against).
        deadline = time.monotonic() + 30
        while not held._taken.is_set() and held.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(SourceUnavailableError, match="lost its lease"):
            held.require()
    assert not _keys(key, bucket), "not created again"


def test_an_upload_writes_no_further_file_once_its_lease_is_another_machines(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch
):
    """The lease was checked only before the upload and its marker: files uploaded after another machine
    took the lease over were written over that machine's folder, one by one."""
    from kantai_batch import manifest
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.rundir import RunDir

    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    monkeypatch.setattr(manifest, "_TRANSFER_THREADS", 1)  # one file at a time: which came after is known
    held = _leases_held(monkeypatch)
    run = RunDir(tmp_path / "mirror", s3.S3Uri.parse(f"s3://{bucket}/runs/per-file"))
    uploaded, sent = s3.upload_file, []

    def taken_over_after_the_first(path, uri):
        uploaded(path, uri)
        sent.append(uri.key)
        if len(sent) == 1:
            _take_over(bucket, "runs/per-file/.corpus.lease", held[0])

    monkeypatch.setattr(s3, "upload_file", taken_over_after_the_first)
    with pytest.raises(SourceUnavailableError, match="lost its lease"):
        with run.committed(run.corpus) as out:
            for name in ("a.txt", "b.txt", "c.txt"):
                (out / name).write_text(f"{name}\n", encoding="utf-8")
    assert len(sent) == 1, f"written after the lease was another's: {sent[1:]}"


def test_a_commit_whose_lease_is_taken_before_it_clears_old_keys_deletes_none_of_the_new_holders(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch
):
    """Over a folder with no marker the upload first deletes the keys it does not write: listed just as
    another machine took the lease over and began its own upload there, they were that machine's files."""
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.rundir import RunDir

    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    held = _leases_held(monkeypatch)
    run = RunDir(tmp_path / "mirror", s3.S3Uri.parse(f"s3://{bucket}/runs/clear"))
    listed = s3.list_keys

    def taken_over_while_listing(prefix):
        if prefix.key == "runs/clear/corpus" and not held[0].lost.is_set():
            _take_over(bucket, "runs/clear/.corpus.lease", held[0])
            boto3.client("s3").put_object(Bucket=bucket, Key="runs/clear/corpus/theirs.txt", Body=b"theirs\n")
        return listed(prefix)

    monkeypatch.setattr(s3, "list_keys", taken_over_while_listing)
    with pytest.raises(SourceUnavailableError, match="lost its lease"):
        with run.committed(run.corpus) as out:
            (out / "train.txt").write_text("mine\n", encoding="utf-8")
    assert _keys("runs/clear/corpus/", bucket) == {"theirs.txt"}, "nothing of theirs deleted"


@pytest.mark.parametrize("taken_during", ["upload_file", "delete_keys"])
def test_a_recommit_whose_lease_is_taken_midway_writes_nothing_over_the_committed_folder(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch, taken_during: str
):
    """Over a committed folder the upload stages its files, points the marker at them, then copies them to
    their usual keys. Taken over while staging, the writer pointed the marker at its staging folder anyway;
    taken over after the switch, its copies went on over the keys the new holder commits."""
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.rundir import RunDir

    monkeypatch.setenv("KANTAI_LEASE_S", _AWAY_TERM)
    run = RunDir(tmp_path / "mirror", s3.S3Uri.parse(f"s3://{bucket}/runs/recommit"))
    with run.committed(run.corpus) as out:
        (out / "train.txt").write_text("old\n", encoding="utf-8")
    stored = lambda key: boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()  # noqa: E731
    before = json.loads(stored(f"runs/recommit/corpus/{MARKER}"))

    held = _leases_held(monkeypatch)
    real, copied = getattr(s3, taken_during), []

    def taken_over_meanwhile(*args, **kwargs):
        if not held[0].lost.is_set():
            _take_over(bucket, "runs/recommit/.corpus.lease", held[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(s3, taken_during, taken_over_meanwhile)
    monkeypatch.setattr(s3, "copy", lambda source, dest: copied.append(dest.key))
    with pytest.raises(SourceUnavailableError, match="lost its lease"):
        with run.committed(run.corpus) as out:
            (out / "train.txt").write_text("new\n", encoding="utf-8")
    assert not copied, "copied over the keys after the lease was another's"
    if taken_during == "upload_file":
        assert json.loads(stored(f"runs/recommit/corpus/{MARKER}")) == before, "the marker switched anyway"


def test_a_lease_release_gives_up_within_a_renewal_slot_when_the_store_stops_answering(
    s3_endpoint, bucket: str, monkeypatch
):
    """The release read the lease with the default client (up to 10 attempts of 60 s and more): a store that
    stopped answering as a phase ended held the finished phase for its whole outage."""
    import socket

    held = lease.Lease(s3.S3Uri.parse(f"s3://{bucket}/runs/release"), ".lease", "the phase", 6.0)
    held.acquire()
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections (the kernel's backlog), answers nothing
    ended = threading.Event()

    def release() -> None:
        held.release()
        ended.set()

    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
        s3.client.cache_clear()
        threading.Thread(target=release, daemon=True).start()
        # Its renewer's request and its own read each give up within a slot (2 s).
        assert ended.wait(20), "the release still waits for the store"
    finally:
        silent.close()
        monkeypatch.undo()
        s3.client.cache_clear()


def test_a_checkpoint_upload_that_outlasted_its_lease_prunes_nothing(
    s3_endpoint, bucket: str, tmp_path: Path, monkeypatch
):
    """The lease was checked before the upload only: a checkpoint whose upload outlasted the lease went on
    to prune the store's older checkpoints, which the machine holding the lease now resumes from."""
    from kantai_batch.checkpoints import CheckpointMarkerCallback
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.rundir import RunDir

    run = RunDir(tmp_path / "mirror", s3.S3Uri.parse(f"s3://{bucket}/runs/prune"))
    for step in (10, 20, 30):
        saved = run.checkpoint(step)
        saved.mkdir(parents=True)
        (saved / "model.safetensors").write_bytes(b"weights")
        checkpoint = run.seal_checkpoint(step, processes=1)
        if step < 30:
            run.publish(checkpoint)
    lost, published = threading.Event(), RunDir.publish

    def still_ours() -> None:
        if lost.is_set():
            raise SourceUnavailableError("lost its lease")

    def published_then_lost(self, folder, still_ours=None):
        published(self, folder, still_ours)
        lost.set()  # the upload took longer than the lease's term

    monkeypatch.setattr(RunDir, "publish", published_then_lost)
    with pytest.raises(SourceUnavailableError, match="lost its lease"):
        CheckpointMarkerCallback(run, keep=1, still_ours=still_ours)._publish(checkpoint)
    stored = {key.split("/")[0] for key in _keys("runs/prune/checkpoints/", bucket)}
    assert stored == {"checkpoint-10", "checkpoint-20", "checkpoint-30"}, "none pruned"
