"""Two machines (two local mirrors) writing one s3:// run dir at once, against a real S3 server."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from helpers import invoke, kantian_text, tiny
from kantai_batch import s3
from kantai_batch.errors import SourceUnavailableError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import load_job
from kantai_batch.manifest import MARKER, write_json_atomic
from kantai_batch.rundir import RunDir
from kantai_batch.s3 import S3Uri

pytestmark = pytest.mark.slow


def _commit_corpus(run: RunDir, text: str) -> None:
    """What a `prepare` on another machine commits (its own mirror, the same store)."""
    with run.committed(run.corpus, inputs_sha256="other") as out:
        (out / "train.txt").write_text(text, encoding="utf-8")
        (out / "eval.txt").write_text(text, encoding="utf-8")
        write_json_atomic(out / "stats.json", {"other": True})


@contextlib.contextmanager
def _first_writing(first: RunDir) -> Iterator[None]:
    """While the block runs, ``first`` is inside its commit of the corpus (train.txt "A"), lease held."""
    writing, done = threading.Event(), threading.Event()

    def commit_first() -> None:
        with first.committed(first.corpus) as out:
            (out / "train.txt").write_text("A\n", encoding="utf-8")
            writing.set()
            done.wait(30)

    thread = threading.Thread(target=commit_first)
    thread.start()
    assert writing.wait(30)
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_a_second_machine_committing_the_same_folder_is_refused_while_the_first_writes(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Long enough that a loaded machine renews in time (each renewal request gets a third of it).
    monkeypatch.setenv("KANTAI_LEASE_S", "6")
    remote = S3Uri.parse(f"s3://{bucket}/run")
    first, second = RunDir(tmp_path / "machine-a", remote), RunDir(tmp_path / "machine-b", remote)
    with _first_writing(first), pytest.raises(SourceUnavailableError, match="being written by"):
        with second.committed(second.corpus) as out:
            (out / "train.txt").write_text("B\n", encoding="utf-8")
    committed = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=f"run/corpus/{MARKER}")["Body"].read())
    body = boto3.client("s3").get_object(Bucket=bucket, Key="run/corpus/train.txt")["Body"].read()
    assert set(committed["files"]) == {"train.txt"} and body == b"A\n"
    assert not s3.exists(remote.child(".corpus.lease")), "released"


def _corpus_replaced_during(phases: list[str], module, name: str, run_dir: str, tmp_path: Path, monkeypatch) -> None:
    """Prepare, then run ``phases`` on machine a; as the last of them calls ``module.name``, machine b
    commits another corpus. Later calls see machine c (a fresh mirror)."""
    source = tmp_path / "c1.txt"
    source.write_text(kantian_text(300, seed=1), encoding="utf-8")
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "machine-a"))
    invoke("prepare", "--run-dir", run_dir, "--corpus", str(source), *tiny())
    for phase in phases[:-1]:
        invoke(phase, "--run-dir", run_dir, *tiny())
    real = getattr(module, name)

    def corpus_replaced_then(*args, **kwargs):
        _commit_corpus(RunDir(tmp_path / "machine-b", S3Uri.parse(run_dir)), kantian_text(300, seed=2))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, corpus_replaced_then)
    invoke(phases[-1], "--run-dir", run_dir, *tiny())
    monkeypatch.undo()
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "machine-c"))


def test_tokens_record_the_corpus_they_were_made_from_not_one_committed_meanwhile(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another machine re-commits the corpus after this tokenize mirrored it: the tokens' marker and
    tokens.json must name the corpus tokenized, so that `run` redoes them and pretrain refuses them."""
    import kantai_batch.tokens as tokens

    run_dir = f"s3://{bucket}/run"
    # After tokenize mirrored corpus and tokenizer.
    _corpus_replaced_during(["train-tokenizer", "tokenize"], tokens, "load_tokenizer", run_dir, tmp_path, monkeypatch)
    fresh = RunDir.from_uri(run_dir)
    recorded = fresh.marker(fresh.tokens)["inputs_sha256"]
    assert recorded != fingerprint_of(load_job(None, tiny_sets()), "tokenize", fresh), "run would skip tokenize"
    result = invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *tiny("train.max_steps=2"), expect=3)
    assert "another corpus" in result.stderr


def tiny_sets() -> list[str]:
    args = tiny()
    return [args[i + 1] for i in range(0, len(args), 2)]


def test_the_same_phase_started_twice_on_one_machine_is_refused_at_once(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Its file lock refuses the second at once (README), not a term later at the lease."""
    import time

    monkeypatch.setenv("KANTAI_LEASE_S", "6")
    remote = S3Uri.parse(f"s3://{bucket}/run")
    first, second = RunDir(tmp_path / "mirror", remote), RunDir(tmp_path / "mirror", remote)
    with _first_writing(first):
        began = time.monotonic()
        with pytest.raises(SourceUnavailableError, match="is being written by process"):
            with second.committed(second.corpus):
                pass
        assert time.monotonic() - began < 3, "waited for the lease's term"


def test_a_model_lease_left_with_a_term_longer_than_the_launch_waits_is_refused_at_once(bucket: str, tmp_path: Path):
    """Pretrain's main process commits the model while the others wait at a barrier within the collective
    timeout: a lease whose holder recorded a longer term is refused, not slept through past it."""
    import time

    record = {"holder": "process 1 on gone", "token": "old", "term_s": 1000}
    boto3.client("s3").put_object(Bucket=bucket, Key="run/.model.lease", Body=json.dumps(record).encode())
    run = RunDir(tmp_path / "mirror", S3Uri.parse(f"s3://{bucket}/run"))
    began = time.monotonic()
    with pytest.raises(SourceUnavailableError, match=r"leased by process 1 on gone for 1000 s .* \(120 s\)"):
        with run.committed(run.model, lease_wait_s=120):
            pass
    assert time.monotonic() - began < 60, "not waited out"
    assert not s3.exists(S3Uri.parse(f"s3://{bucket}/run/model/{MARKER}"))


def test_a_folder_this_process_committed_after_reading_it_is_recorded_as_committed(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What a writer records as read (its fingerprint, lineage, tokens.json) stood for the folder's earlier
    commit after the same process had replaced it: a later phase of that process named the old corpus."""
    monkeypatch.setenv("KANTAI_LEASE_S", "6")
    run = RunDir(tmp_path / "mirror", S3Uri.parse(f"s3://{bucket}/run"))
    _commit_corpus(run, "first\n")
    run.require(run.corpus, "corpus", "prepare")
    _commit_corpus(run, "second\n")
    assert run.marker_as_read(run.corpus) == run.marker(run.corpus), "the commit it made, not the one it read"


def test_pretrain_refuses_a_model_lease_its_other_ranks_could_not_wait_out(
    bucket: str, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Pretrain's model commit waited out a stale lease's whole term (the lease's own, not bounded by
    train.collective_timeout_s) while the launch's other ranks sat at their barrier and timed out."""
    from helpers import prepared_run

    run_dir = f"s3://{bucket}/run"
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "machine"))
    prepared_run(run_dir, corpus_file)  # type: ignore[arg-type]
    monkeypatch.setenv("KANTAI_LEASE_S", "2")
    record = {"holder": "process 1 on gone", "token": "old", "term_s": 40}
    boto3.client("s3").put_object(Bucket=bucket, Key="run/.model.lease", Body=json.dumps(record).encode())
    settings = tiny("train.max_steps=2", "train.collective_timeout_s=60")
    result = invoke("pretrain", "--run-dir", run_dir, "--no-tracking", *settings, expect=4)
    assert "leased by process 1 on gone for 40 s" in result.stderr and "(60 s)" in result.stderr
    assert not s3.exists(S3Uri.parse(f"{run_dir}/model/{MARKER}"))


def test_a_folder_committed_again_just_before_its_download_is_recorded_as_downloaded(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The manifest listed before the download was recorded as the one read: where another machine
    re-committed the folder in between, the files read were the newer ones and the writer's fingerprint
    named the older."""
    from kantai_batch import manifest

    monkeypatch.setenv("KANTAI_LEASE_S", "6")
    remote = S3Uri.parse(f"s3://{bucket}/run")
    other, run = RunDir(tmp_path / "machine-b", remote), RunDir(tmp_path / "machine-a", remote)
    _commit_corpus(other, "first\n")
    download = manifest.download

    def committed_again_first(prefix, dest):
        _commit_corpus(other, "second\n")
        return download(prefix, dest)

    monkeypatch.setattr(manifest, "download", committed_again_first)
    local = run.require(run.corpus, "corpus", "prepare")
    assert (local / "train.txt").read_text(encoding="utf-8") == "second\n"
    assert run.marker_as_read(run.corpus) == manifest.read_marker(local), "recorded as downloaded"


def test_a_tokenizer_records_the_corpus_it_was_trained_on_not_one_committed_meanwhile(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another machine re-commits the corpus after train-tokenizer mirrored it: the tokenizer's marker must
    name the corpus it was trained on, so that `run` trains it again on the new one."""
    import kantai_batch.continued as continued

    run_dir = f"s3://{bucket}/run"
    # After train-tokenizer mirrored the corpus.
    _corpus_replaced_during(["train-tokenizer"], continued, "init_model_dir", run_dir, tmp_path, monkeypatch)
    fresh = RunDir.from_uri(run_dir)
    recorded = fresh.marker(fresh.tokenizer)["inputs_sha256"]
    now = fingerprint_of(load_job(None, tiny_sets()), "train-tokenizer", fresh)
    assert recorded != now, "run would keep a tokenizer trained on the old corpus"


def test_checkpoints_record_the_tokens_they_were_trained_on_not_ones_committed_meanwhile(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another machine re-commits tokens/ while this pretrain trains on its mirrored copy: the lineage its
    checkpoints carry must name the samples trained on, or a later training on the new tokens resumes them."""
    from kantai_batch.fingerprint import checkpoint_lineage

    monkeypatch.setenv("KANTAI_LEASE_S", "6")
    remote = S3Uri.parse(f"s3://{bucket}/run")
    other, run = RunDir(tmp_path / "machine-b", remote), RunDir(tmp_path / "machine-a", remote)

    def commit_tokens(text: str) -> None:
        with other.committed(other.tokens) as out:
            (out / "tokens.json").write_text(text, encoding="utf-8")

    commit_tokens("first\n")
    run.require(run.tokens, "tokens", "tokenize")
    job = load_job(None, tiny_sets())
    trained_on = checkpoint_lineage(job, run)
    commit_tokens("second\n")
    assert checkpoint_lineage(job, run) == trained_on, "the tokens read, not the store's now"
    assert checkpoint_lineage(job, RunDir(tmp_path / "machine-c", remote)) != trained_on
