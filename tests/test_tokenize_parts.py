"""tokenize in parts (the pods of an Indexed Job): the committed tokens are the ones one process makes."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from datasets import load_from_disk

from helpers import TINY, invoke, kantian_text, prepared_run, tiny
from kantai_batch import tokenize_parts
from kantai_batch.manifest import MARKER, is_complete, read_marker
from kantai_batch.rundir import RunDir

# More paragraphs than one run of packed rows (1,000), so the parts really cut the train split.
PARAGRAPHS = 2600


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parts-corpus") / "kantian.txt"
    path.write_text(kantian_text(PARAGRAPHS, seed=3), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, big_corpus: Path) -> Path:
    """A prepared run whose tokens/ one process made: the reference the parts must match."""
    return prepared_run(tmp_path_factory.mktemp("parts") / "run", big_corpus)


def _copy_without_tokens(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("tokens"))
    return target


def _part(run_dir: str, index: int, count: int, *extra: str, expect: int = 0):
    return invoke("tokenize", "--run-dir", run_dir, "--part", str(index), "--parts", str(count), *tiny(*extra),
                  expect=expect)  # fmt: skip


def _assert_same_tokens(made: Path, reference: Path) -> None:
    for split in ("train", "eval"):
        ours, theirs = (load_from_disk(str(run / "tokens" / split)) for run in (made, reference))
        assert ours.features == theirs.features, split
        assert ours.to_dict() == theirs.to_dict(), split
    stats = [json.loads((run / "tokens" / "tokens.json").read_text()) for run in (made, reference)]
    assert stats[0] == stats[1]
    assert read_marker(made / "tokens")["inputs_sha256"] == read_marker(reference / "tokens")["inputs_sha256"]
    # Byte for byte: a checkpoint's lineage digests these files, so a training resumed after its tokens
    # were made again the other way started over (datasets' state.json differed).
    assert read_marker(made / "tokens")["files"] == read_marker(reference / "tokens")["files"]


@pytest.mark.floors
@pytest.mark.parametrize("count", [2, 4])
def test_the_parts_commit_the_tokens_one_process_makes_once_all_are_in(prepared: Path, tmp_path: Path, count: int):
    run_dir = _copy_without_tokens(prepared, tmp_path / "run")
    train_rows = json.loads((prepared / "tokens" / "tokens.json").read_text())["splits"]["train"]["samples"]
    assert train_rows > 0
    # Pods finish in any order; until the last part is in, nothing is committed.
    order = list(reversed(range(count)))
    for done, index in enumerate(order, start=1):
        _part(str(run_dir), index, count)
        if done < count:
            assert not (run_dir / "tokens").exists()
            assert (run_dir / "tokens-parts" / f"part-{index:05d}-of-{count:05d}" / MARKER).is_file()
    assert (run_dir / "tokens" / MARKER).is_file()
    assert not (run_dir / "tokens-parts").exists(), "the parts go once tokens/ is committed from them"
    _assert_same_tokens(run_dir, prepared)


def test_a_rerun_of_one_index_commits_after_the_claimant_died(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run_dir = _copy_without_tokens(prepared, tmp_path / "run")
    _part(str(run_dir), 0, 3)
    _part(str(run_dir), 1, 3)

    def killed(*args, **kwargs):
        raise RuntimeError("pod killed while committing")

    with monkeypatch.context() as patch:
        patch.setattr(tokenize_parts, "_commit", killed)
        with pytest.raises(RuntimeError, match="pod killed"):
            _part(str(run_dir), 2, 3)
    claims = list((run_dir / "tokens-parts").glob("_COMMIT-*"))
    assert len(claims) == 1 and not (run_dir / "tokens").exists(), "claimed, never committed"
    # A pod rerunning any index completes a new set of parts, which nobody has claimed.
    _part(str(run_dir), 1, 3)
    _assert_same_tokens(run_dir, prepared)


def test_bad_part_options_are_one_line_errors(prepared: Path, tmp_path: Path):
    run_dir = _copy_without_tokens(prepared, tmp_path / "run")
    result = _part(str(run_dir), 3, 3, expect=2)
    assert "kantai-batch: error: tokenize: part 3 of 3 does not exist: parts are numbered 0 to 2" in result.stderr
    _part(str(run_dir), 0, 3)
    result = _part(str(run_dir), 1, 2, expect=2)
    assert "part-00000-of-00003, a part of these inputs in 3 parts, not 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # Parts made for other settings are not this set's: another submission may start over.
    _part(str(run_dir), 0, 2, "data.block_size=16")
    assert not (run_dir / "tokens").exists()


def test_only_one_of_the_processes_racing_for_a_claim_gets_it(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    _race_for(run, run.tokens_parts / "_COMMIT-x")


def _race_for(run: RunDir, path: Path, racers: int = 8) -> None:
    won: list[bool] = []
    start = threading.Barrier(racers)

    def racer() -> None:
        start.wait()
        won.append(run.claim(path, "me\n"))

    threads = [threading.Thread(target=racer) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won) == [False] * (racers - 1) + [True]
    assert run.claim(path, "late\n") is False


def test_parts_against_an_s3_run_dir_commit_what_one_process_makes(
    prepared: Path, tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
):
    import boto3

    from kantai_batch.manifest import upload

    s3_run = f"s3://{bucket}/runs/parts"
    # The prepared corpus and tokenizer, committed to S3 as prepare and train-tokenizer commit them.
    for folder in ("corpus", "tokenizer"):
        upload(prepared / folder, RunDir.from_uri(s3_run).remote.child(folder))
    _race_for(RunDir.from_uri(s3_run), RunDir.from_uri(s3_run).tokens_parts / "_COMMIT-race")
    # Each pod has a disk of its own: its own mirror of the run dir.
    for index in (1, 0):
        monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / f"pod-{index}"))
        _part(s3_run, index, 2)
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/parts/")["Contents"]]
    assert "runs/parts/tokens/_COMPLETE" in keys
    assert not [key for key in keys if key.startswith("runs/parts/tokens-parts/")], "the parts are removed"
    monkeypatch.setenv("KANTAI_CACHE_DIR", str(tmp_path / "reader"))
    reader = RunDir.from_uri(s3_run)
    local = reader.require(reader.tokens, "tokens", "tokenize")
    _assert_same_tokens(local.parent, prepared)


def test_a_part_that_changes_under_the_committer_is_a_retryable_error(prepared: Path, tmp_path: Path):
    """A rerun of an index re-commits its part (marker gone first) while another pod commits the old set."""
    from kantai_batch.errors import SourceUnavailableError
    from kantai_batch.job import load_job
    from kantai_batch.model import load_tokenizer

    run_dir = _copy_without_tokens(prepared, tmp_path / "run")
    _part(str(run_dir), 0, 2)
    run = RunDir(run_dir)
    (run.tokens_part(1, 2) / "train").mkdir(parents=True)  # being rewritten: no marker yet
    job = load_job(None, list(TINY))
    with pytest.raises(SourceUnavailableError, match="a part changed while tokens/ was committed from it"):
        claimed = {0: run.marker(run.tokens_part(0, 2)), 1: {}}
        tokenize_parts._commit(job, run, load_tokenizer(run.tokenizer), "inputs", 2, None, claimed=claimed)
    assert not (run_dir / "tokens").exists()


def test_a_part_of_another_job_written_after_the_claim_is_not_committed(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Part folders are named by index and count alone: another job's pod (other data settings) may commit
    its part over one of this set between the claim and the commit. Its samples must not be committed as
    this job's tokens."""
    run_dir = _copy_without_tokens(prepared, tmp_path / "run")
    _part(str(run_dir), 0, 2)
    real_claim = RunDir.claim

    def claimed_then_replaced(self, path, note):
        won = real_claim(self, path, note)
        if won:
            _part(str(run_dir), 0, 2, "data.block_size=16")  # the other job's pod: 1 of its 2 parts
        return won

    monkeypatch.setattr(RunDir, "claim", claimed_then_replaced)
    result = _part(str(run_dir), 1, 2, expect=4)
    assert "part 0 of 2" in result.stderr and "was replaced since the set was claimed" in result.stderr
    assert not (run_dir / "tokens").exists(), "tokens of block_size 32 committed with a part of block_size 16"


def test_a_part_retried_after_its_set_was_committed_leaves_nothing_behind(prepared: Path, tmp_path: Path):
    """A pod killed after committing its part, retried once the other pod committed tokens/ from the set
    (and cleared the parts): its part stayed for good, and a later parts run of another size on these
    inputs was refused (exit 2, a failed Job)."""
    run_dir = _copy_without_tokens(prepared, tmp_path / "run")
    _part(str(run_dir), 1, 2)
    _part(str(run_dir), 0, 2)  # completes the set: tokens/ committed, tokens-parts/ cleared
    assert is_complete(run_dir / "tokens")
    _part(str(run_dir), 1, 2)  # the retried pod
    parts = run_dir / "tokens-parts"
    assert not parts.exists() or not [p for p in parts.iterdir() if p.is_dir()], "no part left behind"


def test_a_finished_sets_leftover_part_is_removed_not_a_reason_to_refuse_another_size(prepared: Path, tmp_path: Path):
    leftover = _copy_without_tokens(prepared, tmp_path / "leftover")
    _part(str(leftover), 1, 2)
    shutil.copytree(prepared / "tokens", leftover / "tokens")
    _part(str(leftover), 0, 4)
    assert not (leftover / "tokens-parts" / "part-00001-of-00002").exists()
