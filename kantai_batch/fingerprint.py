"""What each phase's output depends on, as one digest recorded in its ``_COMPLETE`` marker.

``run`` redoes a phase whose folder is complete but whose recorded digest differs from the current
one: the job fields the phase reads changed, or an upstream folder was redone. Both come from the
phase table. Upstream folders are identified by their manifests' file checksums, so a redone corpus
with identical content does not force a new tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kantai_batch.job import Job
from kantai_batch.manifest import is_complete, read_marker
from kantai_batch.phases import phase as phase_row


def fingerprint_of(job: Job, phase: str, run=None, *, model_dir: Path | None = None) -> str:
    """The digest of everything ``phase`` reads: its job fields and its upstream folders' manifests.

    ``model_dir`` stands in for the run's model (evaluate scoring a model from elsewhere).
    """
    row = phase_row(phase)
    data = job.model_dump(mode="json")
    parts: dict[str, Any] = {"phase": phase, "job": {name: _pick(data, name) for name in row.reads}}
    if row.version > 1:
        parts["version"] = row.version
    for upstream in map(phase_row, row.upstream):
        if upstream.output == "model" and model_dir is not None:
            found = read_marker(model_dir) if is_complete(model_dir) else None
        else:
            found = run.marker(upstream.output_of(run)) if run is not None else None
        parts[upstream.output] = found.get("files") if found else None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _pick(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data
