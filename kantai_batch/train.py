"""pretrain: pretraining from scratch (masked or causal LM) with the HF Trainer, resumable, committed atomically.

Checkpoints go to ``RUN/checkpoints/checkpoint-N/``; each gets a ``_COMPLETE`` marker once the Trainer
has written all of it, and a restart resumes from the newest marked one (model, optimizer,
scheduler, RNG and data position). The final model, tokenizer and ``train_summary.json`` are
committed to ``RUN/model/``.

Imported only when a phase that trains runs, so transformers is imported at the top.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from kantai_batch import tracking
from kantai_batch.budget import PlannedSchedule, TimeBudget
from kantai_batch.checkpoints import LAST_STEP, CheckpointMarkerCallback
from kantai_batch.continued import continued_model, init_model_dir
from kantai_batch.data import FULL_BLOCK_MODES, load_samples
from kantai_batch.distributed import barrier, local_main_first, node_count
from kantai_batch.errors import JobConfigError, PreemptedError, TrainingDivergedError
from kantai_batch.fingerprint import checkpoint_lineage, fingerprint_of
from kantai_batch.hardware import peak_flops, resolve_attention, resolve_precision, training_flops_per_token
from kantai_batch.job import Job, ModelSection
from kantai_batch.manifest import file_sha256, only_writer, read_marker, write_json_atomic
from kantai_batch.masking import MaskedSamples
from kantai_batch.mlflow_metrics import MetricsCallback
from kantai_batch.model import init_model, load_tokenizer, resolved_vocab_size, roberta_config
from kantai_batch.objective import (
    ACCURACY,
    accuracy_metric,
    collator,
    eval_predictions,
)
from kantai_batch.order import EpochRows
from kantai_batch.preemption import Preemption, sigterm_checkpoints
from kantai_batch.profiling import ProfilerCallback
from kantai_batch.rundir import JOB_FILE, TRAIN_SUMMARY, RunDir, checkpoint_step
from kantai_batch.stopping import BUDGET, StopAgreement
from kantai_batch.throughput import ThroughputCallback
from kantai_batch.trainer import (
    UNBOUNDED_EPOCHS,
    PretrainTrainer,
    perplexity,
    planned_steps,
    schedule_kwargs,
    training_arguments,
)

log = logging.getLogger(__name__)


def pretrain(job: Job, run: RunDir, *, track: bool = True) -> Path:
    """Train the job's model on the prepared corpus; return the committed model folder."""
    # One training per run dir: a second would write the same checkpoints. Held by the launch's main
    # process alone, for all of it: the nodes of one training may share the run dir's file system.
    main = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as writing:
        lease = None
        if main:
            writing.enter_context(only_writer(run.checkpoints))
            # The file lock holds on this machine only.
            lease = writing.enter_context(
                run.training_lease(job.train.collective_timeout_s, "train.collective_timeout_s")
            )
        return _pretrain(job, run, track=track, still_ours=lease.require if lease else None)


def _pretrain(job: Job, run: RunDir, *, track: bool, still_ours: Callable[[], None] | None = None) -> Path:
    args = training_arguments(job, run.checkpoints)
    nodes = node_count()
    require_shared_checkpoints(job, run, nodes)
    # Processes on one node share its disk: one of them mirrors the inputs from a remote run dir
    # (and tidies up checkpoints), the others then find the identical copy.
    with local_main_first():
        tokenizer = load_tokenizer(run.require(run.tokenizer, "tokenizer", "train-tokenizer"))
        run.require(run.tokens, "tokens", "tokenize")
        start_from = init_model_dir(job)
        point = _resume_point(job, run, args, len(tokenizer))
    resume_from, lineage = point.checkpoint, point.lineage
    if resume_from:
        require_same_processes(resume_from, args.world_size, run)
    inputs = fingerprint_of(job, "pretrain", run, as_read=True)
    if start_from is None:
        model = init_model(job, len(tokenizer))
    else:
        model = continued_model(job, start_from, tokenizer)
        log.info("pretrain: continuing from %s (train.init_from %s)", start_from, job.train.init_from)
    budget = time_budget(job, resume_from)
    # The tracking store is reached before any data work, so an unreachable one fails in seconds.
    tracked = track and args.process_index == 0
    resuming = resume_from is not None
    with tracking.pretrain_run(job, run, enabled=tracked, resuming=resuming, lineage=lineage) as mlflow_run:
        stop = StopAgreement(Preemption(job.train.preemption_grace_s), budget)
        checkpoints = CheckpointMarkerCallback(
            run,
            job.train.save_total_limit,
            clock=budget.spent if budget else None,
            lineage_sha256=lineage,
            still_ours=still_ours,
            # The step the budget ended training at is its last, though a little time may be left: marked
            # with the budget, so a longer one resumes it.
            last=lambda: budget.max_seconds if budget is not None and stop.stopped_by == BUDGET else None,
        )
        callbacks = [
            checkpoints,
            stop,
            *([MetricsCallback(mlflow_run.run_id, continued=mlflow_run.continued)] if mlflow_run else []),
        ]
        session = build_trainer(job, model, tokenizer, args, run, callbacks=callbacks, budget=budget)
        trainer = session.trainer
        # The Trainer takes at least one step after a resume. A checkpoint at the end of training (a pod
        # retried between the last save and the commit, or after its budget ran out) takes none: its
        # model is committed as it is.
        # Not under DeepSpeed: a Trainer that never trained has no engine to evaluate with below ZeRO-3,
        # so there the Trainer's one step more it is.
        ended_by = (
            _trained_out(job, run, resume_from, budget, trainer, args)
            if resume_from is not None and not job.train.deepspeed
            else None
        )
        finished = ended_by is not None
        if finished:
            model.load_state_dict(type(model).from_pretrained(str(resume_from)).state_dict())
        if point.other_training is not None:
            # Only once the job has passed every check (its tokens, its starting model): the wrong
            # job given to a resumed run must fail without costing the run its checkpoints. The
            # barrier: every process has read the checkpoints' markers before any is moved.
            barrier()
            _leave_other_training(run, point.other_training, args, other_model=point.other_model)
        if resume_from:
            log.info("pretrain: resuming from %s", run.uri(resume_from))
        if finished:
            trainer.state = TrainerState.load_from_json(str(resume_from / TRAINER_STATE_NAME))
            if ended_by == BUDGET:
                stop.stopped_by = BUDGET
            result = None
        else:
            with sigterm_checkpoints(stop.preemption):
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                checkpoints.wait()
                stop.settle(args.ddp_timeout)
        if stop.diverged or (result is not None and not math.isfinite(result.training_loss)):
            raise diverged(stop, trainer.state, resume_from, run)
        if stop.preempted:
            raise PreemptedError(
                f"pretrain stopped on SIGTERM at step {trainer.state.global_step}; the checkpoint is committed to "
                f"{run.uri(run.checkpoints)} and the next pretrain resumes from it"
            )
        eval_metrics = trainer.evaluate()
        summary = {
            "global_step": trainer.state.global_step,
            "resumed_from_step": checkpoint_step(resume_from) if resume_from else 0,
            "world_size": args.world_size,
            "nodes": nodes,
            "train_loss": result.training_loss if result else last_logged_loss(trainer.state),
            "eval_loss": eval_metrics["eval_loss"],
            "eval_perplexity": perplexity(eval_metrics["eval_loss"]),
            f"eval_{ACCURACY[job.task]}": eval_metrics[f"eval_{ACCURACY[job.task]}"],
            "train_runtime_s": result.metrics["train_runtime"] if result else 0.0,
            "stopped_by": stop.stopped_by or ("max_steps" if args.max_steps > 0 else "epochs"),
            "stop_agreement_s": stop.agreement_s,
            **({"max_seconds": budget.max_seconds, "budget_spent_s": budget.spent()} if budget else {}),
            **session.summary(),
            "mlflow_run_id": mlflow_run.run_id if mlflow_run else None,
            "init_from": job.train.init_from if start_from is not None else None,
        }
        if not trainer.is_world_process_zero():
            # Under ZeRO-3 the weights are sharded: saving gathers them from every process, and only
            # the main process writes.
            trainer.save_model(str(run.model))
        else:
            # The lineage says whose checkpoints the model ends: a later training of other settings may
            # delete those, and sets aside the checkpoints of one that never committed its model.
            if still_ours is not None:
                still_ours()  # another machine training the run dir now: commit nothing over its work
            if finished:
                # Killed between sealing its last checkpoint and pruning the older ones, a training
                # left one too many; trained out, it saves nothing more that would prune them.
                run.prune_checkpoints(job.train.save_total_limit)
            # The other processes wait at a barrier meanwhile, within the collective timeout.
            wait_s = job.train.collective_timeout_s
            with run.committed(run.model, lease_wait_s=wait_s, inputs_sha256=inputs, lineage_sha256=lineage) as out:
                trainer.save_model(str(out))
                tokenizer.save_pretrained(str(out))
                write_json_atomic(out / TRAIN_SUMMARY, summary)
                (out / JOB_FILE).write_text(job.to_yaml(), encoding="utf-8")
            if mlflow_run:
                tracking.log_model(mlflow_run, run.model)
    log.info(
        "pretrain: step %d, train loss %.4f, eval loss %.4f, %.0f real tokens/s, MFU %.1f%%; model in %s",
        summary["global_step"],
        summary["train_loss"],
        summary["eval_loss"],
        summary["real_tokens_per_second"],
        100 * summary["mfu"],
        run.model,
    )
    return run.model


@dataclass(frozen=True)
class _ResumePoint:
    checkpoint: Path | None
    """The checkpoint this training goes on from."""
    lineage: str
    other_training: Path | None = None
    """The newest checkpoint of another training: set aside or deleted once the job passed its checks."""
    other_model: bool = False
    """That training is of this lineage but of another model section."""


def _resume_point(job: Job, run: RunDir, args, vocab_size: int) -> _ResumePoint:
    lineage = checkpoint_lineage(job, run)
    newest = run.newest_checkpoint(tidy=args.local_process_index == 0)
    if newest is None:
        return _ResumePoint(None, lineage)
    recorded = read_marker(newest).get("lineage_sha256", lineage)
    if recorded != lineage and recorded == checkpoint_lineage(job, run, legacy=True):
        lineage = recorded  # a training begun before 2026-12-07 goes on under the lineage it began with
    if recorded != lineage:
        # An earlier training's checkpoint (a retraining on a grown corpus in the same run dir):
        # resuming it would skip this training's steps, and its higher step would outlive the new ones.
        return _ResumePoint(None, lineage, other_training=newest)
    if changed := model_change(newest, job, vocab_size):
        # Its lineage leaves the model section out; resumed, the new settings would be claimed by
        # weights trained under the old (a changed dropout re-committed the old model as it was).
        log.info("pretrain: %s is a step of another model (%s)", run.uri(newest), changed)
        return _ResumePoint(None, lineage, other_training=newest, other_model=True)
    return _ResumePoint(newest, lineage)


def require_same_processes(checkpoint: Path, processes: int, run: RunDir) -> None:
    """A checkpoint resumes only with the processes it was trained by: the sample order places each
    step's samples by the global batch, so other processes would train some samples twice and skip
    others, at another global batch than the learning rate was tuned for."""
    before = read_marker(checkpoint).get("processes", processes)  # markers before 2026-12-06 lack it
    if before != processes:
        raise JobConfigError(
            f"{run.uri(checkpoint)} was trained by {before} processes and this run has {processes}: resuming "
            f"would repeat some samples and skip others; run it with {before} processes (GPUS x NODES), "
            "or start a new run dir"
        )


def _leave_other_training(run: RunDir, newest: Path, args, *, other_model: bool = False) -> None:
    """Start over from the checkpoints of another training: deleted where that training committed its model
    (a retraining on a grown corpus), else set aside, since they may be all a long training has to show
    (a run started again with a setting changed by mistake, or after a divergence, to be looked into).

    ``other_model``: the same lineage, another model section, whose folder is named by its config too,
    or trainings of two models set aside in turn would mix (a step of one replacing the other's)."""
    lineage = read_marker(newest).get("lineage_sha256")
    ended = run.marker(run.model)
    # A model committed before models recorded their lineage ends the training, as it was taken to then.
    if ended is not None and ended.get("lineage_sha256", lineage) == lineage:
        log.info("pretrain: %s is of another training, which committed its model; starting over", run.uri(newest))
        if args.local_process_index == 0:
            run.discard_checkpoints(remote=args.process_index == 0)
        return
    model = f"-model-{file_sha256(newest / 'config.json')[:8]}" if other_model else ""
    aside = run.checkpoints / f"other-training-{(lineage or 'unknown')[:12]}{model}"
    log.warning(
        "pretrain: %s is of another training (other samples, starting model or settings) that never committed "
        "its model; starting over, with its checkpoints moved to %s (to resume it, move them back and run its "
        "job; delete that folder once they are not needed)",
        run.uri(newest),
        run.uri(aside),
    )
    if args.local_process_index == 0:
        run.set_aside_checkpoints(aside.name, remote=args.process_index == 0)


def _trained_out(
    job: Job, run: RunDir, checkpoint: Path, budget: TimeBudget | None, trainer: Trainer, args
) -> str | None:
    """What made ``checkpoint`` the end of this training already (``BUDGET`` spent, or its ``"steps"``
    taken), or None."""
    if budget is not None and (budget.exhausted() or read_marker(checkpoint).get(LAST_STEP) == budget.max_seconds):
        log.info(
            "pretrain: the budget of %gs ended training at %s (%.0fs spent); no more steps",
            budget.max_seconds,
            run.uri(checkpoint),
            budget.spent(),
        )
        return BUDGET
    step, bound = checkpoint_step(checkpoint), planned_steps(args, len(trainer.train_dataset))
    if step < bound:
        return None
    if step > bound:
        # Resuming would train on past the bound; its first `bound` steps ran on another schedule.
        log.warning(
            "pretrain: %s is past this job's %d steps (%s); its model is committed as it is "
            "(a new run dir trains the shorter schedule)",
            run.uri(checkpoint),
            bound,
            f"train.max_steps {job.train.max_steps}" if job.train.max_steps else "train.epochs",
        )
    else:
        log.info("pretrain: %s is the last of %d steps; no more steps", run.uri(checkpoint), bound)
    return "steps"


def diverged(stop: StopAgreement, state: TrainerState, resumed_from: Path | None, run: RunDir) -> TrainingDivergedError:
    seen = stop.divergence or {"step": state.global_step, "loss": math.nan}
    values = ", ".join(f"{key} {value}" for key, value in seen.items() if key != "step")
    saved = stop.saved_step or (checkpoint_step(resumed_from) if resumed_from else None)
    kept = f"the newest checkpoint is step {saved}" if saved else "no checkpoint was written"
    return TrainingDivergedError(
        f"pretrain diverged by step {seen['step']} ({values}); nothing after it was saved and {kept} in "
        f"{run.uri(run.checkpoints)}; resuming would diverge again: lower train.learning_rate or lengthen "
        "the warm-up (train.warmup_ratio), and the changed job trains from the start"
    )


@dataclass
class TrainingSession:
    """A Trainer set up for a job, with what the summary reports about how it trains."""

    trainer: Trainer
    throughput: ThroughputCallback
    precision: str
    sparse: bool
    torch_compile: bool
    profiler: ProfilerCallback | None = None

    def summary(self) -> dict[str, Any]:
        model = self.trainer.model
        args = self.trainer.args
        return {
            "parallelism": parallelism(args),
            "global_batch_size": global_batch_size(args),
            "learning_rate": args.learning_rate,
            **self.throughput.summary(),
            "precision": self.precision,
            "sparse_prediction": self.sparse,
            "attention": model.config._attn_implementation,
            "torch_compile": self.torch_compile,
            "vocab_size": model.config.vocab_size,
            "parameters": model.num_parameters(),
            **({"profile": self.profiler.report} if self.profiler else {}),
        }


def build_trainer(
    job: Job,
    model,
    tokenizer,
    args: TrainingArguments,
    run: RunDir,
    *,
    callbacks: list[TrainerCallback] = (),
    budget: TimeBudget | None = None,
    samples: tuple[Any, Any] | None = None,
    profile_dir: Path | None = None,
) -> TrainingSession:
    """The job's datasets, collator, speed settings and throughput accounting around a Trainer.

    The train and eval ``samples`` default to the run's tokens, memory-mapped: ``run.require(run.tokens,
    ...)`` must have made them local. ``train.profile_steps``' traces go to ``profile_dir`` (the run
    dir's ``profile/`` by default).
    """
    sparse = job.task == "mlm" and job.train.sparse_prediction
    train_set, eval_set = _training_samples(job, run, tokenizer, samples)
    _plan_schedule(job, args, budget, planned_steps(args, len(train_set)))
    precision = resolve_precision(job.train.precision)
    attention = resolve_attention(job.train.attention, precision)
    model.set_attn_implementation(attention)
    flops_per_token = training_flops_per_token(
        model.config,
        sequence_length=job.data.block_size,
        scored_fraction=job.train.mlm_probability if sparse else 1.0,
    )
    peak, peak_source = peak_flops(precision)
    throughput = ThroughputCallback(flops_per_token, peak, args.world_size)
    profiler = None
    if job.train.profile_steps:
        profiler = ProfilerCallback(profile_dir or run.profile, job.train.profile_steps, args.process_index)
        callbacks = [*callbacks, profiler]
    trainer = PretrainTrainer(
        task=job.task,
        sparse=sparse,
        full_blocks=job.data.mode in FULL_BLOCK_MODES,
        schedule=budget.schedule if budget else None,
        throughput=throughput,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator(job.task, tokenizer, job, masked_positions=sparse, real_tokens=True),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        compute_metrics=accuracy_metric(job.task),
        preprocess_logits_for_metrics=eval_predictions(job.task),
    )
    session = TrainingSession(trainer, throughput, precision, sparse, job.train.torch_compile, profiler)
    _log_setup(job, session, attention, flops_per_token, peak, peak_source)
    return session


def _training_samples(job: Job, run: RunDir, tokenizer, samples: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """The train set as the Trainer iterates it (masked afresh each epoch for MLM) and the eval set."""
    if samples is None:
        samples = (load_samples(run, job, "train", tokenizer), load_samples(run, job, "eval", tokenizer))
    train_set, eval_set = samples
    if job.task == "mlm":
        t = job.train
        return MaskedSamples(train_set, tokenizer, t.mlm_probability, t.seed, t.mask_frequency_power), eval_set
    return EpochRows(train_set), eval_set


def _plan_schedule(job: Job, args: TrainingArguments, budget: TimeBudget | None, steps: int) -> None:
    t = job.train
    if t.lr_scheduler == "warmup_stable_decay" and not args.lr_scheduler_kwargs:
        args.lr_scheduler_kwargs = schedule_kwargs(job, steps)
    if budget is not None:
        # Until the first steps are timed, the schedule runs as if the step bound were the end.
        budget.plan_within(PlannedSchedule(t.lr_scheduler, steps, t.warmup_steps, t.warmup_ratio, t.decay_ratio))


def _log_setup(
    job: Job, session: TrainingSession, attention: str, flops_per_token: float, peak: float, peak_source: str
) -> None:
    trainer, args = session.trainer, session.trainer.args
    model = trainer.model
    log.info(
        "pretrain: %s parameters (vocab %s), %s training blocks, %s eval blocks, %s",
        f"{model.num_parameters():,}",
        f"{model.config.vocab_size:,}",
        f"{len(trainer.train_dataset):,}",
        f"{len(trainer.eval_dataset):,}",
        training_bound(job, args),
    )
    log.info(
        "pretrain: world size %d (%s), global batch %d = %d per device x %d processes x %d accumulated, "
        "learning rate %g, %s, %s attention%s%s",
        args.world_size,
        parallelism(args),
        global_batch_size(args),
        args.per_device_train_batch_size,
        args.world_size,
        args.gradient_accumulation_steps,
        args.learning_rate,
        session.precision,
        attention,
        ", sparse prediction" if session.sparse else "",
        ", torch.compile" if job.train.torch_compile else "",
    )
    log.info(
        "pretrain: %.0f MFLOP per token; peak %.1f TFLOP/s per device (%s)",
        flops_per_token / 1e6,
        peak / 1e12,
        peak_source,
    )


def training_bound(job: Job, args: TrainingArguments) -> str:
    bound = f"{args.max_steps:,} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    if not job.train.max_seconds:
        return bound
    budget = f"{job.train.max_seconds:g} s of training"
    return budget if args.num_train_epochs == UNBOUNDED_EPOCHS and args.max_steps <= 0 else f"{budget} or {bound}"


def global_batch_size(args: TrainingArguments) -> int:
    """Samples per optimizer step over all processes: what the learning rate is tuned for."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def parallelism(args: TrainingArguments) -> str:
    if args.deepspeed:
        return f"DeepSpeed ZeRO-{args.hf_deepspeed_config.config['zero_optimization']['stage']}"
    return "DDP" if args.world_size > 1 else "single process"


def require_shared_checkpoints(job: Job, run: RunDir, nodes: int) -> None:
    """Refuse what would lose checkpoint state: DeepSpeed across nodes with checkpoints in S3.

    Each DeepSpeed process writes its own optimizer shard to its node's disk, and only the main
    process uploads a checkpoint, so the other nodes' shards would never reach S3.
    """
    if job.train.deepspeed and run.is_remote and nodes > 1:
        raise JobConfigError(
            f"train.deepspeed on {nodes} nodes with an S3 run dir ({run.uri(run.root)}) is not supported: "
            "the other nodes' optimizer shards would not be checkpointed; use DDP across nodes or DeepSpeed on one node"
        )


def last_logged_loss(state) -> float:
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return losses[-1] if losses else float("nan")


def time_budget(job: Job, resume_from: Path | None) -> TimeBudget | None:
    """The job's wall-clock budget, less what the run being resumed has spent of it."""
    if not job.train.max_seconds:
        return None
    spent = read_marker(resume_from).get("train_seconds", 0.0) if resume_from else 0.0
    return TimeBudget(job.train.max_seconds, spent_s=spent)


def model_change(checkpoint: Path, job: Job, tokenizer_size: int) -> str | None:
    """How the job's model (architecture, dropout, task) differs from the one ``checkpoint`` is a step of;
    None where it does not."""
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    wanted = roberta_config(job, resolved_vocab_size(job, tokenizer_size)).to_dict()
    keys = (*ModelSection.model_fields, "is_decoder")
    changed = [f"{key} {saved.get(key)} -> {wanted[key]}" for key in keys if saved.get(key, False) != wanted[key]]
    return ", ".join(changed) or None
