"""GPU tests: bf16 under DeepSpeed ZeRO-2 (two processes where there are two GPUs, else one), and
training steps that never make the host wait for the GPU.

Skipped on machines without CUDA (conftest); run wherever a GPU is available, e.g. `make test
PYTEST_ARGS="-m gpu -s"`, and record what it prints in the issue.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ROOT, invoke, prepared_run, tiny, torchrun

pytestmark = pytest.mark.gpu


def test_bf16_zero2_pretrains_on_the_gpus(tmp_path: Path, corpus_file: Path):
    import torch

    processes = min(2, torch.cuda.device_count())
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    config = ROOT / "jobs" / "deepspeed" / "zero2.json"
    done = torchrun(
        "pretrain", "--run-dir", str(run_dir), "--no-tracking",
        *tiny("train.precision=bf16", f"train.deepspeed={config}", "train.max_steps=60"),
        cwd=tmp_path, processes=processes,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    print("\nGPU smoke:", json.dumps({k: summary[k] for k in (
        "world_size", "parallelism", "precision", "train_loss", "eval_loss", "real_tokens_per_second", "mfu",
        "peak_memory_bytes")}))  # fmt: skip
    assert (summary["precision"], summary["parallelism"]) == ("bf16", "DeepSpeed ZeRO-2")
    assert summary["world_size"] == processes
    assert summary["eval_loss"] < summary["train_loss"] + 1.0 and summary["eval_loss"] < 6.5


def test_training_steps_never_make_the_host_wait_for_the_gpu(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
):
    # The host queues a step's kernels while the GPU runs the one before; any op that waits for the GPU
    # (a value read back, a data-dependent shape, a blocking copy of the next batch) idles it meanwhile.
    # torch's sync debug mode raises at such an op. On from the third step to the one before the last:
    # the first steps set up, and the last one logs and saves.
    import torch
    from transformers import TrainerCallback

    from kantai_batch.trainer import PretrainTrainer

    steps = 12

    class WaitsRaise(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                torch.cuda.set_sync_debug_mode("error")
            elif state.global_step == steps - 1:
                torch.cuda.set_sync_debug_mode("default")

    original = PretrainTrainer.__init__

    def with_callback(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(WaitsRaise())

    monkeypatch.setattr(PretrainTrainer, "__init__", with_callback)
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    overrides = (f"train.max_steps={steps}", "train.logging_steps=1000", "train.save_steps=1000")
    try:
        invoke("pretrain", "--run-dir", str(run_dir), "--no-tracking", *tiny("train.precision=bf16", *overrides))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    assert summary["sparse_prediction"] is True and summary["global_step"] == steps
