"""bench's worker: one configuration trained and scored in an interpreter of its own (``bench`` starts
it), so its peak memory is its own and no state carries over from the configuration before."""

from __future__ import annotations

import json
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from kantai_batch.baseline import grouped_lines
from kantai_batch.job import Job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.masking import IGNORE
from kantai_batch.objective import ACCURACY
from kantai_batch.probes import read_probes
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

# The held-out cuts every configuration is scored on; the first is the headline, the first two are
# also evaluated during training (the loss curve).
EVAL_CUTS = ("packed", "grouped", "lines")
CURVE_CUTS = EVAL_CUTS[:2]


def measure(
    name: str,
    job: dict[str, Any],
    run_root: str,
    steps: int | None,
    seconds: float | None,
    eval_every: float | None,
    grouped_training: bool,
    eval_masking: float,
    eval_seed: int,
    eval_block_size: int,
    level: int,
) -> dict[str, Any]:
    """Train one configuration and evaluate it; runs in its own interpreter."""
    from kantai_batch.curve import LossCurve
    from kantai_batch.model import init_model, load_tokenizer
    from kantai_batch.preemption import Preemption
    from kantai_batch.stopping import StopAgreement
    from kantai_batch.train import build_trainer, time_budget
    from kantai_batch.trainer import training_arguments

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = Job.model_validate(job)
    run = RunDir.from_uri(run_root)
    run.require(run.corpus, "corpus", "prepare")
    tokenizer = load_tokenizer(run.require(run.tokenizer, "tokenizer", "train-tokenizer"))
    run.require(run.tokens, "tokens", "tokenize")
    model = init_model(job, len(tokenizer))
    by_steps = steps is not None and not seconds
    curve = LossCurve(seconds=seconds, eval_seconds=eval_every if seconds else None)
    with tempfile.TemporaryDirectory(prefix="kantai-bench-") as scratch:
        overrides: dict[str, Any] = dict(save_strategy="no", disable_tqdm=True)
        if steps is not None:
            overrides.update(max_steps=steps, logging_steps=max(1, steps // 10))
        if by_steps and eval_every:
            overrides.update(eval_strategy="steps", eval_steps=int(eval_every))
        else:
            overrides.update(eval_strategy="no")
        args = training_arguments(job, Path(scratch), **overrides)
        budget = time_budget(job, resume_from=None)
        stop = StopAgreement(Preemption(job.train.preemption_grace_s), budget)
        cuts = eval_cuts(job, tokenizer, run, eval_masking, eval_seed, eval_block_size)
        samples = (_train_samples(job, run, tokenizer), cuts["packed"])
        session = build_trainer(
            job,
            model,
            tokenizer,
            args,
            run,
            callbacks=[curve, stop],
            budget=budget,
            samples=samples,
            profile_dir=run.profile / name,
        )
        trainer = session.trainer
        if grouped_training:
            trainer.train_dataset = grouped_lines(run.train_text, tokenizer, job.data.block_size, what="train split")
        trainer.eval_dataset = {cut: cuts[cut] for cut in CURVE_CUTS}
        result = trainer.train()
        # The last step's curve point often has the curve's cuts already (the budget and an evaluation
        # fall due together); the others are scored into the same point.
        last = curve.points[-1] if curve.points and curve.points[-1]["step"] == trainer.state.global_step else {}
        trainer.evaluate({cut: cuts[cut] for cut in EVAL_CUTS if f"{cut}_loss" not in last})
        final = curve.points[-1]
        quality = _quality(job, trainer.model, tokenizer)
    return {
        "name": name,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics["train_runtime"],
        "training_seconds": curve.training_seconds(),
        # "diverged" for a configuration whose loss became NaN or infinite: its losses are NaN from there.
        "stopped_by": stop.stopped_by or _bound_reached(trainer.state.global_step, args.max_steps, curve.timed_out),
        "data_mode": "grouped_lines" if grouped_training else job.data.mode,
        "dropout": job.model.hidden_dropout_prob,
        "batch_size": job.train.per_device_batch_size,
        "block_size": job.data.block_size,
        "lr_scheduler": job.train.lr_scheduler,
        "mlm_probability": job.train.mlm_probability,
        "seed": job.train.seed,
        **{f"eval_loss_{cut}": final[f"{cut}_loss"] for cut in EVAL_CUTS},
        f"eval_{ACCURACY[job.task]}_packed": final[f"packed_{ACCURACY[job.task]}"],
        "curve": curve.points,
        "quality": quality,
        "train": job.train.model_dump(mode="json"),
        **session.summary(),
    }


def _quality(job: Job, model, tokenizer) -> dict[str, Any]:
    """What people read after the budget: a masked LM's answer to the recipe's fill-mask sentence and
    the job's probes; a causal LM's continuation of the job's prompt (its seeded sampling, as `run` prints)."""
    from kantai_batch.probes import quality_report

    if job.task == "clm":
        from kantai_batch.generate import Generator

        sampling = job.generate.with_overrides(num_return_sequences=1)
        generation = Generator(model, tokenizer, trained=job.data.block_size)(job.generate.prompt, sampling)
        return {"generate": {"prompt": job.generate.prompt, "continuation": generation.continuations[0]}}
    probes = read_probes(job.eval.probes, tokenizer.mask_token) if job.eval.probes else None
    return quality_report(model.eval(), tokenizer, job, probes)


def _train_samples(job: Job, run: RunDir, tokenizer):
    """The run's training samples, or for a configuration that shapes them otherwise (data.mode,
    data.block_size) its own, tokenized here: the run has one tokens folder, for the job."""
    from kantai_batch.data import build_split, load_samples, tokens_mismatch

    mismatch = tokens_mismatch(run, job, "train", tokenizer)
    if mismatch is None:
        return load_samples(run, job, "train", tokenizer)
    log.info("bench: this configuration's training samples differ from the run's tokens (%s); tokenizing", mismatch)
    return build_split(run.train_text, job, tokenizer, fix_masks=False, what="train split")


def _bound_reached(step: int, max_steps: int, timed_out: bool) -> str:
    if timed_out:
        return "seconds"
    return "max_steps" if 0 < max_steps <= step else "epochs"


def eval_cuts(job: Job, tokenizer, run: RunDir, masking: float, seed: int, block_size: int) -> dict[str, Any]:
    """The held-out split as packed blocks, run_mlm's grouped lines and single lines, for a masked LM
    with the same fixed masks for every configuration, so all are scored on the same tokens; a causal
    LM is scored on every next token."""
    from kantai_batch.data import build_split, mask_once

    text = run.eval_text
    held_out = job.eval.model_copy(update={"mlm_probability": masking, "seed": seed})
    job = job.model_copy(update={"eval": held_out, "data": job.data.model_copy(update={"block_size": block_size})})
    masked = job.task == "mlm"
    special = set(tokenizer.all_special_ids)
    cuts = {}
    for cut in EVAL_CUTS:
        if cut == "grouped":
            samples = grouped_lines(text, tokenizer, job.data.block_size, what="eval (grouped)")
            cuts[cut] = mask_once(samples, job, tokenizer, "eval (grouped)") if masked else samples
        else:
            mode = "line_by_line" if cut == "lines" else cut
            shaped = job.model_copy(update={"data": job.data.model_copy(update={"mode": mode})})
            cuts[cut] = build_split(text, shaped, tokenizer, fix_masks=masked, what=f"eval ({mode})")
        if not masked:
            cuts[cut] = cuts[cut].map(
                _words_as_labels, batched=True, remove_columns=["special_tokens_mask"], fn_kwargs={"special": special}
            )
    return cuts


def _words_as_labels(batch: dict[str, list[list[int]]], special: set[int]) -> dict[str, list[list[int]]]:
    """A causal LM's held-out labels without the special tokens: where <s> and </s> fall is the data
    format's (one per line for run_clm, per paragraph when packed), and a model trained on one format
    predicts them almost for free there and badly in the other, which says nothing of the text."""
    return {"labels": [[IGNORE if token in special else token for token in ids] for ids in batch["input_ids"]]}


if __name__ == "__main__":
    # python -m kantai_batch.bench_worker SPEC.json RESULT.json
    # Stopped by bench (SIGTERM), it unwinds, so its scratch folder goes too (the default left it behind).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _spec = json.loads(Path(sys.argv[1]).read_text())
    write_json_atomic(Path(sys.argv[2]), measure(**_spec))
