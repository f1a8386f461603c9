"""What each phase's output depends on, as one digest recorded in its ``_COMPLETE`` marker.

``run`` redoes a phase whose folder is complete but whose recorded digest differs from the current
one: the job fields the phase reads changed, or an upstream folder was redone. Upstream folders are
identified by their manifests' file checksums, so a redone corpus with identical content does not
force a new tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kantai_batch.job import Job

# The job sections each phase reads, and the phases whose output it reads.
_READS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("corpus", "data.eval_fraction", "train.seed"), ()),
    "train-tokenizer": (("corpus", "tokenizer"), ("corpus",)),
    "pretrain": (("task", "model", "data", "train"), ("corpus", "tokenizer")),
    "evaluate": (
        ("data", "train.mlm_probability", "train.seed", "train.per_device_batch_size", "eval", "infer"),
        ("corpus", "model"),
    ),
}


def fingerprint_of(job: Job, phase: str, run=None, *, model_dir: Path | None = None) -> str:
    """The digest of everything ``phase`` reads: its job fields and its upstream folders' manifests."""
    from kantai_batch.storage import is_complete, read_marker

    fields, upstream = _READS[phase]
    data = job.model_dump(mode="json")
    parts: dict[str, Any] = {"phase": phase, "job": {name: _pick(data, name) for name in fields}}
    for name in upstream:
        if name == "model" and model_dir is not None:
            manifest = read_marker(model_dir) if is_complete(model_dir) else None
        else:
            manifest = run.marker(getattr(run, name)) if run is not None else None
        parts[name] = manifest.get("files") if manifest else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _pick(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data
