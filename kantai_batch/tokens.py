"""tokenize: both splits' samples, tokenized once into ``RUN/tokens/`` as memory-mapped Arrow shards.

``RUN/tokens/train/`` and ``RUN/tokens/eval/`` are ``datasets`` folders (``save_to_disk``), read back
by pretrain and evaluate with ``load_from_disk``, which memory-maps the shards: no rank tokenizes, and
their start-up time and memory do not grow with the corpus. Eval samples of a masked LM carry their
fixed masks, so every evaluation scores the same masked tokens. ``tokens.json`` records the sample and
token counts and the settings, tokenizer and corpus the samples were made from, which readers check.

``workers`` processes tokenize and write the shards; the samples do not depend on how many. Several
pods (or processes) can each make a part of them and the last one commits the folder: ``tokenize_parts``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from kantai_batch.data import build_split, corpus_digest, sample_settings
from kantai_batch.errors import JobConfigError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.model import load_tokenizer
from kantai_batch.rundir import TOKENS_STATS, RunDir

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
# By size, not by worker count: the same samples give the same files however many workers made them.
_SHARD_BYTES = 256 * 1024**2


def tokenize(job: Job, run: RunDir, *, workers: int | None = None, part: int = 0, parts: int = 1) -> Path | None:
    """Tokenize ``RUN/corpus/{train,eval}.txt`` with ``RUN/tokenizer``; return the committed tokens folder.

    With ``parts`` above 1 this process makes only part ``part`` of them (see ``tokenize_parts``) and
    returns the tokens folder only if it was the one that committed it.
    """
    if not 0 <= part < parts:
        raise JobConfigError(f"tokenize: part {part} of {parts} does not exist: parts are numbered 0 to {parts - 1}")
    run.require(run.corpus, "corpus", "prepare")
    tokenizer = load_tokenizer(run.require(run.tokenizer, "tokenizer", "train-tokenizer"))
    workers = workers or job.data.tokenize_workers
    if parts > 1:
        from kantai_batch.tokenize_parts import tokenize_part

        return tokenize_part(job, run, tokenizer, index=part, count=parts, workers=workers)
    texts = {"train": run.train_text, "eval": run.eval_text}
    with run.committed(run.tokens, inputs_sha256=fingerprint_of(job, "tokenize", run)) as out:
        samples = {
            split: build_split(
                texts[split],
                job,
                tokenizer,
                fix_masks=split == "eval" and job.task == "mlm",
                what=f"{split} split",
                workers=workers,
            )
            for split in SPLITS
        }
        write_splits(out, samples, job, run, tokenizer, workers=workers)
    return run.tokens


def write_splits(out: Path, samples: dict[str, Any], job: Job, run: RunDir, tokenizer, *, workers: int | None) -> None:
    """Save both splits' samples as shards in ``out`` (a scratch tokens folder) with their ``tokens.json``."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = max(1, math.ceil(samples[split].data.nbytes / _SHARD_BYTES))
        writers = min(workers or 1, shards)
        samples[split].save_to_disk(str(out / split), num_shards=shards, num_proc=writers if writers > 1 else None)
        splits[split] = {
            "samples": len(samples[split]),
            "tokens": token_count(samples[split]),
            "shards": shards,
            "settings": sample_settings(job, split, tokenizer),
        }
    write_json_atomic(out / TOKENS_STATS, {"splits": splits, "corpus_sha256": corpus_digest(run)})
    for split, stats in splits.items():
        log.info(
            "tokenize: %s split: %s samples, %s tokens in %d shard(s)",
            split,
            f"{stats['samples']:,}",
            f"{stats['tokens']:,}",
            stats["shards"],
        )


def token_count(samples) -> int:
    """Tokens in all samples (padding comes only at batching), counted in Arrow without loading a column."""
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(samples.data.column("input_ids"))).as_py() or 0
