"""Both splits' samples as they are committed in ``RUN/tokens/``: Arrow shards by size and ``tokens.json``.

The one way tokens are written, whether one process made the samples or the parts of several did
(``tokens``, ``tokenize_parts``), so the folder is the same either way.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from kantai_batch.data import corpus_digest, sample_settings
from kantai_batch.job import Job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.rundir import TOKENS_STATS, RunDir

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
# By size, not by worker count: the same samples give the same files however many workers made them.
_SHARD_BYTES = 256 * 1024**2


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
