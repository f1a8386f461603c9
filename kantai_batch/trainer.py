"""The HF Trainer as pretraining extends it: the masked LM's loss and sparse head, a re-plannable schedule.

Each extension but the last two goes through a door the Trainer's authors left for it, so nothing is
patched on a live object and the model stays a standard ``RobertaForMaskedLM`` /
``RobertaForCausalLM``:

- The masked LM's loss is the Trainer's ``compute_loss_func``: the summed cross-entropy over the
  masked tokens divided by the number of masked tokens in the whole global batch, which the Trainer
  counts over every gradient-accumulation step and process. So the gradient is the token mean over
  the global batch whatever the world size (RoBERTa's own loss is a per-process mean that the
  Trainer would multiply by the number of processes).
- Sparse prediction: while training, a forward pre-hook on the LM head hands it the masked
  positions only. The head (a dense layer and the vocabulary projection) is the model's widest
  matmul, and with the job's 30% masking 70% of its output is thrown away by the loss; gathering first gives
  the same loss for a fraction of the work, as ModernBERT's ``sparse_prediction`` does. The hook
  runs inside the model's own forward, so DDP and DeepSpeed see an ordinary forward; evaluation
  keeps the per-position logits the accuracy metric reads. The positions come with the batch
  (``objective.MASKED_POSITIONS``, found by the collator on the host), so the gather is an
  ``index_select`` of a size the host knows: a boolean mask would make the host wait for the
  encoder's forward to learn how many rows it selects, and break ``torch.compile``'s graph there.
- A time budget's schedule (``budget.PlannedSchedule``) through ``create_scheduler``.
- The Trainer's NaN filter off (its check reads the loss back every step, and it would hide a diverged
  run, which ``stopping.StopAgreement`` stops instead). The held-out loss is the loss over every
  scored token of the set (``evaluation_loop``), not the Trainer's mean of batch means, so a held-out
  batch without a scored token counts for nothing rather than as a NaN.
- Throughput (real tokens/s, MFU) on every training log line through ``log``, before the console
  and MLflow callbacks see it.
- A resume's fast-forward in O(1): the Trainer skips the trained batches of the resumed epoch with
  accelerate's ``skip_first_batches``, which enumerates them (``bench/resume_skip.py``: 4 s beyond
  the epoch's shuffle at 50 million samples, growing with the corpus, on every node of every
  retry). The samples' order is ``EpochOrder``, so the pass can start at the resume point instead
  (``fast_forward``, which hands any other loader to accelerate's), through the Trainer's
  ``get_resumed_dataloader`` (transformers 5.25 on). Before 5.25 there was no door: while an epoch
  runs, the name ``skip_first_batches`` in the Trainer's module resolves to ``fast_forward``. Should
  either stop working, a test that resumes a run fails (the resumed pass would not start at the
  resume point) rather than training going wrong.
- Real tokens counted on the host (``_track_num_input_tokens``): the collator counts each batch's
  (``objective.REAL_TOKENS``), before it leaves an all-ones attention mask out for SDPA's flash kernel
  under ``torch.compile``; processes with padded batches sum theirs in the host group
  (``distributed.host_all_reduce``). The Trainer's own count gathers a sum on the device and reads it
  back every step, a wait for the step on a GPU; and without the mask it would count the tokens that
  are not ``<pad>``, which a masked LM's random replacement can draw. The exact counts of
  ``tests/test_pretrain.py`` and ``tests/test_distributed.py`` catch a Trainer that stops calling it,
  and ``tests/test_throughput.py`` one whose steps read values back between log lines.
- Under DeepSpeed the gradient norm stays a tensor until a log line reads it (``_get_grad_norm``),
  as it does under DDP: the Trainer reads DeepSpeed's back every step, a wait for the step on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import transformers.trainer
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from kantai_batch.distributed import deepspeed_config, host_all_reduce
from kantai_batch.hardware import has_accelerator, resolve_precision
from kantai_batch.job import Job
from kantai_batch.masking import IGNORE, MaskedSamples
from kantai_batch.objective import MASKED_POSITIONS, REAL_TOKENS, TOKEN_LOSS, loss_function
from kantai_batch.order import EpochOrder, EpochRows, fast_forward

# With a time budget and no other bound, the Trainer is told "this many epochs" and the budget ends it.
UNBOUNDED_EPOCHS = 1_000_000


class PretrainTrainer(Trainer):
    def __init__(
        self,
        *args,
        task: str,
        sparse: bool = False,
        full_blocks: bool = False,
        schedule=None,
        throughput=None,
        **kwargs,
    ) -> None:
        super().__init__(*args, compute_loss_func=loss_function(task), **kwargs)
        self.sparse = sparse
        # Every training sample is a full block (data.FULL_BLOCK_MODES), so every process's every batch
        # holds the same number of real tokens: EpochOrder gives each process full batches.
        self.full_blocks = full_blocks
        self.schedule = schedule
        self.throughput = throughput
        if throughput is not None:
            self.add_callback(throughput)
        self.add_callback(_ThisJobsIntervals())
        self._scored = None  # the flattened positions the head runs on, during one training forward
        if sparse:
            self.accelerator.unwrap_model(self.model).lm_head.register_forward_pre_hook(self._scored_positions_only)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions = inputs.pop(MASKED_POSITIONS, None)
        inputs.pop(REAL_TOKENS, None)
        if self.sparse and model.training and "labels" in inputs:
            labels = inputs["labels"].reshape(-1)
            if positions is None:  # a batch from another collator: found on the device, at a wait
                positions = (labels != IGNORE).nonzero().squeeze(1)
            # Their count changes with every batch: compiled for any count from the first batch on.
            torch._dynamo.maybe_mark_dynamic(positions, 0)
            self._scored = positions
            inputs = {**inputs, "labels": labels.index_select(0, positions)}
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._scored = None

    def _track_num_input_tokens(self, inputs):
        real = inputs.get(REAL_TOKENS)
        if real is None or self.args.include_num_input_tokens_seen == "no":
            super()._track_num_input_tokens(inputs)
            return
        # Counted by the collator on the host. The Trainer's count gathers a sum on the device and reads
        # it back, which waits there for the step to finish. Full blocks are the same count on every
        # process; padded batches differ, and their sum crosses over on the host.
        processes = self.args.world_size
        if processes > 1:
            real = real * processes if self.full_blocks else int(self._host_sum(real))
        self.state.num_input_tokens_seen += real

    def _host_sum(self, count: int) -> float:
        return host_all_reduce([float(count)], "sum", timeout_s=self.args.ddp_timeout)[0]

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is not None and self.is_deepspeed_enabled:
            # DeepSpeed's engine computed it this step (a fresh tensor each step, or a float after an
            # overflow); the log line reads it, as it reads DDP's.
            return grad_norm
        return super()._get_grad_norm(model, grad_norm)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        # The loss over every scored token of the set, in place of the Trainer's mean of batch means.
        for key in [key for key in output.metrics if key.endswith(f"_{TOKEN_LOSS}")]:
            output.metrics[key.removesuffix(TOKEN_LOSS) + "loss"] = output.metrics.pop(key)
        return output

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint holds a tied tensor once, under its source's name: transformers 5's Trainer
        # called the RoBERTa head's decoder "missing keys" at every resume, though loading in place
        # left it tied to the embeddings it shares. Only a key that is really missing is reported.
        tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) < len(load_result.missing_keys):
            self.accelerator.unwrap_model(self.model).tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _scored_positions_only(self, head, args):
        if self._scored is None:
            return None
        hidden, *rest = args
        return (hidden.reshape(-1, hidden.size(-1)).index_select(0, self._scored), *rest)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, (MaskedSamples, EpochRows)):
            shared = self.args.world_size > 1 and not self.args.dataloader_drop_last
            multiple = self._train_batch_size * self.args.world_size if shared else 1
            return EpochOrder(len(dataset), self.args.seed, multiple=multiple)
        return super()._get_train_sampler(train_dataset)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        return fast_forward(dataloader, num_batches)

    def _run_epoch(self, *args, **kwargs):
        if hasattr(Trainer, "get_resumed_dataloader"):
            return super()._run_epoch(*args, **kwargs)
        with _resolving(transformers.trainer, "skip_first_batches", fast_forward):  # before transformers 5.25
            return super()._run_epoch(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.throughput is not None and "loss" in logs:
            logs.update(self.throughput.rates(self.state))
        if self.schedule is not None:
            self._bar_to_the_plan()
        super().log(logs, start_time)

    def _bar_to_the_plan(self) -> None:
        # Under a time budget alone the Trainer counts to a million epochs' steps, and its bar's ETA
        # reads in months: the plan's end is the end the bar should show.
        planned = min(self.schedule.total_steps, self.state.max_steps)
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None and bar.total != planned:
                bar.total = planned
                bar.refresh()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler


class _ThisJobsIntervals(TrainerCallback):
    """A resumed training logs, evaluates and saves at this job's intervals: the Trainer restores the
    checkpoint's with its state, so a new ``train.save_steps`` (the work one can afford to lose) or
    ``train.logging_steps`` was ignored with a warning."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


@contextlib.contextmanager
def _resolving(module, name: str, value):
    original = getattr(module, name, None)
    if original is None:  # a Trainer that no longer skips this way: train as it does
        yield
        return
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def training_arguments(job: Job, output_dir: Path, **overrides: Any) -> TrainingArguments:
    """The Trainer's arguments for the job; ``overrides`` replace any of them (the bench uses this)."""
    t = job.train
    precision = resolve_precision(t.precision)
    accelerator = has_accelerator()
    workers = t.dataloader_workers
    if workers == "auto":
        workers = dataloader_workers() if accelerator else 0
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=t.max_steps or -1,
        # With a time budget and no other bound, the budget alone ends training.
        num_train_epochs=t.epochs or (UNBOUNDED_EPOCHS if t.max_seconds else 1.0),
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=schedule_kwargs(job, t.max_steps),
        # A float below 1 is a share of all steps to the Trainer.
        warmup_steps=t.warmup_steps or t.warmup_ratio,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        save_strategy="steps",
        save_steps=t.save_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        seed=t.seed,
        # pretrain adds its own MLflow callback (mlflow_metrics.MetricsCallback) when it tracks.
        report_to="none",
        run_name=job.name,
        include_num_input_tokens_seen="non_padding",
        # The Trainer would replace a NaN or infinite step loss by the mean of the logged ones: it hides a
        # diverged run from its own log, and its check reads the loss back from the device every step.
        logging_nan_inf_filter=False,
        # Pinning only helps copies to an accelerator; on a CPU-only host torch warns about it.
        dataloader_pin_memory=accelerator,
        # A blocking copy of the next batch to the GPU waits there for every step queued before it; from
        # pinned memory the copy can queue behind them instead.
        accelerator_config={"non_blocking": accelerator},
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # The Trainer refuses bf16 without a GPU unless told the CPU is meant.
        use_cpu=not accelerator,
        torch_compile=t.torch_compile,
        # Fused AdamW: one kernel per parameter group instead of a loop of small ones (CPU and GPU).
        optim="adamw_torch_fused",
        # Every parameter takes part in every step; searching the graph for unused ones costs time.
        ddp_find_unused_parameters=False,
        # A rank that died without a word must not hold the others in a collective for torch's 30 min.
        ddp_timeout=t.collective_timeout_s,
    )
    if t.deepspeed:
        # A dict rather than the path: the Trainer fills its "auto" values in place.
        settings["deepspeed"] = deepspeed_config(t.deepspeed)
    return TrainingArguments(**{**settings, **overrides})


def dataloader_workers() -> int:
    """Workers per GPU process: up to 4, leaving each process one of the CPUs it shares with the node's others.

    A masked batch of 1,024 blocks of 128 costs a worker about 50 ms (``masking``), and an H200 step of
    that batch 0.1 s, so 4 workers keep a queue even when a read from a cold page cache is slow.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, per_process - 1))


def schedule_kwargs(job: Job, total_steps: int | None) -> dict[str, Any]:
    """What the Trainer's scheduler needs beyond warm-up and total steps.

    Warm-up-stable-decay takes its decay phase in steps, so it is known only once the total is: from
    ``train.max_steps``, or from the training set's size when ``build_trainer`` has it.
    """
    if job.train.lr_scheduler != "warmup_stable_decay" or not total_steps:
        return {}
    return {"num_decay_steps": max(1, math.ceil(job.train.decay_ratio * total_steps)), "decay_type": "linear"}


def planned_steps(args: TrainingArguments, samples: int) -> int:
    """Optimizer steps the Trainer will take over ``samples`` training samples (as it counts them)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(samples / (args.per_device_train_batch_size * args.world_size))
    return math.ceil(args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf
