"""Retraining that promotes only a better model (``run --register NAME``), and moving aliases by hand.

``run --register NAME``:

1. asks the registry for ``NAME@champion`` first, so an unreachable registry fails before any work;
2. redoes prepare, since a corpus source that grew in place (an S3 prefix with a new week in it) has
   the same job settings; when the corpus's checksum and the job's settings equal the champion's
   lineage, nothing more is done;
3. runs the other phases as ``run`` does (from ``train.init_from`` when set);
4. scores the new model and the champion on the benchmark (``benchmark``), in this process;
5. registers the new version with both scores and its lineage as tags, and moves ``champion`` to it
   only if its loss is lower by at least ``register.min_improvement``; otherwise the version gets
   ``challenger``. The alias moves last, so a failure anywhere before leaves it where it was, and the
   version's ``promotion`` tag (the decision) is written after it: a version without one was
   registered by a run that did not finish, and the next run decides for it rather than registering
   the same model again.

``promote`` moves an alias by hand, the only way ``champion`` goes to a model that scored worse.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.benchmark import Benchmark, benchmark_for, require_unseen
from kantai_batch.errors import InputDataError, JobConfigError, TrainingDivergedError
from kantai_batch.job import Job
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# Version tags: the scores and the lineage a later run compares with.
BENCHMARK_LOSS = "benchmark_loss"
CHAMPION_LOSS = "champion_loss"
BENCHMARK_SHA256 = "benchmark_sha256"
CORPUS_SHA256 = "corpus_sha256"
JOB_SHA256 = "job_sha256"
MODEL_SHA256 = "model_sha256"
DECISION = "promotion"
_BY_RUN = "kantai-batch run --register (benchmark)"


@dataclass(frozen=True)
class Outcome:
    line: str
    """What happened and why, in one line."""
    trained: bool
    """The run dir holds a model of this run to show."""
    promoted: bool
    """The run's model is the champion."""


def retrain(job: Job, run: RunDir, name: str, *, track: bool) -> Outcome | None:
    """Bring ``name``'s champion up to date with the corpus; None on processes other than the main one."""
    from kantai_batch.distributed import is_main_process
    from kantai_batch.fingerprint import settings_digest
    from kantai_batch.phases import PHASES
    from kantai_batch.pipeline import run_pipeline
    from kantai_batch.registry import set_version_tags, version_by_alias, version_tags

    champion = version_by_alias(name, CHAMPION)
    lineage = version_tags(name, champion) if champion else {}
    if champion and not job.train.init_from:
        log.warning(
            "register: train.init_from is unset, so the new model trains from random weights; if its tokenizer is "
            "trained anew (the corpus changed), its benchmark loss will not compare with %s version %s's and it "
            "will not be promoted automatically",
            name,
            champion,
        )
    run_pipeline(job, run, track=track, phases=PHASES[:1], redo=("prepare",))
    corpus_sha = _corpus_sha256(run)
    job_sha = settings_digest(job)
    # A champion tagged before 2026-12-07 has the digest of every field (fingerprint.in_effect came later).
    same_job = lineage.get(JOB_SHA256) in (job_sha, settings_digest(job, legacy=True))
    if champion and lineage.get(CORPUS_SHA256) == corpus_sha and same_job:
        if DECISION not in lineage and is_main_process():
            # The run that moved the alias stopped before it recorded why: the record is the audit trail.
            set_version_tags(
                name,
                champion,
                {DECISION: f"promoted: {name} version {champion} is {CHAMPION} (recorded by a later run: the run "
                 "that moved the alias stopped before writing its decision)"},
            )  # fmt: skip
        return Outcome(
            f"nothing to do: the corpus (sha256 {corpus_sha[:12]}) and the job's settings are those {name} "
            f"version {champion} (@{CHAMPION}) was trained on; nothing trained, no new version",
            trained=False,
            promoted=True,
        )
    with tempfile.TemporaryDirectory(prefix="kantai-promote-") as scratch:
        # Found before training, not after it: a mistyped eval.benchmark must not cost a whole training.
        benchmark = benchmark_for(job, run, name, Path(scratch))
        # Every process that has the split (prepare was just redone: on this node's disk) refuses alike, so
        # no rank goes on to train while another has stopped.
        if run.train_text.is_file():
            require_unseen(benchmark, run.train_text)
        try:
            run_pipeline(job, run, track=track, phases=PHASES[1:])
        except TrainingDivergedError as diverged:
            raise TrainingDivergedError(f"{diverged}; nothing registered, {_stays(name, champion)}") from diverged
        if not is_main_process():
            return None
        return _decide(job, run, name, champion, benchmark, {CORPUS_SHA256: corpus_sha, JOB_SHA256: job_sha})


def _decide(
    job: Job, run: RunDir, name: str, champion: str | None, benchmark: Benchmark, lineage: dict[str, str]
) -> Outcome:
    from kantai_batch.benchmark import freeze, score
    from kantai_batch.registry import (
        cached_pull,
        log_metrics,
        move_alias,
        register,
        set_version_tags,
        version_by_alias,
    )
    from kantai_batch.sources import cache_dir

    run.require(run.model, "model", "pretrain")
    model_sha = _model_sha256(run)
    existing = next((row for row in _versions_or_none(name) if row["tags"].get(MODEL_SHA256) == model_sha), None)
    if existing and DECISION in existing["tags"]:
        aliases = ", ".join(f"@{alias}" for alias in existing["aliases"]) or "no alias"
        return Outcome(
            f"nothing new: the run's model is already {name} version {existing['version']} ({aliases}); "
            "not registered again",
            trained=True,
            promoted=existing["version"] == champion,
        )
    stays = _stays(name, champion)
    _require_finite_training(run, stays)
    new_loss = score(job, run.model, benchmark, "new model")["loss"]
    if not math.isfinite(new_loss):
        raise InputDataError(f"pretrain diverged: the new model's benchmark loss is {new_loss}; {stays}")
    old_loss, unlike = None, None
    if champion:
        champion_dir = cached_pull(f"models:/{name}/{champion}", cache_dir())
        old_loss = score(job, champion_dir, benchmark, f"champion version {champion}")["loss"]
        unlike = _unlike(run.model, champion_dir)
    bar = None if old_loss is None else old_loss * (1 - job.register.min_improvement)
    promoted = unlike is None and (bar is None or not math.isfinite(bar) or new_loss <= bar)
    tags = {
        **lineage,
        MODEL_SHA256: model_sha,
        BENCHMARK_LOSS: f"{new_loss:.6f}",
        CHAMPION_LOSS: "none" if old_loss is None else f"{old_loss:.6f}",
        "champion_version": champion or "none",
        BENCHMARK_SHA256: benchmark.sha256,
        "benchmark": benchmark.source,
    }
    if existing:
        version, run_id = existing["version"], existing["run_id"]
        set_version_tags(name, version, tags)
    else:
        registered = register(run.model, name, tags=tags)
        version, run_id = registered["version"], registered["run_id"]
    metrics = {"benchmark_loss": new_loss, **({"champion_loss": old_loss} if old_loss is not None else {})}
    log_metrics(run_id, metrics)
    if benchmark.freeze:
        freeze(benchmark, name, run_id)
    line = _explain(name, version, champion, new_loss, old_loss, promoted, job.register.min_improvement)
    if unlike:
        line = (
            f"not promoted: {name} version {version} is {CHALLENGER}: {unlike}, so its benchmark loss {new_loss:.4f} "
            f"does not compare with version {champion}'s {old_loss:.4f}; {CHAMPION} stays version {champion} "
            f"(`kantai-batch promote models:/{name}/{version}` moves it by hand)"
        )
    now = version_by_alias(name, CHAMPION)
    if promoted and now != champion:
        # Moved (by hand) while this run trained: the new model was not compared with that one. (The
        # registry has no compare-and-set; this narrows the window to the next call.)
        promoted = False
        line = (
            f"not promoted: {name} version {version} is {CHALLENGER}: {CHAMPION} moved from "
            f"{'version ' + champion if champion else 'unset'} to version {now} while this run trained, and it was "
            "not scored against that one"
        )
    move_alias(name, CHAMPION if promoted else CHALLENGER, version, by=_BY_RUN)
    set_version_tags(name, version, {DECISION: line})
    return Outcome(line, trained=True, promoted=promoted)


def _unlike(model_dir: Path, champion_dir: Path) -> str | None:
    """Why two models' benchmark losses do not compare; None when they do.

    The loss is a mean over the tokens each model's own tokenizer makes of the text (the masked ones of
    a masked LM, every next one of a causal LM): with other tokenizers, or tasks, those are other
    predictions. A retraining from scratch trains a new tokenizer.
    """
    from kantai_batch.data import tokenizer_digest
    from kantai_batch.model import load_model_config, load_model_tokenizer
    from kantai_batch.objective import task_of

    new_task, old_task = (task_of(load_model_config(folder)) for folder in (model_dir, champion_dir))
    if new_task != old_task:
        return f"it is a {new_task} model and the champion a {old_task} one"
    new_tokens, old_tokens = (tokenizer_digest(load_model_tokenizer(folder)) for folder in (model_dir, champion_dir))
    if new_tokens != old_tokens:
        return (
            "its tokenizer is not the champion's (trained anew on another corpus with train.init_from unset, "
            "or another model's)"
        )
    return None


def _explain(
    name: str,
    version: str,
    champion: str | None,
    new: float,
    old: float | None,
    promoted: bool,
    min_improvement: float,
) -> str:
    if old is None:
        return f"promoted: {name} version {version} is {CHAMPION} (benchmark loss {new:.4f}; there was no {CHAMPION})"
    change = f"{(new - old) / old:+.2%}" if old else "n/a"
    versus = f"benchmark loss {new:.4f} vs {old:.4f} of version {champion} ({change}"
    if promoted:
        return f"promoted: {name} version {version} is {CHAMPION}: {versus}; at least {min_improvement:.1%} lower)"
    return (
        f"not promoted: {name} version {version} is {CHALLENGER}: {versus}; register.min_improvement asks for "
        f"at least {min_improvement:.1%} lower); {CHAMPION} stays version {champion}"
    )


def promote(uri: str, alias: str) -> str:
    """``kantai-batch promote``: move ``alias`` to the version ``uri`` names; one line saying what moved."""
    from kantai_batch.registry import is_registry_uri, move_alias, require_alias, resolve_version

    if not is_registry_uri(uri):
        raise JobConfigError(f"{uri} is not a registry URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    require_alias(alias, "alias")
    resolved = resolve_version(uri)
    if resolved is None:
        raise InputDataError(f"{uri} does not exist")
    name, version = resolved
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid may have no name
        user = "unknown"
    previous = move_alias(name, alias, version, by=f"kantai-batch promote {uri} --alias {alias} (user {user})")
    return f"{name}@{alias}: version {version} (was {'version ' + previous if previous else 'unset'})"


def model_table(name: str) -> list[dict[str, Any]]:
    """``kantai-batch models``: each version's aliases, benchmark loss and corpus checksum, oldest first."""
    from kantai_batch.registry import versions

    rows = []
    for row in versions(name):
        loss = row["tags"].get(BENCHMARK_LOSS)
        rows.append(
            {
                "version": row["version"],
                "aliases": row["aliases"],
                "benchmark_loss": float(loss) if loss else None,
                "corpus_sha256": row["tags"].get(CORPUS_SHA256),
                "created_ms": row["created_ms"],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    import datetime

    lines = [f"{'version':>7}  {'aliases':<22}  {'benchmark_loss':>14}  {'corpus_sha256':<12}  created (UTC)"]
    for row in rows:
        created = datetime.datetime.fromtimestamp(row["created_ms"] / 1000, datetime.UTC) if row["created_ms"] else None
        loss = f"{row['benchmark_loss']:.4f}" if row["benchmark_loss"] is not None else "-"
        lines.append(
            f"{row['version']:>7}  {', '.join(row['aliases']) or '-':<22}  {loss:>14}  "
            f"{(row['corpus_sha256'] or '-')[:12]:<12}  {f'{created:%Y-%m-%d %H:%M}' if created else '-'}"
        )
    return lines


def _versions_or_none(name: str) -> list[dict[str, Any]]:
    """The versions of ``name``; none where the model is not registered yet."""
    from kantai_batch.registry import model_exists, versions

    return versions(name) if model_exists(name) else []


def _corpus_sha256(run: RunDir) -> str:
    """The corpus's checksum as prepare read it (stats.json's ``source_sha256``)."""
    run.pull_file(run.corpus_stats)
    return str(json.loads(run.corpus_stats.read_text(encoding="utf-8")).get("source_sha256", ""))


def _stays(name: str, champion: str | None) -> str:
    return f"{name}@{CHAMPION} stays {'version ' + champion if champion else 'unset'}"


def _model_sha256(run: RunDir) -> str:
    import hashlib

    files = (run.marker(run.model) or {}).get("files")
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _require_finite_training(run: RunDir, stays: str) -> None:
    """A model whose held-out loss is not finite diverged. (Pretrain stops a run whose training loss
    does; a model of an older run dir, or one resumed after its budget, has no training loss to tell.)"""
    summary = json.loads(run.train_summary.read_text(encoding="utf-8"))
    value = summary.get("eval_loss")
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise InputDataError(
            f"pretrain diverged: eval_loss is {value} in {run.uri(run.train_summary)}; nothing registered, {stays}"
        )
