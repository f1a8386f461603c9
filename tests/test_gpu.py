"""GPU smoke test: bf16 under DeepSpeed ZeRO-2, two processes where there are two GPUs, else one.

Skipped on machines without CUDA (conftest); run wherever a GPU is available, e.g. `make test
PYTEST_ARGS="-m gpu -s"`, and record what it prints in the issue.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ROOT, prepared_run, tiny, torchrun

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
