"""evaluate: eval loss, perplexity and token accuracy of a saved model on a corpus.

The task comes from the model: a masked LM is scored on masked tokens, a causal LM on every next
token. The corpus is the run's held-out split, or any raw corpus given with ``--corpus`` (decoded the
way ``prepare`` decodes). Masks are fixed by ``eval.seed``, so the same model and corpus always
give the same numbers. Results go to ``RUN/eval/metrics.json``.

The held-out split is read as the ``tokenize`` phase committed it (``RUN/tokens/eval``, masks
included), memory-mapped; only a model those samples do not fit (another tokenizer or task, say one
given with ``--model``) has the split's text tokenized here, as a ``--corpus`` is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kantai_batch.data import build_split, load_samples, tokens_mismatch
from kantai_batch.distributed import is_main_process, local_main_first
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.formats import decoded_text
from kantai_batch.hardware import resolve_attention, resolve_precision
from kantai_batch.job import Job
from kantai_batch.manifest import file_sha256, write_json_atomic
from kantai_batch.model import (
    load_lm,
    load_model_config,
    load_model_tokenizer,
    require_positions,
    require_task,
    usable_positions,
)
from kantai_batch.objective import ACCURACY, accuracy_metric, collator, eval_predictions, task_of
from kantai_batch.probes import format_quality, probe_record, quality_report, read_probes, require_fitting
from kantai_batch.rundir import EVAL_METRICS, RunDir
from kantai_batch.trainer import perplexity, training_arguments

log = logging.getLogger(__name__)


def evaluate(job: Job, run: RunDir, *, model_dir: Path | None = None, corpus: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` (default: the run's model) and commit the metrics to ``RUN/eval/``."""
    with local_main_first():  # one process per node mirrors a remote run dir's folders
        model_dir = model_dir or run.require(run.model, "model", "pretrain")
    config = load_model_config(model_dir)
    task = task_of(config) or job.task
    require_task(config, model_dir, task, "evaluate")
    require_positions(config, model_dir, job.data.block_size)
    tokenizer = load_model_tokenizer(model_dir)
    # A bad probe file fails before the evaluation, not after it.
    probes = read_probes(job.eval.probes, tokenizer.mask_token) if task == "mlm" and job.eval.probes else None
    scored = probe_record(job.eval.probes) if probes else {}  # what `run` compares the file with later
    if task == "mlm":
        require_fitting(tokenizer, usable_positions(config), job, probes)
    _without_deepspeed()
    model = load_lm(model_dir, task)
    # The kernel the job trains with, which the saved model does not carry: on a bf16 CPU torch's
    # default is the slower one.
    model.set_attn_implementation(resolve_attention(job.train.attention, resolve_precision(job.train.precision)))
    # The eval samples' masks follow the model's task, whatever the job says.
    shaped = job.model_copy(update={"task": task})
    # By the scored model's task: the fields the other task alone reads count at their defaults.
    inputs = fingerprint_of(shaped, "evaluate", run, model_dir=model_dir, as_read=True)
    with tempfile.TemporaryDirectory(prefix="kantai-eval-") as scratch:
        if corpus is None:
            samples, corpus_name = _held_out(shaped, run, tokenizer), str(run.eval_text)
        else:
            # Any source prepare reads (a folder, a glob, an s3:// prefix too), each file read as plain text.
            text = decoded_text(corpus, job.corpus.encoding, Path(scratch) / "eval.txt", "corpus")
            corpus_name = corpus
            # Scores of other text than the held-out split: `run` must find them not the run's own, and redo them.
            inputs = hashlib.sha256(f"{inputs} {file_sha256(text)}".encode()).hexdigest()
            samples = build_split(text, shaped, tokenizer, fix_masks=task == "mlm", what="eval corpus", name=corpus)
        metrics = _evaluate(job, task, model, tokenizer, samples, Path(scratch) / "trainer")
    metrics.update(model=str(model_dir), corpus=corpus_name, attention=model.config._attn_implementation)
    if not is_main_process():
        return metrics  # every rank evaluated its share; the main process commits
    if task == "mlm":
        metrics["quality"] = quality_report(model.eval(), tokenizer, job, probes)
    with run.committed(run.eval, inputs_sha256=inputs, **scored) as out:
        write_json_atomic(out / EVAL_METRICS, metrics)
    log.info(
        "evaluate: loss %.4f, perplexity %.2f, %s %.4f on %s tokens",
        metrics["eval_loss"],
        metrics["perplexity"],
        ACCURACY[task].replace("_", " "),
        metrics[ACCURACY[task]],
        f"{metrics['scored_tokens']:,}",
    )
    for line in format_quality(metrics.get("quality", {})):
        log.info("evaluate: %s", line)
    return metrics


def _held_out(job: Job, run: RunDir, tokenizer):
    """The run's eval samples from its tokens; tokenized from the split's text only where they do not fit."""
    with local_main_first():  # one process per node mirrors a remote run dir's folders
        run.require(run.tokens, "tokens", "tokenize")
    mismatch = tokens_mismatch(run, job, "eval", tokenizer)
    if mismatch is None:
        return load_samples(run, job, "eval", tokenizer)
    log.info("evaluate: the run's eval samples do not fit this model (%s); tokenizing the eval split", mismatch)
    with local_main_first():
        run.require(run.corpus, "corpus", "prepare")
    return build_split(run.eval_text, job, tokenizer, fix_masks=job.task == "mlm", what="eval split")


def _without_deepspeed() -> None:
    """Leave DeepSpeed behind when a pretrain under it ran in this process (``run``): accelerate marks
    the process's environment once an Accelerator had a DeepSpeed plugin, and every later Trainer's
    arguments take that mark for a DeepSpeed of defaults, under which DeepSpeed refuses to evaluate
    below ZeRO-3 (and under ZeRO-3 the model would load partitioned). The whole saved model is scored
    as one, as by a separate ``evaluate``."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def _evaluate(job: Job, task: str, model, tokenizer, samples, scratch: Path) -> dict[str, Any]:
    from kantai_batch.trainer import PretrainTrainer

    trainer = PretrainTrainer(
        task=task,
        model=model,
        # The job's own arguments (device, precision, workers): under torchrun they must also agree
        # with the process state the training set up, or accelerate resets it to one process.
        # Scoring a whole saved model needs no sharding; DeepSpeed would evaluate only under ZeRO-3.
        args=training_arguments(job, scratch, save_strategy="no", deepspeed=None),
        data_collator=collator(task, tokenizer, job),
        compute_metrics=accuracy_metric(task),
        preprocess_logits_for_metrics=eval_predictions(task),
    )
    result = trainer.evaluate(samples)
    scored = _scored_tokens(task, samples)
    return {
        "task": task,
        "eval_loss": result["eval_loss"],
        "perplexity": perplexity(result["eval_loss"]),
        ACCURACY[task]: result[f"eval_{ACCURACY[task]}"],
        "samples": len(samples),
        "scored_tokens": scored,
    }


def _scored_tokens(task: str, samples) -> int:
    """Tokens the loss is averaged over, counted in Arrow: a memory-mapped split is never loaded whole."""
    import pyarrow.compute as pc

    if task == "mlm":
        labels = pc.list_flatten(samples.data.column("labels"))
        return pc.sum(pc.not_equal(labels, -100)).as_py() or 0
    # Every token but a sample's first is predicted from the ones before it.
    return (pc.sum(pc.list_value_length(samples.data.column("input_ids"))).as_py() or 0) - len(samples)
