"""The speed levers change how fast the model learns, not what it learns; throughput is reported."""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, RobertaConfig, RobertaForMaskedLM

from helpers import ROOT, SUPPORT_JOB, invoke, prepared_run, support_conversations, tiny, twcs_csv
from kantai_batch.errors import JobConfigError
from kantai_batch.hardware import cpu_supports_bf16, fastest_run, resolve_precision, training_flops_per_token
from kantai_batch.job import load_job
from kantai_batch.model import load_tokenizer, resolved_vocab_size
from kantai_batch.objective import MASKED_POSITIONS, REAL_TOKENS, LabelledCollator
from kantai_batch.trainer import PretrainTrainer, training_arguments


def _tiny_mlm(vocab: int = 300) -> RobertaForMaskedLM:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    return RobertaForMaskedLM(config)


def _masked_batch(vocab: int = 300) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (4, 32), generator=generator)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=generator) < 0.15
    labels[chosen] = ids[chosen]
    ids[chosen] = 4
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _pretrain_trainer(model: RobertaForMaskedLM, tmp_path: Path, *, sparse: bool) -> PretrainTrainer:
    args = training_arguments(load_job(None, ["train.precision=fp32"]), tmp_path)
    return PretrainTrainer(task="mlm", sparse=sparse, model=model, args=args)


@pytest.mark.parametrize("positions", ["from the collator", "found on the device"])
def test_sparse_prediction_gives_the_dense_loss_and_gradients(tmp_path: Path, positions: str):
    dense, sparse = _tiny_mlm(), _tiny_mlm()
    trainer = _pretrain_trainer(sparse, tmp_path, sparse=True)
    dense.train()
    sparse.train()
    batch = _masked_batch()
    dense_out = dense(**batch)  # RoBERTa's own loss: the mean over the masked tokens
    inputs = dict(batch)
    if positions == "from the collator":
        inputs[MASKED_POSITIONS] = _collated_positions(batch["labels"])
    sparse_loss, sparse_out = trainer.compute_loss(sparse, inputs, return_outputs=True)
    assert sparse_out.logits.shape[0] == int((batch["labels"] != -100).sum()), "the head ran on masked positions only"
    assert sparse_loss.item() == pytest.approx(dense_out.loss.item(), rel=1e-5)
    dense_out.loss.backward()
    sparse_loss.backward()
    for (name, p_dense), p_sparse in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert torch.allclose(p_dense.grad, p_sparse.grad, atol=1e-6), name


def _collated_positions(labels: torch.Tensor) -> torch.Tensor:
    tokenizer = SimpleNamespace(pad_token_id=1, mask_token="<mask>")
    features = [{"input_ids": ids, "labels": row} for ids, row in zip(labels.clamp(min=0), labels, strict=True)]
    batch = LabelledCollator(tokenizer, "mlm", 0.15, masked_positions=True)(features)
    assert "attention_mask" not in batch, "an all-ones mask is left out"
    return batch[MASKED_POSITIONS]


def test_the_collator_finds_the_masked_positions_on_the_host_when_asked():
    labels = _masked_batch()["labels"]
    positions = _collated_positions(labels)
    assert positions.dtype == torch.int64 and positions.device.type == "cpu"
    assert torch.equal(positions, (labels.reshape(-1) != -100).nonzero().squeeze(1))
    tokenizer = SimpleNamespace(pad_token_id=1, mask_token="<mask>")
    features = [{"input_ids": row.clamp(min=0), "labels": row} for row in labels]
    assert MASKED_POSITIONS not in LabelledCollator(tokenizer, "mlm", 0.15)(features)
    assert MASKED_POSITIONS not in LabelledCollator(tokenizer, "clm", 0.15, masked_positions=True)(features)


def test_the_collator_counts_the_real_tokens_on_the_host_when_asked():
    tokenizer = SimpleNamespace(pad_token_id=1, mask_token="<mask>")
    lengths = (5, 9, 3)
    lines = [{"input_ids": list(range(4, 4 + n)), "labels": [-100] * (n - 1) + [4]} for n in lengths]
    batch = LabelledCollator(tokenizer, "mlm", 0.15, real_tokens=True)(lines)
    assert batch["input_ids"].shape == (3, 16), "padded to a multiple of 8"
    assert batch[REAL_TOKENS] == sum(lengths) and isinstance(batch[REAL_TOKENS], int)
    # Full blocks: their all-ones mask is left out, and every token counts.
    blocks = [{"input_ids": list(range(4, 12)), "labels": [-100] * 7 + [4]} for _ in range(2)]
    batch = LabelledCollator(tokenizer, "mlm", 0.15, real_tokens=True)(blocks)
    assert "attention_mask" not in batch and batch[REAL_TOKENS] == 16
    assert REAL_TOKENS not in LabelledCollator(tokenizer, "mlm", 0.15)(blocks)


def test_the_sparse_head_compiles_into_one_graph_for_every_masked_count(tmp_path: Path):
    # A boolean gather inside the head is a data-dependent shape: torch.compile breaks its graph there
    # and the host waits for the encoder. With the collator's positions the model is one graph, compiled
    # once for any number of masked tokens. (The eager backend traces as inductor does, without codegen.)
    from torch._dynamo.utils import counters

    model = _tiny_mlm()
    reference = copy.deepcopy(model).train()
    trainer = _pretrain_trainer(model, tmp_path, sparse=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    compiled.train()
    generator = torch.Generator().manual_seed(3)
    counts = set()
    try:
        for _ in range(4):
            ids = torch.randint(5, 300, (4, 32), generator=generator)
            labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)
            batch = {"input_ids": torch.where(labels == -100, ids, 4), "labels": labels}
            counts.add(int((labels != -100).sum()))
            inputs = {**batch, MASKED_POSITIONS: _collated_positions(labels)}
            loss = trainer.compute_loss(compiled, inputs)
            assert loss.item() == pytest.approx(reference(**batch).loss.item(), rel=1e-5)
        assert len(counts) > 1, "the batches differ in their masked count"
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def test_on_a_gpu_host_batches_are_pinned_and_copied_without_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    job = load_job(None, ["train.precision=fp32"])
    assert training_arguments(job, tmp_path).accelerator_config.non_blocking is False
    monkeypatch.setattr("kantai_batch.trainer.has_accelerator", lambda: True)
    args = training_arguments(job, tmp_path)
    assert args.dataloader_pin_memory and args.accelerator_config.non_blocking


def test_sparse_prediction_leaves_evaluation_and_saving_standard(tmp_path: Path):
    model = _tiny_mlm()
    reference = copy.deepcopy(model).eval()
    trainer = _pretrain_trainer(model, tmp_path / "trainer", sparse=True)
    model.eval()
    batch = _masked_batch()
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert torch.equal(outputs.logits, reference(**batch).logits), "evaluation keeps per-position logits"
    assert loss.item() == pytest.approx(reference(**batch).loss.item(), rel=1e-5)
    assert torch.equal(model(**batch).logits, reference(**batch).logits), "outside the Trainer the model is standard"
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).architectures == ["RobertaForMaskedLM"]
    reloaded = RobertaForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(**batch).logits, reference(**batch).logits)


def test_vocab_auto_rounds_the_tokenizer_up_to_64():
    assert resolved_vocab_size(load_job(None), 8736) == 8768
    assert resolved_vocab_size(load_job(None), 8768) == 8768
    assert resolved_vocab_size(load_job(None, ["model.vocab_size=52000"]), 8736) == 52000
    with pytest.raises(JobConfigError, match="smaller than the tokenizer's 8736"):
        resolved_vocab_size(load_job(None, ["model.vocab_size=8000"]), 8736)


def test_flops_per_token_match_the_architecture():
    # The figures for KantaiBERT (6 x 768, block 128): ~505 MFLOP per trained token with
    # the dense 52,000-logit head, ~269 MFLOP with a right-sized vocabulary and a masked-only head.
    config = RobertaConfig(vocab_size=52_000, hidden_size=768, num_hidden_layers=6, intermediate_size=3072)
    assert training_flops_per_token(config, sequence_length=128, scored_fraction=1.0) / 1e6 == pytest.approx(505, 0.005)
    config.vocab_size = 8768
    assert training_flops_per_token(config, sequence_length=128, scored_fraction=0.15) / 1e6 == pytest.approx(
        269, 0.005
    )


class _FakeClock:
    """Time that moves only when a run says how long it took."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, iter(durations)

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        self.now += next(self.durations)


def test_the_matmul_peak_outlasts_a_busy_spell_on_the_machine():
    # The first 8 matmuls share the cores with another process (0.1 s each), the rest have them
    # alone (0.04 s): five tries in a row, as the peak was once measured, would all fall in the spell.
    clock = _FakeClock([0.1] * 8 + [0.04] * 1000)
    assert fastest_run(clock.run, min_seconds=1.0, clock=clock) == pytest.approx(0.04)
    assert 1.0 <= clock.now < 1.0 + 0.04 * 2, "the window ends soon after its second"
    # A device far faster than the window stops after max_repeats.
    clock = _FakeClock([1e-5] * 1000)
    assert fastest_run(clock.run, max_repeats=30, clock=clock) == pytest.approx(1e-5)
    assert clock.now == pytest.approx(30 * 1e-5)


@pytest.mark.parametrize(
    ("device", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 989e12 * 3 / 7),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 312e12 / 7),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", 65e12),
        ("NVIDIA RTX 6000 Ada Generation", None),
    ],
)
def test_the_data_sheet_peak_matches_whole_words_of_the_device_name(device: str, peak: float | None):
    from kantai_batch.hardware import data_sheet_peak

    assert data_sheet_peak(device) == peak


def test_precision_auto_follows_the_hardware():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert resolve_precision("auto") == expected


@pytest.mark.slow
def test_trained_run_used_the_levers_and_reports_throughput(trained_run: Path):
    summary = json.loads((trained_run / "model" / "train_summary.json").read_text())
    tokenizer_size = len(load_tokenizer(trained_run / "tokenizer"))
    assert summary["vocab_size"] == math.ceil(tokenizer_size / 64) * 64
    assert summary["sparse_prediction"] is True and summary["precision"] == resolve_precision("auto")
    assert AutoConfig.from_pretrained(trained_run / "model").architectures == ["RobertaForMaskedLM"]
    assert summary["steady_tokens_per_second"] > 0 and summary["step_time_s"] > 0
    assert 0 < summary["mfu"] < 1 and 0 < summary["steady_mfu"] < 1
    assert summary["flops_per_token"] > 0 and summary["peak_memory_bytes"] > 2**20
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "real_tokens_per_second")
    assert len(history) == 8 and all(m.value > 0 for m in history), "logged with every loss line"


@pytest.mark.slow
def test_bench_measures_the_job_and_the_recipe_side_by_side(tmp_path: Path, corpus_file: Path):
    out = tmp_path / "results"
    result = invoke(
        "bench", "--run-dir", str(tmp_path / "run"), "--corpus", str(corpus_file), *tiny(),
        "--steps", "3", "--baseline", "recipe", "--out", str(out),
    )  # fmt: skip
    (record_file,) = out.glob("kantaibert-*.json")
    record = json.loads(record_file.read_text())
    job, recipe = record["results"]
    assert (job["name"], recipe["name"]) == ("job", "recipe")
    assert (recipe["vocab_size"], recipe["data_mode"], recipe["precision"]) == (52_000, "line_by_line", "fp32")
    assert recipe["sparse_prediction"] is False and recipe["dropout"] == 0.1
    assert job["vocab_size"] < 1024 and job["data_mode"] == "packed" and job["sparse_prediction"] is True
    assert job["global_step"] == recipe["global_step"] == 3
    ratio = job["steady_tokens_per_second"] / recipe["steady_tokens_per_second"]
    assert record["speedup"]["steady_tokens_per_second"] == pytest.approx(ratio)
    for row in (job, recipe):
        assert row["eval_loss_packed"] > 0 and row["eval_loss_lines"] > 0 and row["peak_memory_bytes"] > 0
    assert "speedup over the recipe" in result.stdout and str(record_file) in result.stdout


@pytest.mark.slow
def test_profile_steps_says_where_the_step_time_goes(tmp_path: Path, corpus_file: Path):
    prepared = prepared_run(tmp_path / "prepared", corpus_file)
    short = shutil.copytree(prepared, tmp_path / "short")
    run = shutil.copytree(prepared, tmp_path / "run")
    invoke("pretrain", "--run-dir", str(run), "--no-tracking", *tiny("train.max_steps=12", "train.profile_steps=3"))
    profile = json.loads((run / "model" / "train_summary.json").read_text())["profile"]
    assert profile["steps"] == 3 and profile["clock"] == ("device" if torch.cuda.is_available() else "cpu")
    names = [op["name"] for op in profile["top_ops"]]
    assert "aten::addmm" in names or "aten::mm" in names, names
    assert 0 < profile["matmul_share"] < 1 and 0 < profile["total_ms_per_step"]
    # The step's wall time holds the time its ops (or kernels) took.
    assert profile["total_ms_per_step"] <= 1.25 * profile["wall_ms_per_step"]
    assert sum(op["share"] for op in profile["top_ops"]) <= 1 + 1e-9
    assert Path(profile["trace"]) == run / "profile" / "trace-rank0.json"
    trace = json.loads(Path(profile["trace"]).read_text())
    # The training steps after the first 5, each marked in the trace.
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#5", "ProfilerStep#6", "ProfilerStep#7"}, steps

    # A run that ends before the profiled steps (right after the skipped 5) reports no profile and writes no trace.
    invoke("pretrain", "--run-dir", str(short), "--no-tracking", *tiny("train.max_steps=5", "train.profile_steps=3"))
    assert json.loads((short / "model" / "train_summary.json").read_text())["profile"] is None
    assert not (short / "profile").exists()


def _device_reads(
    run_dir: Path, steps: int, monkeypatch: pytest.MonkeyPatch, job: str | None, *extra: str
) -> collections.Counter:
    """Where pretraining reads a tensor's value back to Python (on a GPU each such read waits for the step)."""
    reads: collections.Counter = collections.Counter()

    def counting(name: str):
        read = getattr(torch.Tensor, name)

        def counted(tensor, *args, **kwargs):
            caller = frame = sys._getframe(1)
            while frame is not None and "torch/utils/data/" not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is None:  # not while a batch is made: on a GPU host that is a worker's CPU tensors
                reads[f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            return read(tensor, *args, **kwargs)

        return counted

    class DataDependentShapes(TorchDispatchMode):
        # Ops whose output size depends on tensor values: the host learns it only by waiting for them.
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            boolean_index = func is torch.ops.aten.index.Tensor and any(
                index is not None and index.dtype == torch.bool for index in args[1]
            )
            if boolean_index or func in _DATA_DEPENDENT_SHAPES:
                frame = sys._getframe(1)
                while frame is not None and "torch/utils/data/" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is None:
                    reads[f"{'boolean index' if boolean_index else func}"] += 1
            return func(*args, **kwargs)

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    try:
        overrides = (*extra, f"train.max_steps={steps}", "train.logging_steps=1000", "train.save_steps=1000")
        with DataDependentShapes():
            invoke("pretrain", "--run-dir", str(run_dir), *(("--job", job) if job else ()), *tiny(*overrides))
    finally:
        monkeypatch.undo()
    return reads


_DATA_DEPENDENT_SHAPES = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
}


@pytest.mark.slow
@pytest.mark.parametrize("job", ["kantaibert", "customer-support", "kantaibert-lines"])
def test_a_training_step_reads_nothing_back_between_log_lines(
    tmp_path: Path, corpus_file: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch, job: str
):
    # Each job's own data path in one process (a masked and a causal LM on full blocks), and padded
    # lines. Steps between log lines may only queue work: the Trainer's NaN filter and its token count
    # each read a value back every step, and a boolean gather of the masked positions (sparse head and
    # loss) must learn its size from the device.
    job_file = SUPPORT_JOB if job == "customer-support" else None
    extra = ("data.mode=line_by_line",) if job == "kantaibert-lines" else ()
    if job_file:
        corpus_file = twcs_csv(tmp_path / "twcs.csv", support_conversations(300))
    runs = {steps: prepared_run(tmp_path / f"steps-{steps}", corpus_file, *extra, job=job_file) for steps in (3, 9)}
    short = _device_reads(runs[3], 3, monkeypatch, job_file, *extra)
    long = _device_reads(runs[9], 9, monkeypatch, job_file, *extra)
    per_step = {site: (long[site] - short[site]) / 6 for site in long if long[site] != short[site]}
    if extra:
        # A padded batch's mask: transformers asks whether it is all ones before each forward, a read
        # outside this project (traced away under torch.compile). Nothing else may read.
        transformers_mask = {site for site in per_step if site.startswith("__bool__") and "masking_utils.py" in site}
        assert len(transformers_mask) == 1, per_step
        per_step = {site: n for site, n in per_step.items() if site not in transformers_mask}
    assert per_step == {}, "tensor values read back every training step"


def test_real_tokens_per_second_leave_out_evaluations(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from kantai_batch.throughput import ThroughputCallback

    # Made at 0, training begins at 0, steps end at 1 and 2, an evaluation of 10 s ends at 12, a step at 13.
    clock = iter([0.0, 0.0, 1.0, 2.0, 12.0, 13.0, 13.0])
    monkeypatch.setattr("kantai_batch.throughput.time.perf_counter", lambda: next(clock))
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0)
    args = SimpleNamespace(per_device_train_batch_size=1, world_size=1)
    meter = ThroughputCallback(flops_per_token=1.0, peak_flops=1.0, world_size=1)
    meter.on_train_begin(args, state, None)
    for moment in ("step", "step", "evaluate", "step"):
        if moment == "step":
            state.num_input_tokens_seen += 100
            state.global_step += 1
            meter.on_step_end(args, state, None)
        else:
            meter.on_evaluate(args, state, None)
    meter.on_train_end(args, state, None)
    assert meter.summary()["real_tokens_per_second"] == pytest.approx(300 / 3), "3 s of training, not 13"


def test_on_a_gpu_steps_are_timed_by_the_devices_events_not_the_host_clock(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from kantai_batch.throughput import ThroughputCallback

    # The host queues steps in 1 ms and waits 0.5 s at every sixth (a log line reads the loss); the device
    # ends a step every 100 ms, and an evaluation of 10 s sits between steps 12 and 13.
    device = {"now": 0.0}

    class Event:
        def record(self):
            self.at = device["at"]

        def query(self):
            return device["now"] >= self.at

        def elapsed_time(self, other):
            return 1000 * (other.at - self.at)

    host = {"now": 0.0}
    monkeypatch.setattr("kantai_batch.throughput.time.perf_counter", lambda: host["now"])
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0)
    args = SimpleNamespace(per_device_train_batch_size=1, world_size=1)
    meter = ThroughputCallback(flops_per_token=1.0, peak_flops=1.0, world_size=1, events=Event)
    meter.on_train_begin(args, state, None)
    for step in range(1, 25):
        device["at"] = 0.1 * step + (10.0 if step > 12 else 0.0)
        host["now"] += 0.5 if step % 6 == 0 else 0.001
        device["now"] = device["at"] - 0.4  # the device runs behind what the host has queued
        state.num_input_tokens_seen += 100
        meter.on_step_end(args, state, None)
        if step == 12:
            meter.on_evaluate(args, state, None)
    device["now"] = float("inf")
    meter.on_train_end(args, state, None)
    summary = meter.summary()
    # 22 step times (not the first, not the one across the evaluation), each 0.1 s on the device.
    assert summary["step_time_s"] == pytest.approx(0.1)
    assert summary["steady_tokens_per_second"] == pytest.approx(1000) and summary["warmup_steps"] == 0
    # The host clock would have said 1 ms a step, and left the log lines' waits out as warm-up.
    host_timed = ThroughputCallback(flops_per_token=1.0, peak_flops=1.0, world_size=1, events=None)
    host["now"], state.num_input_tokens_seen = 0.0, 0
    host_timed.on_train_begin(args, state, None)
    for step in range(1, 25):
        host["now"] += 0.5 if step % 6 == 0 else 0.001
        state.num_input_tokens_seen += 100
        host_timed.on_step_end(args, state, None)
    host_timed.on_train_end(args, state, None)
    assert host_timed.summary()["step_time_s"] == pytest.approx(0.001)


def test_peak_memory_on_a_cpu_is_the_process_own_not_its_parents(tmp_path: Path):
    """A rank or a bench worker is forked from a launcher that has torch loaded: its rusage reported
    the parent's peak when that was higher than its own."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys\n"
        "held = b'x' * (1 << 30)  # written: 1 GiB resident in the parent\n"
        "child = 'from kantai_batch.throughput import peak_memory_bytes; print(peak_memory_bytes())'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert 2**20 < int(done.stdout) < 800 << 20, f"{int(done.stdout) / 2**20:.0f} MiB"
