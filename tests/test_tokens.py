"""The tokenize phase: both splits tokenized once into memory-mapped Arrow shards that pretrain and evaluate read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from helpers import TINY, invoke, prepared_run, tiny
from kantai_batch.data import build_split
from kantai_batch.job import load_job
from kantai_batch.manifest import MARKER
from kantai_batch.model import load_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    return prepared_run(tmp_path_factory.mktemp("tokens") / "run", corpus_file)


def _tokenize(source: Path, target: Path, *args: str) -> Path:
    """A copy of the prepared run ``source`` in ``target``, tokenized with ``args``."""
    import shutil

    shutil.copytree(source, target)
    invoke("tokenize", "--run-dir", str(target), *args)
    return target


@pytest.mark.parametrize("mode", ["packed", "line_by_line"])
def test_tokenize_writes_both_splits_as_the_start_up_tokenization_did(prepared: Path, tmp_path: Path, mode: str):
    run_dir = _tokenize(prepared, tmp_path / "run", *tiny(f"data.mode={mode}"))
    assert (run_dir / "tokens" / MARKER).is_file()
    stats = json.loads((run_dir / "tokens" / "tokens.json").read_text())
    job = load_job(None, [*TINY, f"data.mode={mode}"])
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    for split, text, masked in (("train", "train.txt", False), ("eval", "eval.txt", True)):
        samples = load_from_disk(str(run_dir / "tokens" / split))
        expected = build_split(run_dir / "corpus" / text, job, tokenizer, fix_masks=masked, what=split)
        assert samples["input_ids"] == expected["input_ids"], split
        assert stats["splits"][split]["samples"] == len(samples) > 0
        assert stats["splits"][split]["tokens"] == sum(len(ids) for ids in samples["input_ids"])
        assert stats["splits"][split]["settings"]["mode"] == mode
    # The eval samples carry their fixed masks; training samples are masked anew per batch.
    assert "labels" in load_from_disk(str(run_dir / "tokens" / "eval")).column_names
    assert "labels" not in load_from_disk(str(run_dir / "tokens" / "train")).column_names
    if mode == "packed":
        assert stats["splits"]["train"]["tokens"] == 32 * stats["splits"]["train"]["samples"]


def test_two_workers_make_the_same_samples_as_one(prepared: Path, tmp_path: Path):
    one = _tokenize(prepared, tmp_path / "one", *tiny(), "--workers", "1")
    two = _tokenize(prepared, tmp_path / "two", *tiny(), "--workers", "2")
    for split in ("train", "eval"):
        first, second = (load_from_disk(str(run / "tokens" / split)) for run in (one, two))
        assert first.column_names == second.column_names
        assert first.to_dict() == second.to_dict(), split


def test_tokenize_needs_the_tokenizer(tmp_path: Path, corpus_file: Path):
    invoke("prepare", "--run-dir", str(tmp_path), "--corpus", str(corpus_file))
    result = invoke("tokenize", "--run-dir", str(tmp_path), *tiny(), expect=3)
    assert "run `kantai-batch train-tokenizer` first" in result.stderr
    assert not (tmp_path / "tokens").exists()
