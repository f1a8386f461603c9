"""The tokenize phase: both splits tokenized once into memory-mapped Arrow shards that pretrain and evaluate read."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from datasets import load_from_disk

from helpers import TINY, invoke, prepared_run, tiny
from kantai_batch.data import build_split, tokens_mismatch
from kantai_batch.job import load_job
from kantai_batch.manifest import MARKER, file_sha256
from kantai_batch.model import load_tokenizer
from kantai_batch.pipeline import run_pipeline
from kantai_batch.rundir import RunDir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    return prepared_run(tmp_path_factory.mktemp("tokens") / "run", corpus_file)


def _tokenize(source: Path, target: Path, *args: str) -> Path:
    """A copy of the prepared run ``source`` in ``target``, tokenized with ``args``."""
    shutil.copytree(source, target)
    invoke("tokenize", "--run-dir", str(target), *args)
    return target


@pytest.mark.floors
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


@pytest.mark.floors
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


STEPS = ("train.max_steps=2", "train.save_steps=2", "train.per_device_batch_size=4")


@pytest.mark.slow
def test_pretrain_and_evaluate_read_the_tokens_not_the_text(prepared: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    shutil.rmtree(run_dir / "corpus")  # nothing left to tokenize: the samples can only come from tokens/
    # evaluate loads the model with torch's sdpa; training on a bf16 CPU runs eager attention, whose
    # rounding differs by about 1e-5. The same kernel on both sides leaves only the masks to differ.
    steps = (*STEPS, "train.attention=sdpa")
    invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*steps))
    assert (run_dir / "model" / MARKER).is_file()
    first, second = (
        json.loads(invoke("evaluate", "--run-dir", str(run_dir), "--json", *tiny(*steps)).stdout) for _ in range(2)
    )
    assert first["eval_loss"] == second["eval_loss"] and first["scored_tokens"] == second["scored_tokens"]
    eval_samples = load_from_disk(str(run_dir / "tokens" / "eval"))
    assert first["samples"] == len(eval_samples)
    assert first["scored_tokens"] == sum(label != -100 for labels in eval_samples["labels"] for label in labels) > 0
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    assert first["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5), "the masks training evaluated with"


@pytest.mark.slow
def test_pretrain_refuses_tokens_made_for_other_settings(prepared: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    args = tiny(*STEPS, "data.block_size=16")
    result = invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *args, expect=3)
    assert "were made for other settings (block_size 32 -> 16): run `kantai-batch tokenize` again" in result.stderr
    assert not (run_dir / "model").exists()


@pytest.mark.parametrize(("damaged", "command"), [("train", "pretrain"), ("eval", "evaluate"), ("json", "pretrain")])
def test_tokens_damaged_on_disk_are_a_one_line_error(prepared: Path, tmp_path: Path, damaged: str, command: str):
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    if command == "evaluate":
        invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny(*STEPS))
    # Damaged in place, at the size the manifest records (a file cut short is refused before it is read).
    damaged_file = (
        run_dir / "tokens" / "tokens.json"
        if damaged == "json"
        else next((run_dir / "tokens" / damaged).glob("data-*.arrow"))
    )
    size = damaged_file.stat().st_size
    damaged_file.write_bytes(b'{"splits": {"tra'.ljust(size) if damaged == "json" else bytes(size))
    untracked = ["--no-tracking"] if command == "pretrain" else []
    result = invoke(command, "--run-dir", str(run_dir), *untracked, *tiny(*STEPS), expect=3)
    error = result.stderr.strip().splitlines()[-1]  # after the model's loading bar, for evaluate
    assert error.startswith(f"kantai-batch: error: tokens {run_dir / 'tokens'} cannot be loaded: ")
    assert error.endswith("delete it and run `kantai-batch tokenize` again") and "Traceback" not in result.stderr
    assert (run_dir / "model").exists() == (command == "evaluate"), "nothing committed on damaged tokens"


def test_pretrain_needs_the_tokens(tmp_path: Path, corpus_file: Path):
    invoke("prepare", "--run-dir", str(tmp_path), "--corpus", str(corpus_file))
    invoke("train-tokenizer", "--run-dir", str(tmp_path), *tiny())
    result = invoke("pretrain", "--run-dir", str(tmp_path), "--no-tracking", *tiny(), expect=3)
    assert "run `kantai-batch tokenize` first" in result.stderr


@pytest.mark.slow
def test_run_tokenizes_once_and_again_only_when_the_samples_change(tmp_path: Path, corpus_file: Path):
    run = RunDir(tmp_path / "run")

    def job(*extra: str):
        return load_job(None, [*TINY, *STEPS, *extra], corpus=str(corpus_file))

    assert run_pipeline(job(), run, track=False) == ["prepare", "train-tokenizer", "tokenize", "pretrain", "evaluate"]
    assert run_pipeline(job(), run, track=False) == []
    assert run_pipeline(job("data.tokenize_workers=2"), run, track=False) == [], "workers change no sample"
    bookkeeping = job("train.preemption_grace_s=60", "train.logging_steps=7", "train.save_total_limit=3")
    assert run_pipeline(bookkeeping, run, track=False) == [], "bookkeeping changes no model"
    assert run_pipeline(job("train.mlm_probability=0.2"), run, track=False) == ["pretrain", "evaluate"]
    changed = job("data.block_size=16")
    assert run_pipeline(changed, run, track=False) == ["tokenize", "pretrain", "evaluate"]
    assert json.loads(run.tokens_stats.read_text())["splits"]["train"]["settings"]["block_size"] == 16


def test_the_eval_samples_fit_only_the_task_settings_and_tokenizer_they_were_made_with(prepared: Path):
    run = RunDir(prepared)
    tokenizer = load_tokenizer(prepared / "tokenizer")
    job = load_job(None, list(TINY))
    assert tokens_mismatch(run, job, "eval", tokenizer) is None
    # A causal LM's packed blocks end on text, a masked LM's on </s>: the train blocks differ too.
    assert tokens_mismatch(run, load_job(None, [*TINY, "task=clm"]), "train", tokenizer) == "task mlm -> clm"
    grouped = [*TINY, "data.mode=grouped"]
    assert tokens_mismatch(run, load_job(None, grouped), "train", tokenizer) == "mode packed -> grouped"
    assert tokens_mismatch(run, load_job(None, [*TINY, "task=clm"]), "eval", tokenizer) == "task mlm -> clm"
    assert tokens_mismatch(run, load_job(None, [*TINY, "eval.seed=7"]), "eval", tokenizer) == "seed 42 -> 7"
    assert tokens_mismatch(run, load_job(None, [*TINY, "train.seed=7"]), "eval", tokenizer) is None, "eval.seed's"
    trained_at_30 = load_job(None, [*TINY, "train.mlm_probability=0.3"])
    assert tokens_mismatch(run, trained_at_30, "eval", tokenizer) is None, "held-out masks follow eval's rate"
    scored_at_30 = load_job(None, [*TINY, "eval.mlm_probability=0.3"])
    assert tokens_mismatch(run, scored_at_30, "eval", tokenizer) == "mlm_probability 0.15 -> 0.3"
    other = load_tokenizer(prepared / "tokenizer")
    other.add_tokens(["Königsberg"])
    assert tokens_mismatch(run, job, "train", other) == "another tokenizer"


@pytest.mark.parametrize("train_rate", [0.15, 0.5])
def test_held_out_masks_are_drawn_at_the_eval_rate_whatever_training_uses(prepared: Path, train_rate: float):
    tokenizer = load_tokenizer(prepared / "tokenizer")
    job = load_job(None, [*TINY, f"train.mlm_probability={train_rate}"])
    samples = build_split(RunDir(prepared).eval_text, job, tokenizer, fix_masks=True, what="eval")
    special = set(tokenizer.all_special_ids)
    scored = masked = 0
    for ids, labels in zip(samples["input_ids"], samples["labels"], strict=True):
        for token, label in zip(ids, labels, strict=True):
            if label != -100:
                masked += 1
            # Only non-special tokens are candidates (a masked one shows its original id in the label).
            scored += (label if label != -100 else token) not in special
    assert scored > 500
    assert abs(masked / scored - job.eval.mlm_probability) < 0.04  # 3.5 sigma at 1,000 tokens; 0.5 is far off


def test_tokens_of_another_corpus_do_not_fit(prepared: Path, tmp_path: Path, corpus_file: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    job = load_job(None, list(TINY))
    assert tokens_mismatch(RunDir(run_dir), job, "train", tokenizer) is None
    invoke("prepare", "--run-dir", str(run_dir), "--corpus", str(corpus_file), "--set", "data.eval_fraction=0.3")
    assert tokens_mismatch(RunDir(run_dir), job, "train", tokenizer) == "another corpus"


@pytest.mark.slow
def test_evaluate_tokenizes_the_split_itself_only_for_samples_that_do_not_fit(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    stats_file = run_dir / "tokens" / "tokens.json"
    stats = json.loads(stats_file.read_text())
    stats["splits"]["eval"]["settings"]["seed"] = 7  # as if made with other masks
    stats_file.write_text(json.dumps(stats))
    marker_file = run_dir / "tokens" / MARKER  # and committed so: a file changed behind its manifest is refused
    marker = json.loads(marker_file.read_text())
    marker["files"]["tokens.json"] = {"size": stats_file.stat().st_size, "sha256": file_sha256(stats_file)}
    marker_file.write_text(json.dumps(marker))
    with caplog.at_level(logging.INFO, logger="kantai_batch.evaluate"):
        result = invoke("evaluate", "--run-dir", str(run_dir), "--json", *tiny())
    assert "do not fit this model (seed 7 -> 42); tokenizing the eval split" in caplog.text
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    assert json.loads(result.stdout)["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5), "the same masks"
