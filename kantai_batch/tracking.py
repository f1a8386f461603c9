"""MLflow: one run per training job, continued across resumes, holding params, curves and the model.

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` when set, else MLflow's local default
store, so ``mlflow ui`` in the same folder shows the runs. The Trainer's MLflow callback logs the
loss curve and eval metrics into the run opened here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.errors import JobConfigError, KantaiError, PreemptedError, SourceUnavailableError, first_line
from kantai_batch.job import Job
from kantai_batch.manifest import write_json_atomic
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)

# MLflow's own patience (7 retries with backoff, about 4 minutes, each request allowed 120 s) is for a
# server that blips during a long training, not for one that is not there at the start: a first,
# cheap request with few short retries finds that in seconds. Settings the user made are kept.
_FIRST_CONTACT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_reached: set[str] = set()
# What MLflow's stores answer for a run or model that is not there (a file store: an invalid id).
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def first_contact() -> None:
    """Ask a tracking server (not a local store) for one experiment, once per process, with
    ``_FIRST_CONTACT``'s retries; an unreachable one raises MLflow's error in seconds."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri in _reached or not uri.startswith(("http://", "https://")):
        return
    with _short_patience():
        mlflow.MlflowClient().search_experiments(max_results=1)
    _reached.add(uri)


@contextlib.contextmanager
def _short_patience() -> Iterator[None]:
    """MLflow's requests in this block retry as ``_FIRST_CONTACT`` says, unless the user set otherwise."""
    set_here = {name: value for name, value in _FIRST_CONTACT.items() if name not in os.environ}
    os.environ.update(set_here)
    try:
        yield
    finally:
        for name in set_here:
            os.environ.pop(name, None)


def _answers() -> bool:
    """Whether the tracking store answers now, asked with short patience. When it does not (a server
    gone during training), MLflow's remaining requests in this process (the queued metrics it flushes
    when the run ends, the end itself) get short patience too, and their retry logs are quieted: they
    would hold the finished pod for minutes and fill its log with pages; one warning says it instead."""
    import mlflow

    try:
        with _short_patience():
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception:  # noqa: BLE001 - whatever the store's failure, the answer is no
        for name, value in _FIRST_CONTACT.items():
            os.environ.setdefault(name, value)
        for noisy in ("urllib3.connectionpool", "mlflow.utils.async_logging.async_logging_queue"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        return False
    return True


def store_failure(exc: Exception) -> KantaiError | None:
    """The one-line error for a database-backed store that fails below MLflow (its own errors aside), or None.

    MLflow lets SQLAlchemy's errors through: a ``sqlite:`` URI naming a file that is not a database, a
    database server that refuses the login. An unreachable or locked database may answer a retry.
    """
    import mlflow

    try:
        from sqlalchemy.exc import OperationalError, SQLAlchemyError
    except ImportError:
        return None
    if not isinstance(exc, SQLAlchemyError):
        return None
    error = SourceUnavailableError if isinstance(exc, OperationalError) else JobConfigError
    return error(f"MLflow tracking store {mlflow.get_tracking_uri()}: {first_line(getattr(exc, 'orig', None) or exc)}")


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    continued: bool
    """A resumed training's run, which holds its params and the steps logged before."""


@contextlib.contextmanager
def pretrain_run(job: Job, run: RunDir, *, enabled: bool, resuming: bool, lineage: str) -> Iterator[TrackedRun | None]:
    """The MLflow run of this run dir's training; ``None`` on ranks other than 0 or when disabled.

    A resumed training continues the run its checkpoints were logged to, also under longer bounds (the
    checkpoints' ``lineage`` is unchanged: the same training, told to go on); a fresh one starts a new
    run, so a loss history never restarts at step 0 inside one run. The run ends FINISHED, FAILED, or
    KILLED when preempted (its resumption continues it); a store that no longer answers then is a
    warning, not a failure of the training it tracked.
    """
    if not enabled:
        yield None
        return
    import mlflow

    job_yaml = job.to_yaml()
    job_sha = hashlib.sha256(job_yaml.encode()).hexdigest()
    try:
        first_contact()
        mlflow.set_experiment(job.name)
        if resuming:
            run.pull_file(run.mlflow_run)
        recorded = _recorded(run.mlflow_run) if resuming else {}
        run_id = _run_to_continue(recorded, lineage, job_sha) if recorded else None
        active = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{job.name}-pretrain")
    except mlflow.exceptions.MlflowException as exc:
        raise SourceUnavailableError(f"MLflow tracking store {mlflow.get_tracking_uri()}: {first_line(exc)}") from None
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:
            raise
        raise failure from None
    status = "FAILED"
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        record = {"run_id": active.info.run_id, "job_sha256": job_sha, "lineage_sha256": lineage}
        write_json_atomic(run.mlflow_run, record)
        run.push_file(run.mlflow_run)
        params = _job_params(job)
        if run_id is None:
            mlflow.log_params(params)
            mlflow.set_tags(lineage_tags(job, run))
        if run_id is None or recorded.get("job_sha256") != job_sha:
            # A continued run's params stay the first session's (MLflow keeps a param's first value);
            # job.yaml is the job it trains by now (longer bounds, another save interval).
            mlflow.log_text(job_yaml, "job.yaml")
        if run_id is not None and recorded.get("job_sha256") != job_sha:
            _tag_changed_params(active, params)
        log.info(
            "mlflow: %s run %s in %s",
            "continuing" if run_id else "started",
            active.info.run_id,
            mlflow.get_tracking_uri(),
        )
        yield TrackedRun(active.info.run_id, continued=run_id is not None)
        status = "FINISHED"
    except PreemptedError:
        status = "KILLED"
        raise
    finally:
        _end_run(active.info.run_id, status)


def _end_run(run_id: str, status: str) -> None:
    import mlflow

    try:
        if not _answers():
            raise SourceUnavailableError("it does not answer")
        mlflow.end_run(status)
    except Exception as exc:  # noqa: BLE001 - the training's outcome stands whatever the store says
        # Ended locally all the same (MLflow clears its active run before asking the store): a later
        # phase of this process starts or continues runs of its own.
        with contextlib.suppress(Exception):
            mlflow.end_run(status)
        log.warning(
            "mlflow: run %s could not be marked %s in %s (%s); it shows RUNNING there",
            run_id, status, mlflow.get_tracking_uri(), first_line(exc),
        )  # fmt: skip


# A continued run's tag per param a later session changed: its value now, beside the first one MLflow keeps.
_NOW_TAG = "kantai.now."


def _job_params(job: Job) -> dict[str, Any]:
    from transformers.utils import flatten_dict

    return flatten_dict(job.model_dump(mode="json"), parent_key="job")


def _tag_changed_params(active: Any, params: dict[str, Any]) -> None:
    """Someone reading the run's params sees the job it trains by now: each param whose value differs from
    the first session's gets a ``kantai.now.<param>`` tag; one changed back loses it."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    first, tags = active.data.params, active.data.tags
    # MLflow keeps a param as the text of its value (an int 40 is "40"), and of a long one (a corpus of many
    # files) only its head: compared as such, else every long param read as changed.
    changed = {
        f"{_NOW_TAG}{key}": str(value)
        for key, value in params.items()
        if first.get(key) != str(value)[:MAX_PARAM_VAL_LENGTH]
    }
    if changed:
        mlflow.set_tags(changed)
    for stale in (tag for tag in tags if tag.startswith(_NOW_TAG) and tag not in changed):
        mlflow.delete_tag(stale)


def lineage_tags(job: Job, run: RunDir) -> dict[str, str]:
    """Where the model comes from: corpus and its checksum, tokenizer checksum, code and image versions."""
    tags = {
        "kantai.run_dir": run.uri(run.root) if run.is_remote else str(run.root.resolve()),
        "kantai.corpus": job.corpus.source_label,
    }
    stats = run.corpus_stats
    # Pretrain reads tokens, not the corpus: on a fresh pod only this small file of it is fetched.
    run.pull_file(stats)
    if stats.is_file():
        # What prepare really read, which a later phase's --corpus or job file need not repeat.
        prepared = json.loads(stats.read_text(encoding="utf-8"))
        source = prepared.get("source", job.corpus.source_label)
        tags["kantai.corpus"] = ", ".join(source) if isinstance(source, list) else source
        tags["kantai.corpus_sha256"] = prepared.get("source_sha256", "")
    tokenizer = run.marker(run.tokenizer)
    if tokenizer:
        tags["kantai.tokenizer_sha256"] = hashlib.sha256(
            json.dumps(tokenizer.get("files"), sort_keys=True).encode()
        ).hexdigest()
    commit = _git_commit()
    if commit:
        tags["kantai.git_commit"] = commit
    for variable, tag in (("KANTAI_IMAGE", "kantai.image"), ("KANTAI_GIT_COMMIT", "kantai.git_commit")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def _git_commit() -> str | None:
    """The commit of the checkout the package runs from, when it runs from one."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def log_model(tracked: TrackedRun, folder: Path) -> None:
    """Log the committed model into the run; a store that fails here is a warning: the model is
    committed, and ``register`` logs it again from the run dir."""
    import mlflow

    try:
        if not _answers():
            raise SourceUnavailableError("it does not answer")
        mlflow.log_artifacts(str(folder), artifact_path="model")
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning(
            "mlflow: the model committed to %s is not logged to run %s in %s (%s); register logs it from there",
            folder, tracked.run_id, mlflow.get_tracking_uri(), first_line(exc),
        )  # fmt: skip


def _recorded(id_file: Path) -> dict[str, Any]:
    return json.loads(id_file.read_text(encoding="utf-8")) if id_file.is_file() else {}


def _run_to_continue(recorded: dict[str, Any], lineage: str, job_sha: str) -> str | None:
    """The run a resumed training continues: the recorded one, if it exists and trains the same lineage
    (records written before lineages were kept: the same job)."""
    same = (
        recorded.get("lineage_sha256") == lineage
        if "lineage_sha256" in recorded
        else recorded.get("job_sha256") == job_sha
    )
    if not same:
        log.info("mlflow: the training changed since run %s, starting a new run", recorded.get("run_id"))
        return None
    run_id = recorded.get("run_id")
    if not run_exists(run_id):
        log.warning("mlflow: run %s is not in this tracking store, starting a new run", run_id)
        return None
    return run_id


def run_exists(run_id: str | None) -> bool:
    """Whether the tracking store holds run ``run_id``, which a resumed training or a registration may log to."""
    import mlflow

    if not run_id:
        return False
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        # Not there (a file store says the id is invalid). Anything else, a store out of reach for a
        # moment, is raised: taken for "not there", a resumed training started a second run.
        if exc.error_code in MISSING:
            return False
        raise
    return True
