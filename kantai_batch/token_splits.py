"""Both splits' samples as they are committed in ``RUN/tokens/``: Arrow shards by size and ``tokens.json``.

The one way tokens are written, whether one process made the samples or the parts of several did
(``tokens``, ``tokenize_parts``), so the folder is the same either way.
"""

from __future__ import annotations

import hashlib
import json
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


def write_splits(
    out: Path, samples: dict[str, Any], job: Job, run: RunDir, tokenizer, *, workers: int | None, inputs: str
) -> None:
    """Save both splits' samples as shards in ``out`` (a scratch tokens folder) with their ``tokens.json``;
    ``inputs`` is the tokenize phase's fingerprint."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = max(1, math.ceil(samples[split].data.nbytes / _SHARD_BYTES))
        writers = min(workers or 1, shards)
        samples[split].save_to_disk(str(out / split), num_shards=shards, num_proc=writers if writers > 1 else None)
        _as_made_from(out / split, inputs, split)
        splits[split] = {
            "samples": len(samples[split]),
            "tokens": token_count(samples[split]),
            "shards": shards,
            "settings": sample_settings(job, split, tokenizer),
        }
    write_json_atomic(out / TOKENS_STATS, {"splits": splits, "corpus_sha256": corpus_digest(run, as_read=True)})
    for split, stats in splits.items():
        log.info(
            "tokenize: %s split: %s samples, %s tokens in %d shard(s)",
            split,
            f"{stats['samples']:,}",
            f"{stats['tokens']:,}",
            stats["shards"],
        )


def _as_made_from(folder: Path, inputs: str, split: str) -> None:
    """``datasets``' ``state.json`` records how the samples were made: their fingerprint hashes the
    transforms (one process's map, or a concatenation of parts), and a format and split name come along.
    The same samples made in parts or by one process differed only there, and a checkpoint's lineage,
    which digests the committed files, took them for another training's: resumed after tokens were
    made again the other way, pretrain started over. It records what they were made from instead."""
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state.update(
        _fingerprint=hashlib.sha256(f"{inputs}/{split}".encode()).hexdigest()[:16],
        _format_columns=None,
        _format_kwargs={},
        _format_type=None,
        _output_all_columns=False,
        _split=None,
    )
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")


def token_count(samples) -> int:
    """Tokens in all samples (padding comes only at batching), counted in Arrow without loading a column."""
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(samples.data.column("input_ids"))).as_py() or 0
