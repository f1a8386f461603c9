"""DeepSpeed ZeRO-2 and ZeRO-3 through the shipped configs: two CPU ranks under torchrun, resumed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import ROOT, invoke, prepared_run, tiny, torchrun
from kantai_batch.errors import JobConfigError
from kantai_batch.job import load_job
from kantai_batch.rundir import RunDir
from kantai_batch.s3 import S3Uri
from kantai_batch.train import require_shared_checkpoints

pytest.importorskip("deepspeed")

# fp32 so the saved weights evaluate to the loss measured in training, not to bf16's 3 digits.
STEPS = ("train.per_device_batch_size=4", "train.save_steps=10", "train.logging_steps=10", "train.precision=fp32")


@pytest.mark.slow
# ZeRO-2 alone is among the `floors` tests (make test-floors): DeepSpeed and accelerate at their lower bounds.
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.floors), 3])
def test_zero_trains_on_two_ranks_resumes_and_saves_a_whole_model(tmp_path: Path, corpus_file: Path, stage: int):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    config = ROOT / "jobs" / "deepspeed" / f"zero{stage}.json"
    # Resumed by `run`, as `make local-pretrain` and the CronJob do: its evaluation in the same processes
    # must leave DeepSpeed's state behind (below ZeRO-3 DeepSpeed refused to evaluate: exit 1 after training).
    for command, steps in (("pretrain", 20), ("run", 30)):
        done = torchrun(
            command, "--run-dir", str(run_dir), "--corpus", str(corpus_file), "--no-tracking",
            *tiny(*STEPS, f"train.deepspeed={config}", f"train.max_steps={steps}"),
            cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    assert summary["parallelism"] == f"DeepSpeed ZeRO-{stage}"
    assert (summary["world_size"], summary["global_batch_size"]) == (2, 8)
    assert (summary["resumed_from_step"], summary["global_step"]) == (20, 30)
    assert "resuming from" in done.stderr and "checkpoint-20" in done.stderr
    # The gradient norm is kept as DeepSpeed's tensor between log lines; each log line still gets it.
    state = json.loads((run_dir / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    norms = [entry["grad_norm"] for entry in state["log_history"] if "loss" in entry]
    assert len(norms) == 3 and all(isinstance(n, float) and 0 < n < float("inf") for n in norms), norms
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "checkpoint-30" / "global_step30").iterdir())
    optimizer_shards = [name for name in shards if name.endswith("optim_states.pt")]
    assert len(optimizer_shards) == 2 and any("rank_1_" in name for name in optimizer_shards), (
        f"each rank checkpoints its own optimizer shard: {shards}"
    )
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["eval_loss"] == pytest.approx(
        summary["eval_loss"], rel=0.02
    )
    # The saved model holds the trained weights (under ZeRO-3 gathered from both ranks): evaluated
    # alone, it scores the eval loss that training measured.
    # With the same job (train.deepspeed set): evaluate scores the whole model without DeepSpeed.
    invoke("evaluate", "--run-dir", str(run_dir), *tiny(*STEPS, f"train.deepspeed={config}"))
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(summary["eval_loss"], rel=0.02)
    assert metrics["eval_loss"] < 6.5, "trained, not the initial ~ln(vocab) loss"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ('{"zero_optimization": {"stage": 7}}', "stage 0-3"),
        ('{"zero_optimization": 2}', "stage 0-3"),
        ('{"zero_optimization": null}', "stage 0-3"),
        ('{"zero_optimization": {"stage": true}}', "stage 0-3"),
    ],
)
def test_a_bad_deepspeed_config_is_a_one_line_config_error(tmp_path: Path, content: str | None, message: str):
    config = tmp_path / "ds.json"
    if content is not None:
        config.write_text(content)
    run_dir = tmp_path / "run"
    result = invoke("pretrain", "--run-dir", str(run_dir), *tiny(f"train.deepspeed={config}"), expect=2)
    assert message in result.stderr and str(config) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_deepspeed_across_nodes_with_s3_checkpoints_is_refused(tmp_path: Path):
    job = load_job(overrides=["train.deepspeed=jobs/deepspeed/zero2.json"])
    remote = RunDir(tmp_path, S3Uri.parse("s3://bucket/run"))
    require_shared_checkpoints(job, remote, nodes=1)  # one node: every shard is on the disk that uploads
    with pytest.raises(JobConfigError, match="2 nodes"):
        require_shared_checkpoints(job, remote, nodes=2)
    require_shared_checkpoints(job, RunDir(tmp_path), nodes=2)


@pytest.mark.floors
def test_the_deepspeed_gradient_norm_is_not_read_back_every_step(monkeypatch: pytest.MonkeyPatch):
    # The Trainer turns DeepSpeed's norm into a float every step, which waits for the step on a GPU;
    # the log line reads it instead. Other norms go the Trainer's way.
    from accelerate.utils import DistributedType

    from kantai_batch.trainer import PretrainTrainer

    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self) or 0.0)
    trainer = PretrainTrainer.__new__(PretrainTrainer)
    trainer.accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    trainer.is_deepspeed_enabled = True
    norm = torch.tensor(1.5)
    assert trainer._get_grad_norm(None, norm) is norm and reads == []
    trainer.is_deepspeed_enabled = False
    trainer.accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    assert trainer._get_grad_norm(None, norm) is norm
