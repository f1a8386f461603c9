"""What each phase's output depends on, as one digest recorded in its ``_COMPLETE`` marker.

``run`` redoes a phase whose folder is complete but whose recorded digest differs from the current
one: the job fields the phase reads changed, or an upstream folder was redone. Both come from the
phase table, and so does whether the model ``train.init_from`` names counts too. Upstream folders are
identified by their manifests' file checksums, so a redone corpus with identical content does not
force a new tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from kantai_batch.job import InferSection, Job
from kantai_batch.manifest import is_complete, read_marker
from kantai_batch.phases import phase as phase_row
from kantai_batch.rundir import identity


def fingerprint_of(
    job: Job, phase: str, run=None, *, model_dir: Path | None = None, legacy: bool = False, as_read: bool = False
) -> str:
    """The digest of everything ``phase`` reads: its job fields and its upstream folders' manifests.

    ``model_dir`` stands in for the run's model (evaluate scoring a model from elsewhere; its ``job`` has
    that model's task). ``as_read``: the upstream folders as this process read them (a writer recording
    what its output was made from), not as the store holds them now (``run`` deciding what to redo).
    ``legacy``: the digest as recorded before 2026-12-07, which counted every field (``in_effect``) and
    the corpus's stats.json (``identity``), so that run dirs made then are not redone.
    """
    row = phase_row(phase)
    data = (job if legacy else in_effect(job)).model_dump(mode="json")
    parts: dict[str, Any] = {"phase": phase, "job": _picked(data, row.reads, row.ignores)}
    if row.version > 1:
        parts["version"] = row.version
    for upstream in map(phase_row, row.upstream):
        if upstream.output == "model" and model_dir is not None:
            found = read_marker(model_dir) if is_complete(model_dir) else None
        else:
            folder = upstream.output_of(run) if run is not None else None
            found = None if folder is None else run.marker_as_read(folder) if as_read else run.marker(folder)
        parts[upstream.output] = identity(upstream.output, found, legacy=legacy)
    if row.starts_from_model and job.train.init_from:
        from kantai_batch.continued import init_identity

        # The alias is a name; which version it points at is what the output depends on. Only when set,
        # so the fingerprints of run dirs made before train.init_from existed stand.
        parts["init_from"] = init_identity(job)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# The fields a job may set that change nothing it trains or scores, by the setting that leaves them unread.
_UNREAD_BY_CLM = {
    "train": ("mlm_probability", "mask_frequency_power", "sparse_prediction"),
    "eval": ("mlm_probability", "probes"),
    "infer": tuple(InferSection.model_fields),
}


def in_effect(job: Job) -> Job:
    """``job`` with the fields nothing reads under its other settings at their defaults: a causal LM's
    masking rate, a decay share without warmup_stable_decay, window settings without mimetic_local, a
    warm-up ratio that warmup_steps replaces, the benchmark `run --register` alone reads. Changing one
    then redoes nothing and keeps a training's checkpoints. Defaults, not dropped, so that the digests
    of jobs that never set them stand."""
    unread: dict[str, set[str]] = {"eval": {"benchmark"}}
    if job.task == "clm":
        for section, names in _UNREAD_BY_CLM.items():
            unread.setdefault(section, set()).update(names)
    train = unread.setdefault("train", set())
    if job.train.lr_scheduler != "warmup_stable_decay":
        train.add("decay_ratio")
    if job.train.warmup_steps > 0:
        train.add("warmup_ratio")
    if job.train.attention_init != "mimetic_local":
        train.update(("local_window_heads", "local_window_gain"))
    sections = {}
    for name, fields in unread.items():
        section = getattr(job, name)
        defaults = {field: type(section).model_fields[field].default for field in fields}
        sections[name] = section.model_copy(update=defaults)
    return job.model_copy(update=sections)


def _pick(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _picked(data: dict[str, Any], reads, ignores=()) -> dict[str, Any]:
    """The fields ``reads`` names, less those ``ignores`` names below them."""
    picked = {name: copy.deepcopy(_pick(data, name)) for name in reads}
    for dotted in ignores:
        head, _, rest = dotted.partition(".")
        found = picked.get(head)
        *path, last = rest.split(".")
        for part in path:
            found = found.get(part) if isinstance(found, dict) else None
        if isinstance(found, dict):
            found.pop(last, None)
    return picked


def settings_digest(job: Job, *, legacy: bool = False) -> str:
    """The job settings a trained model depends on: every field the phases up to pretrain read, but
    ``corpus.source``, whose content the corpus's own checksum stands for (the same files under another
    name train the same model). ``legacy``: as recorded before 2026-12-07, every field counted."""
    from kantai_batch.phases import before

    data = (job if legacy else in_effect(job)).model_dump(mode="json")
    rows = (*before("pretrain"), phase_row("pretrain"))
    fields = sorted({name for row in rows for name in row.reads})
    picked = _picked(data, fields, [name for row in rows for name in row.ignores])
    if isinstance(picked.get("corpus"), dict):
        picked["corpus"] = {key: value for key, value in picked["corpus"].items() if key != "source"}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def _resumable_across() -> frozenset[str]:
    """The ``train`` fields a training may change and still resume its checkpoints: how long it trains,
    whether it compiles (the same step, computed faster; still part of pretrain's fingerprint, so a
    finished model is committed again under it), and the bookkeeping pretrain's fingerprint ignores."""
    bookkeeping = (name.removeprefix("train.") for name in phase_row("pretrain").ignores)
    return frozenset({"max_steps", "epochs", "max_seconds", "torch_compile", *bookkeeping})


def checkpoint_lineage(job: Job, run, *, legacy: bool = False) -> str:
    """What a checkpoint is a step of: the run's tokenizer and samples, the model it started from and the
    training settings, the step and time bounds aside (a longer training resumes a shorter one).

    A checkpoint of another lineage belongs to an earlier training (a retraining on a grown corpus in
    the same run dir, or with another learning rate) and is not resumed. ``legacy``: as recorded before
    2026-12-07, every field counted.
    """
    from kantai_batch.continued import init_identity

    settings = (job if legacy else in_effect(job)).train.model_dump(mode="json")
    resumable = _resumable_across()
    train = {key: value for key, value in settings.items() if key not in resumable}
    parts = {
        # As this process read them: the checkpoints are steps on those samples, whatever the store holds now.
        "tokenizer": (run.marker_as_read(run.tokenizer) or {}).get("files"),
        "tokens": (run.marker_as_read(run.tokens) or {}).get("files"),
        "init_from": init_identity(job),
        "task": job.task,
        "train": train,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
