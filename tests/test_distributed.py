"""Data-parallel pretraining with torchrun: two CPU ranks over gloo on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from datasets import Dataset

from helpers import (
    ROOT,
    assert_resumed_like_uninterrupted,
    free_port,
    invoke,
    killed_after,
    prepared_run,
    tiny,
    torchrun,
)
from kantai_batch.order import EpochOrder

pytestmark = pytest.mark.slow

# fp32 so that one process and two agree to rounding, not to bf16's 3 significant digits.
STEPS = ("train.max_steps=30", "train.save_steps=10", "train.logging_steps=10", "train.precision=fp32")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "model" / "train_summary.json").read_text())


@pytest.mark.floors
def test_two_ranks_run_every_phase_once(tmp_path: Path, corpus_file: Path):
    run_dir = tmp_path / "run"
    done = torchrun(
        "run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), *tiny("train.per_device_batch_size=4", *STEPS),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["world_size"] == 2 and summary["global_step"] == 30
    assert summary["nodes"] == 1, "two processes of one machine"
    assert summary["real_tokens_trained"] == 30 * 2 * 4 * 32, "both ranks' tokens count"
    assert (run_dir / "eval" / "metrics.json").is_file()
    assert done.stdout.count("Human thinking involves human <mask>.\n") == 1, "only the main process prints"
    assert not list(run_dir.glob(".*partial*")), "one writer per folder"
    runs = mlflow.search_runs(experiment_names=["kantaibert"], filter_string=f"tags.`kantai.run_dir` = '{run_dir}'")
    assert len(runs) == 1, "rank 0 alone logs to MLflow"


def test_two_ranks_learn_what_one_process_learns_with_the_same_global_batch(tmp_path: Path, corpus_file: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir in (one, two):
        prepared_run(run_dir, corpus_file)
    single = subprocess.run(
        [sys.executable, "-m", "kantai_batch", "pretrain", "--run-dir", str(one), "--no-tracking",
         *tiny("train.per_device_batch_size=8", *STEPS)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    done = torchrun("pretrain", "--run-dir", str(two), "--no-tracking", *tiny("train.per_device_batch_size=4", *STEPS),
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    alone, together = _summary(one), _summary(two)
    assert (alone["world_size"], together["world_size"]) == (1, 2)
    # Same global batch (8) and steps; the ranks see other samples in another order, so the losses
    # agree closely but not exactly. A loss scaled by the world size (a real bug once) is 2x off.
    assert together["train_loss"] == pytest.approx(alone["train_loss"], rel=0.02)
    assert together["eval_loss"] == pytest.approx(alone["eval_loss"], rel=0.02)


def test_two_ranks_count_the_real_tokens_of_their_padded_lines_once(tmp_path: Path, corpus_file: Path):
    # Each rank pads its own batch of lines to its longest: the count is every rank's tokens without
    # the padding, summed on the host (neither one rank's count times two nor the padded shape).
    lines = ("data.mode=line_by_line",)
    run_dir = prepared_run(tmp_path / "run", corpus_file, *lines)
    settings = tiny(*lines, "train.per_device_batch_size=4", *STEPS)
    done = torchrun("pretrain", "--run-dir", str(run_dir), "--no-tracking", *settings, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lengths = [len(ids) for ids in Dataset.load_from_disk(str(run_dir / "tokens" / "train"))["input_ids"]]
    assert len(set(lengths)) > 1 and len(lengths) > 30 * 8, "lines of several lengths, one epoch"
    # The global batches are the epoch order's consecutive runs of 8, 4 to each rank.
    seen = list(EpochOrder(len(lengths), 42, multiple=8))[: 30 * 8]
    assert _summary(run_dir)["real_tokens_trained"] == sum(lengths[i] for i in seen)


def test_two_ranks_resumed_mid_epoch_train_on_exactly_the_uninterrupted_batches(tmp_path: Path, corpus_file: Path):
    # A global batch of 8 (4 a rank) over an epoch that does not divide into it: the last round of
    # the epoch is padded from the order's start, and the resumed run must pad it the same way.
    job = tiny("train.per_device_batch_size=4", "train.max_steps=60", "train.save_steps=25",
               "train.save_total_limit=5", "train.logging_steps=1")  # fmt: skip
    whole = prepared_run(tmp_path / "whole", corpus_file)
    done = torchrun("pretrain", "--run-dir", str(whole), "--no-tracking", *job, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    train_blocks = len(Dataset.load_from_disk(str(whole / "tokens" / "train")))
    assert 25 < train_blocks / 8 < 60 and train_blocks % 8, train_blocks

    resumed = killed_after(whole, tmp_path / "resumed", 25)
    # One process would place the resumed steps' samples by half the global batch: refused, nothing lost.
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    refused = invoke("pretrain", "--run-dir", str(resumed), "--no-tracking", *job, expect=2)
    assert "was trained by 2 processes and this run has 1" in refused.stderr
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == kept
    done = torchrun("pretrain", "--run-dir", str(resumed), "--no-tracking", *job, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_resumed_like_uninterrupted(whole, resumed, resumed_from=25, last=60)


def test_two_diverging_ranks_stop_at_the_same_step_without_saving(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    settings = tiny("train.per_device_batch_size=4", *STEPS, "train.learning_rate=1e30")
    done = torchrun("pretrain", "--run-dir", str(run_dir), "--no-tracking", *settings, cwd=tmp_path)
    # Each rank read the same gathered loss at the first log line and stopped there, none waiting in a
    # collective for the other (the run ends within torchrun's timeout). A rank that has not printed its
    # line by the time the first one exits is stopped by torchrun, so one line or two, all alike.
    assert done.returncode != 0 and re.search(r"exitcode\s*: 6 ", done.stderr), done.stderr[-3000:]
    errors = [line.split(";")[0] for line in done.stderr.splitlines() if line.startswith("kantai-batch: error: ")]
    assert errors and set(errors) == {"kantai-batch: error: pretrain diverged by step 10 (loss nan, grad_norm nan)"}
    assert not (run_dir / "model").exists() and not list((run_dir / "checkpoints").glob("checkpoint-*"))


def test_the_others_wait_for_the_main_process_data_work_past_the_collective_timeout(tmp_path: Path, corpus_file: Path):
    """Preparing and tokenizing a large corpus takes hours while the other ranks wait: that wait is not a
    collective of the training, whose timeout (10 s here) bounds a lost rank."""
    from kantai_batch.phases import phase

    (tmp_path / "slow_phase.py").write_text(
        "import importlib, time\n"
        "def prepare(job, run):\n"
        "    time.sleep(15)  # the main process's data work, longer than the collective timeout\n"
        f"    module, _, name = {phase('prepare').runner!r}.partition(':')\n"
        "    return getattr(importlib.import_module(module), name)(job, run)\n"
    )
    (tmp_path / "pipeline.py").write_text(
        "import dataclasses, pathlib, sys\n"
        "from kantai_batch.distributed import distributed_state\n"
        "from kantai_batch.job import load_job\n"
        "from kantai_batch.phases import phase\n"
        "from kantai_batch.pipeline import run_pipeline\n"
        "from kantai_batch.rundir import RunDir\n"
        "job = load_job(None, sys.argv[2:])\n"
        "state = distributed_state(job.train.collective_timeout_s)\n"
        "slow = dataclasses.replace(phase('prepare'), runner='slow_phase:prepare')\n"
        "ran = run_pipeline(job, RunDir.from_uri(sys.argv[1]), track=False, phases=[slow])\n"
        "pathlib.Path(f'ran-by-{state.process_index}').write_text(repr(ran))\n"
    )
    overrides = [f"corpus.source={corpus_file}", "train.collective_timeout_s=10"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "pipeline.py", str(tmp_path / "run"), *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank reports in its own file: two ranks printing to one pipe interleave (PYTHONUNBUFFERED writes piecemeal)
    assert [(tmp_path / f"ran-by-{rank}").read_text() for rank in (0, 1)] == ["['prepare']", "[]"]
    assert (tmp_path / "run" / "corpus" / "_COMPLETE").is_file()
