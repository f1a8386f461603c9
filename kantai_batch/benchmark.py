"""The fixed benchmark that a new model and the champion are both scored on before a promotion.

The benchmark is text: ``eval.benchmark`` (any corpus source, read as plain text), else the held-out
split of the first version registered with a benchmark, which is then frozen (logged as an artifact
of that version's run and named by tags on the registered model), else, for that first version, this
run's held-out split. Each model is scored with its own tokenizer on blocks of ``data.block_size``,
masked once (``eval.mlm_probability``, ``eval.seed``) for a masked LM, in this process by
``score``: the same model on the same bytes always gets the same number, and two models compared are
scored by the same code.

The loss is the mean cross-entropy over every scored token of the benchmark (the masked tokens of a
masked LM, every next token of a causal LM), computed in fp32 without the Trainer, so it runs alike on
one process or on the main process of a launch whose other ranks have finished.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError, JobConfigError, KantaiError, SourceUnavailableError, first_line
from kantai_batch.formats import decoded_text
from kantai_batch.job import Job
from kantai_batch.manifest import file_sha256
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

# Registered model tags naming the frozen benchmark.
FROZEN_URI = "kantai.benchmark_uri"
FROZEN_SHA256 = "kantai.benchmark_sha256"
_ARTIFACT_DIR = "benchmark"
_ARTIFACT = "benchmark.txt"


@dataclass(frozen=True)
class Benchmark:
    text: Path
    """UTF-8 text, examples separated by blank lines, as a prepared split."""
    sha256: str
    source: str
    """Where it comes from, for messages and tags."""
    freeze: bool
    """This run's held-out split, to be frozen on the version this run registers."""


def benchmark_for(job: Job, run: RunDir, name: str, scratch: Path) -> Benchmark:
    """The benchmark of registered model ``name`` for this job; ``scratch`` holds downloads."""
    from kantai_batch.registry import model_tags

    if job.eval.benchmark:
        text = decoded_text(job.eval.benchmark, job.corpus.encoding, scratch / "benchmark.txt", "benchmark")
        return Benchmark(text, file_sha256(text), job.eval.benchmark, freeze=False)
    frozen = model_tags(name)
    if FROZEN_URI in frozen:
        text = _download(frozen[FROZEN_URI], scratch)
        digest = file_sha256(text)
        if digest != frozen.get(FROZEN_SHA256):
            raise InputDataError(
                f"benchmark {frozen[FROZEN_URI]} of models:/{name} does not match its checksum "
                f"{frozen.get(FROZEN_SHA256)} (tag {FROZEN_SHA256})"
            )
        return Benchmark(text, digest, frozen[FROZEN_URI], freeze=False)
    # The held-out split alone: a remote run dir's train split may be most of a large corpus.
    run.pull_file(run.eval_text)
    text = run.eval_text
    if not text.is_file():
        raise InputDataError(f"corpus {run.uri(run.eval_text)} is missing: run `kantai-batch prepare` first")
    return Benchmark(text, file_sha256(text), f"{run.uri(run.eval_text)} (frozen now)", freeze=True)


def require_unseen(benchmark: Benchmark, train_text: Path) -> None:
    """Refuse a benchmark whose examples the training split holds: the new model would be scored on text
    it trained on, and beat the champion by remembering it.

    A frozen held-out split stays held out only while ``eval.seed``, ``data.eval_fraction`` and the
    cleaning stay as they were when it was frozen; this checks the outcome, whatever changed.
    """
    wanted = {_digest(text) for text in _examples(benchmark.text.read_text(encoding="utf-8"))}
    seen = 0
    with train_text.open(encoding="utf-8") as handle:
        example: list[str] = []
        for line in handle:
            if line.strip():
                example.append(line)
                continue
            seen += _digest("".join(example).strip()) in wanted if example else 0
            example = []
        seen += _digest("".join(example).strip()) in wanted if example else 0
    if seen:
        raise JobConfigError(
            f"benchmark {benchmark.source}: {seen:,} of its {len(wanted):,} examples are in the training split "
            f"{train_text}: the new model would be scored on text it trained on (eval.seed, data.eval_fraction or "
            "the corpus's cleaning changed since it was frozen?); restore them or name another eval.benchmark"
        )


def _examples(text: str) -> list[str]:
    """A prepared split's examples: separated by blank lines."""
    return [example.strip() for example in text.split("\n\n") if example.strip()]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def freeze(benchmark: Benchmark, name: str, run_id: str) -> str:
    """Log the benchmark text as an artifact of ``run_id`` and name it on the registered model; its URI."""
    import mlflow

    from kantai_batch.registry import set_model_tags

    uri = f"runs:/{run_id}/{_ARTIFACT_DIR}/{_ARTIFACT}"
    try:
        with tempfile.TemporaryDirectory(prefix="kantai-benchmark-") as scratch:
            # Under the artifact's own name, whatever the split's file is called.
            staged = Path(scratch) / _ARTIFACT
            staged.write_bytes(benchmark.text.read_bytes())
            mlflow.MlflowClient().log_artifact(run_id, str(staged), _ARTIFACT_DIR)
    except mlflow.exceptions.MlflowException as exc:
        raise SourceUnavailableError(f"MLflow {mlflow.get_tracking_uri()}: {first_line(exc)}") from None
    set_model_tags(name, {FROZEN_URI: uri, FROZEN_SHA256: benchmark.sha256})
    log.info("benchmark: froze %s as %s for every later version of %s", benchmark.source, uri, name)
    return uri


def score(job: Job, model_dir: Path, benchmark: Benchmark, what: str) -> dict[str, Any]:
    """The loss of the model in ``model_dir`` on ``benchmark``: ``loss``, ``scored_tokens``, ``samples``."""
    from kantai_batch.data import build_split
    from kantai_batch.model import load_lm, load_model_config, load_model_tokenizer, require_positions
    from kantai_batch.objective import task_of

    config = load_model_config(model_dir)
    task = task_of(config)
    if task is None:
        raise InputDataError(f"{what} {model_dir} is neither a masked nor a causal language model")
    require_positions(config, model_dir, job.data.block_size, what)
    tokenizer = load_model_tokenizer(model_dir)
    model = load_lm(model_dir, task)
    shaped = job.model_copy(update={"task": task})
    samples = build_split(benchmark.text, shaped, tokenizer, fix_masks=task == "mlm", what="benchmark")
    try:
        total, count = _loss_sum(model, tokenizer, samples, task, job)
    except KantaiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to score leaves the alias alone, as one line
        raise InputDataError(f"{what} {model_dir} could not be scored on the benchmark: {first_line(exc)}") from None
    loss = total / count if count else math.nan
    log.info("benchmark: %s loss %.4f on %s scored tokens of %s", what, loss, f"{count:,}", benchmark.source)
    return {"loss": loss, "scored_tokens": count, "samples": len(samples)}


def _loss_sum(model, tokenizer, samples, task: str, job: Job) -> tuple[float, int]:
    """Summed cross-entropy (fp32) and the number of tokens it sums over."""
    import torch
    import torch.nn.functional as F

    from kantai_batch.objective import collator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    collate = collator(task, tokenizer, job)
    size = job.train.per_device_batch_size
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), size):
            rows = samples[start : start + size]
            features = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
            batch = {key: value.to(device) for key, value in collate(features).items()}
            labels = batch.pop("labels")
            batch.pop("special_tokens_mask", None)
            logits = model(**batch).logits.float()
            if task == "clm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            scored = labels != -100
            total += F.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
            count += int(scored.sum())
    return total, count


def _download(uri: str, scratch: Path) -> Path:
    import mlflow

    folder = scratch / "frozen-download"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except mlflow.exceptions.MlflowException as exc:
        raise SourceUnavailableError(
            f"benchmark {uri}: MLflow {mlflow.get_tracking_uri()}: {first_line(exc)}"
        ) from None
