"""The MLflow model registry: register a trained model, pull a registered one back as a model folder.

``register`` logs the model as an MLflow ``transformers`` model (so MLflow's own tooling can serve
it) into the training run when the tracking store has it (lineage from registry version to losses),
else into a new run, and registers a new version under NAME, optionally moving an alias to it.
``pull`` downloads ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` and lays it out as the plain
model folder (config, weights, tokenizer; committed with a marker) that every command loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError, JobConfigError, SourceUnavailableError, first_line
from kantai_batch.manifest import committed_dir, is_complete
from kantai_batch.model import load_lm, load_model_config, load_model_tokenizer, saved_job
from kantai_batch.objective import task_of
from kantai_batch.rundir import JOB_FILE, TRAIN_SUMMARY
from kantai_batch.tracking import MISSING, run_exists

log = logging.getLogger(__name__)

PIPELINE_TASKS = {"mlm": "fill-mask", "clm": "text-generation"}
_JOB_METADATA = "kantai_job_yaml"


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def registered_name(uri: str) -> str:
    """The model's name in ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (a bare NAME as it is)."""
    if not is_registry_uri(uri):
        return uri
    return uri.removeprefix("models:/").split("/", 1)[0].split("@", 1)[0]


# MLflow's rules for names and aliases (mlflow.utils.validation, 3.x), kept here: its own checks are
# private and were renamed in 3.18, and MLflow applies them only when registering, after a whole training.
_ALIAS = re.compile(r"[\w\-]{1,255}")
_VERSION_ALIAS = re.compile(r"[vV]\d+")


def require_model_name(name: str, option: str) -> None:
    """MLflow's rule for registered names, checked up front, and two of ours: no '@'
    (``models:/NAME@ALIAS`` would split it) and no ``$(`` (a Kubernetes variable the pod did not define
    is left in the text as it is)."""
    import posixpath

    problem = None
    if not name.strip():
        problem = "it is empty"
    elif "/" in name or ":" in name:
        problem = "names cannot contain '/' or ':'"
    elif posixpath.normpath(name) != name or name == "." or name.startswith(".."):
        problem = "it must be a plain name, not a path"
    elif "@" in name or "$(" in name:
        problem = "without '@' (models:/NAME@ALIAS) or '$(' (a Kubernetes variable that was not defined)"
    if problem:
        raise JobConfigError(f"{option} {name!r} is not a registered model name: {problem}")


def require_alias(alias: str, option: str) -> None:
    """MLflow's alias rules (its reserved names case-insensitively, as its store applies them), and ours:
    a leading digit would read as a version (models:/NAME/3 vs @3 in messages)."""
    if not _ALIAS.fullmatch(alias):
        raise JobConfigError(
            f"{option} {alias!r} is not an alias MLflow takes: 1 to 255 letters, digits, underscores (_) and dashes (-)"
        )
    if alias.lower() == "latest" or _VERSION_ALIAS.fullmatch(alias):
        raise JobConfigError(f"{option} {alias!r} is not an alias MLflow takes: it is reserved ('latest', 'v<N>')")
    if alias[0].isdigit():
        raise JobConfigError(f"{option} {alias!r} must start with a letter or '_'")


def register(
    model_dir: Path, name: str, alias: str | None = None, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Log ``model_dir`` as an MLflow transformers model and register a new version of ``name``.

    ``tags`` are set on the version before any alias moves to it.
    """
    import mlflow

    config = load_model_config(model_dir)
    task = task_of(config)
    if task is None:
        raise InputDataError(f"model {model_dir} is neither a masked nor a causal language model")
    summary_file = model_dir / TRAIN_SUMMARY
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    job_file = model_dir / JOB_FILE
    with _tracking_errors():
        # The tracking store is reached before the weights are read, so an unreachable one fails fast.
        trained_in = summary.get("mlflow_run_id")
        run_id = trained_in if run_exists(trained_in) else None
        if run_id is None:
            # The experiment is set by name every time: an id cached from another tracking store is
            # meaningless in this one.
            mlflow.set_experiment(_experiment_of(model_dir))
        tokenizer = load_model_tokenizer(model_dir)
        model = load_lm(model_dir, task)
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"register-{name}"):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                task=PIPELINE_TASKS[task],
                name="registered-model",
                pip_requirements=_requirements(),
                # The job it was trained by travels in the MLmodel file, and `pull` puts it back beside
                # the weights: what blocks it was trained on, what its experiment is called.
                metadata={_JOB_METADATA: job_file.read_text(encoding="utf-8")} if job_file.is_file() else None,
            )
            # The version is created with its tags in one request: a run stopped (or a store failing) after
            # a separate create would leave a version without them, which the next run cannot recognise
            # as its model (``promotion`` looks versions up by their model_sha256 tag) and registers again.
            registered = mlflow.register_model(info.model_uri, name, tags=tags or None)
        version = str(registered.version)
        client = mlflow.MlflowClient()
        if alias:
            client.set_registered_model_alias(name, alias, version)
    log.info("registry: %s version %s%s from %s", name, version, f" (@{alias})" if alias else "", model_dir)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "model_uri": f"models:/{name}/{version}",
        "run_id": info.run_id,
    }


def pull(uri: str, out: Path) -> Path:
    """Download a registered model into ``out`` as a plain, committed model folder."""
    import mlflow

    if not is_registry_uri(uri):
        raise JobConfigError(f"{uri} is not a registry URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    name, version = _resolve(uri)
    with tempfile.TemporaryDirectory(prefix="kantai-pull-") as scratch, _tracking_errors(uri):
        downloaded = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=scratch)
        )
        weights = downloaded / "model"
        tokenizer = downloaded / "components" / "tokenizer"
        if not (weights / "config.json").is_file():
            raise InputDataError(f"{uri} is not a transformers model logged by kantai-batch register")
        # A model without its weights or tokenizer would be committed, and a cache would keep serving it.
        missing = [
            what
            for what, found in (
                ("weights", any((weights / file).is_file() for file in _WEIGHT_FILES)),
                ("tokenizer", (tokenizer / "tokenizer_config.json").is_file()),
            )
            if not found
        ]
        if missing:
            raise InputDataError(
                f"{uri} was downloaded without its {' and '.join(missing)}: its artifacts are incomplete"
            )
        job = _logged_job(downloaded)
        with committed_dir(out) as folder:
            for source in (weights, tokenizer):
                if source.is_dir():
                    shutil.copytree(source, folder, dirs_exist_ok=True)
            if job is not None:
                (folder / JOB_FILE).write_text(job, encoding="utf-8")
    log.info("registry: %s pulled into %s", uri, out)
    return out


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _logged_job(downloaded: Path) -> str | None:
    """The job file ``register`` put in the logged model's MLmodel metadata; None for a model logged without."""
    import yaml

    mlmodel = downloaded / "MLmodel"
    data = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) if mlmodel.is_file() else None
    job = ((data or {}).get("metadata") or {}).get(_JOB_METADATA) if isinstance(data, dict) else None
    return job if isinstance(job, str) else None


def cached_pull(uri: str, cache: Path) -> Path:
    """``pull`` into the cache, once per concrete version (an alias is looked up every time).

    The folder is named by when the version was created too: a version number of another tracking store,
    or of a model deleted and registered again (from the same training run, continued), is another model.
    """
    import mlflow

    name, version = _resolve(uri)
    with _tracking_errors(uri):
        found = mlflow.MlflowClient().get_model_version(name, version)
    folder = cache / "registry" / name / f"{version}-{found.creation_timestamp}-{found.run_id or 'none'}"
    if not is_complete(folder):
        # The version resolved above, not the alias again: it may move between the two lookups.
        pull(f"models:/{name}/{version}", folder)
    return folder


def resolve_version(uri: str) -> tuple[str, str] | None:
    """``models:/NAME/VERSION`` as (NAME, VERSION); ``models:/NAME@ALIAS`` as the version the alias points
    at, or None where the model or the alias does not exist (yet)."""
    body = uri[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        found = version_by_alias(name, alias)
        return None if found is None else (name, found)
    return _resolve(uri)


def version_by_alias(name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None where the model or the alias does not exist."""
    import mlflow

    with _tracking_errors(f"models:/{name}@{alias}"):
        try:
            return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException as exc:
            if getattr(exc, "error_code", "") in MISSING:
                return None
            raise


def version_tags(name: str, version: str) -> dict[str, str]:
    import mlflow

    with _tracking_errors(f"models:/{name}/{version}"):
        return dict(mlflow.MlflowClient().get_model_version(name, version).tags)


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    import mlflow

    with _tracking_errors(f"models:/{name}/{version}"):
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)


def model_exists(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    import mlflow

    with _tracking_errors(f"models:/{name}"):
        try:
            mlflow.MlflowClient().get_registered_model(name)
        except mlflow.exceptions.MlflowException as exc:
            if getattr(exc, "error_code", "") in MISSING:
                return False
            raise
    return True


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """Log ``metrics`` to the MLflow run ``run_id`` (the run the version's model was logged to)."""
    import mlflow

    with _tracking_errors():
        client = mlflow.MlflowClient()
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)


def model_tags(name: str) -> dict[str, str]:
    """The registered model's own tags; empty where it does not exist yet."""
    import mlflow

    with _tracking_errors(f"models:/{name}"):
        try:
            return dict(mlflow.MlflowClient().get_registered_model(name).tags)
        except mlflow.exceptions.MlflowException as exc:
            if getattr(exc, "error_code", "") in MISSING:
                return {}
            raise


def set_model_tags(name: str, tags: dict[str, str]) -> None:
    import mlflow

    with _tracking_errors(f"models:/{name}"):
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_registered_model_tag(name, key, value)


def move_alias(name: str, alias: str, version: str, *, by: str) -> str | None:
    """Point ``alias`` at ``version``; the version's tags record who asked and the previous holder, which is
    returned (None when the alias is new)."""
    import datetime

    import mlflow

    previous = version_by_alias(name, alias)
    with _tracking_errors(f"models:/{name}/{version}"):
        client = mlflow.MlflowClient()
        client.get_model_version(name, version)  # a version that does not exist is an error, not a new alias
        client.set_registered_model_alias(name, alias, version)
        tags = {
            f"{alias}.set_by": by,
            f"{alias}.previous_version": previous or "none",
            f"{alias}.set_at": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}",
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    log.info("registry: %s@%s -> version %s (was %s), by %s", name, alias, version, previous or "none", by)
    return previous


def versions(name: str) -> list[dict[str, Any]]:
    """Every version of ``name``, oldest first: version, aliases, tags, creation time (ms), run id."""
    import mlflow

    with _tracking_errors(f"models:/{name}"):
        client = mlflow.MlflowClient()
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        found = client.search_model_versions(name_filter(name))
    rows = [
        {
            "version": str(v.version),
            "aliases": sorted(aliases.get(str(v.version), [])),
            "tags": dict(v.tags),
            "created_ms": v.creation_timestamp,
            "run_id": v.run_id,
        }
        for v in found
    ]
    return sorted(rows, key=lambda row: int(row["version"]))


def name_filter(name: str) -> str:
    """MLflow's search filter for one model's versions: a name with a single quote goes in double quotes."""
    return f'name = "{name}"' if "'" in name else f"name = '{name}'"


def _resolve(uri: str) -> tuple[str, str]:
    import mlflow

    body = uri[len("models:/") :]
    name, at, alias = body.partition("@")
    if not at:
        name, _, version = body.partition("/")
    # None, an empty part, or a path below it (models:/kb/1/extra): nothing MLflow has.
    if not name or (alias == "" if at else not version.isdigit()):
        raise JobConfigError(f"{uri}: give a version or an alias (models:/NAME/VERSION or models:/NAME@ALIAS)")
    with _tracking_errors(uri):
        client = mlflow.MlflowClient()
        return (name, str(client.get_model_version_by_alias(name, alias).version)) if at else (name, version)


def _requirements() -> list[str]:
    """What serving the model needs, pinned to what trained it. Given explicitly: MLflow's default
    list for torch models adds torchvision, which a text model does not use."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "transformers", "tokenizers")]


def _experiment_of(model_dir: Path) -> str:
    """The job's name from the job file saved with the model, as pretrain names its experiment."""
    name = saved_job(model_dir).get("name")
    return str(name) if name else "kantai-registry"


@contextlib.contextmanager
def _tracking_errors(uri: str | None = None) -> Iterator[None]:
    """MLflow failures as one-line errors naming the tracking store (and the model URI). Clients are made
    inside it: a tracking URI MLflow cannot use fails as the client is made."""
    import mlflow

    from kantai_batch.tracking import first_contact, store_failure

    try:
        first_contact()
        yield
    except mlflow.exceptions.MlflowException as exc:
        from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

        where = f"{uri} in " if uri else ""
        missing = getattr(exc, "error_code", "") in MISSING
        error = InputDataError if missing else SourceUnavailableError
        if isinstance(exc, UnsupportedModelRegistryStoreURIException):
            error = JobConfigError  # MLFLOW_TRACKING_URI names no store MLflow knows: no retry helps
        raise error(f"{where}MLflow {mlflow.get_tracking_uri()}: {first_line(exc)}") from None
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:
            raise
        raise failure from None
