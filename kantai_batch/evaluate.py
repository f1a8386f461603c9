"""evaluate: eval loss, perplexity and masked-token accuracy of a saved model on a corpus.

The corpus is the run's held-out split, or any raw corpus given with ``--corpus`` (decoded the way
``prepare`` decodes). Masks are fixed by the job's seed, so the same model and corpus always give
the same numbers. Results go to ``RUN/eval/metrics.json``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from kantai_batch.corpus import EVAL_FILE, choose_encoding, write_text
from kantai_batch.data import MlmCollator, build_split
from kantai_batch.errors import InputDataError
from kantai_batch.job import Job
from kantai_batch.model import load_masked_lm, load_masked_lm_tokenizer
from kantai_batch.storage import RunDir, committed_dir, fetched, require_complete, write_json_atomic
from kantai_batch.train import has_accelerator, masked_accuracy, perplexity, predicted_ids

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def evaluate(job: Job, run: RunDir, *, model_dir: Path | None = None, corpus: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` (default: the run's model) and commit the metrics to ``RUN/eval/``."""
    model_dir = model_dir or run.model
    tokenizer = load_masked_lm_tokenizer(model_dir)
    model = load_masked_lm(model_dir)
    with tempfile.TemporaryDirectory(prefix="kantai-eval-") as scratch:
        if corpus is None:
            require_complete(run.corpus, "corpus", "prepare")
            text, corpus_name = run.corpus / EVAL_FILE, str(run.corpus / EVAL_FILE)
        else:
            with fetched(corpus, "corpus") as source:
                encoding, _ = choose_encoding(source, job.corpus.encoding, corpus)
                text, corpus_name = Path(scratch) / "eval.txt", corpus
                if write_text(source, encoding, text) == 0:
                    raise InputDataError(f"corpus {corpus} has no text")
        metrics = _evaluate(job, model, tokenizer, text, Path(scratch) / "trainer")
    metrics.update(model=str(model_dir), corpus=corpus_name)
    with committed_dir(run.eval) as out:
        write_json_atomic(out / METRICS_FILE, metrics)
    log.info(
        "evaluate: loss %.4f, perplexity %.2f, masked accuracy %.4f on %s masked tokens",
        metrics["eval_loss"],
        metrics["perplexity"],
        metrics["masked_accuracy"],
        f"{metrics['masked_tokens']:,}",
    )
    return metrics


def _evaluate(job: Job, model, tokenizer, text: Path, scratch: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    samples = build_split(text, job, tokenizer, evaluation=True, what="eval corpus")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(scratch),
            per_device_eval_batch_size=job.train.per_device_batch_size,
            report_to="none",
            dataloader_pin_memory=has_accelerator(),
        ),
        data_collator=MlmCollator(tokenizer, job.train.mlm_probability),
        compute_metrics=masked_accuracy,
        preprocess_logits_for_metrics=predicted_ids,
    )
    result = trainer.evaluate(samples)
    masked = sum(sum(1 for label in labels if label != -100) for labels in samples["labels"])
    return {
        "eval_loss": result["eval_loss"],
        "perplexity": perplexity(result["eval_loss"]),
        "masked_accuracy": result["eval_masked_accuracy"],
        "samples": len(samples),
        "masked_tokens": masked,
    }
