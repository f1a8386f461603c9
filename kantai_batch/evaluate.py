"""evaluate: eval loss, perplexity and token accuracy of a saved model on a corpus.

The task comes from the model: a masked LM is scored on masked tokens, a causal LM on every next
token. The corpus is the run's held-out split, or any raw corpus given with ``--corpus`` (decoded the
way ``prepare`` decodes). Masks are fixed by the job's seed, so the same model and corpus always
give the same numbers. Results go to ``RUN/eval/metrics.json``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from kantai_batch.data import build_split
from kantai_batch.decoding import detect_encoding, write_text
from kantai_batch.distributed import is_main_process, local_main_first
from kantai_batch.errors import InputDataError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.model import load_lm, load_model_config, load_model_tokenizer, require_task
from kantai_batch.objective import ACCURACY, accuracy_metric, collator, predicted_ids, task_of
from kantai_batch.probes import format_quality, quality_report, read_probes
from kantai_batch.rundir import EVAL_METRICS, RunDir
from kantai_batch.sources import decompressed, fetched
from kantai_batch.trainer import perplexity, training_arguments

log = logging.getLogger(__name__)


def evaluate(job: Job, run: RunDir, *, model_dir: Path | None = None, corpus: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` (default: the run's model) and commit the metrics to ``RUN/eval/``."""
    with local_main_first():  # one process per node mirrors a remote run dir's folders
        model_dir = model_dir or run.require(run.model, "model", "pretrain")
    config = load_model_config(model_dir)
    task = task_of(config) or job.task
    require_task(config, model_dir, task, "evaluate")
    tokenizer = load_model_tokenizer(model_dir)
    # A bad probe file fails before the evaluation, not after it.
    probes = read_probes(job.eval.probes, tokenizer.mask_token) if task == "mlm" and job.eval.probes else None
    model = load_lm(model_dir, task)
    if corpus is None:
        with local_main_first():
            run.require(run.corpus, "corpus", "prepare")
    with tempfile.TemporaryDirectory(prefix="kantai-eval-") as scratch:
        if corpus is None:
            text, corpus_name = run.eval_text, str(run.eval_text)
        else:
            with fetched(corpus, "corpus") as source:
                opened = lambda: decompressed(source, corpus)  # noqa: E731 - a .gz text scores like the text
                decoding = detect_encoding(opened, job.corpus.encoding, f"corpus {corpus}")
                text, corpus_name = Path(scratch) / "eval.txt", corpus
                with opened() as raw:
                    if write_text(raw, decoding, text) == 0:
                        raise InputDataError(f"corpus {corpus} has no text")
        metrics = _evaluate(job, task, model, tokenizer, text, Path(scratch) / "trainer")
    metrics.update(model=str(model_dir), corpus=corpus_name)
    if not is_main_process():
        return metrics  # every rank evaluated its share; the main process commits
    if task == "mlm":
        metrics["quality"] = quality_report(model.eval(), tokenizer, job, probes)
    with run.committed(run.eval, inputs_sha256=fingerprint_of(job, "evaluate", run, model_dir=model_dir)) as out:
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


def _evaluate(job: Job, task: str, model, tokenizer, text: Path, scratch: Path) -> dict[str, Any]:
    from kantai_batch.trainer import PretrainTrainer

    samples = build_split(text, job, tokenizer, fix_masks=task == "mlm", what="eval corpus")
    trainer = PretrainTrainer(
        task=task,
        model=model,
        # The job's own arguments (device, precision, workers): under torchrun they must also agree
        # with the process state the training set up, or accelerate resets it to one process.
        # Scoring a whole saved model needs no sharding; DeepSpeed would evaluate only under ZeRO-3.
        args=training_arguments(job, scratch, track=False, save_strategy="no", deepspeed=None),
        data_collator=collator(task, tokenizer, job),
        compute_metrics=accuracy_metric(task),
        preprocess_logits_for_metrics=predicted_ids,
    )
    result = trainer.evaluate(samples)
    if task == "mlm":
        scored = sum(sum(1 for label in labels if label != -100) for labels in samples["labels"])
    else:
        # Every token but a sample's first is predicted from the ones before it.
        scored = sum(len(ids) - 1 for ids in samples["input_ids"])
    return {
        "task": task,
        "eval_loss": result["eval_loss"],
        "perplexity": perplexity(result["eval_loss"]),
        ACCURACY[task]: result[f"eval_{ACCURACY[task]}"],
        "samples": len(samples),
        "scored_tokens": scored,
    }
