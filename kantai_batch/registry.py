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
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError, JobConfigError, SourceUnavailableError, first_line
from kantai_batch.manifest import committed_dir, is_complete
from kantai_batch.model import load_lm, load_model_config, load_model_tokenizer
from kantai_batch.objective import task_of
from kantai_batch.rundir import TRAIN_SUMMARY
from kantai_batch.tracking import run_exists

log = logging.getLogger(__name__)

PIPELINE_TASKS = {"mlm": "fill-mask", "clm": "text-generation"}


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def register(model_dir: Path, name: str, alias: str | None = None) -> dict[str, Any]:
    """Log ``model_dir`` as an MLflow transformers model and register a new version of ``name``."""
    import mlflow

    config = load_model_config(model_dir)
    task = task_of(config)
    if task is None:
        raise InputDataError(f"model {model_dir} is neither a masked nor a causal language model")
    summary_file = model_dir / TRAIN_SUMMARY
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
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
                registered_model_name=name,
                pip_requirements=_requirements(),
            )
        version = str(info.registered_model_version)
        if alias:
            mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
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
        with committed_dir(out) as folder:
            for source in (weights, tokenizer):
                if source.is_dir():
                    shutil.copytree(source, folder, dirs_exist_ok=True)
    log.info("registry: %s pulled into %s", uri, out)
    return out


def cached_pull(uri: str, cache: Path) -> Path:
    """``pull`` into the cache, once per concrete version (an alias is looked up every time)."""
    name, version = _resolve(uri)
    folder = cache / "registry" / name / version
    if not is_complete(folder):
        pull(uri, folder)
    return folder


def _resolve(uri: str) -> tuple[str, str]:
    import mlflow

    body = uri[len("models:/") :]
    client = mlflow.MlflowClient()
    with _tracking_errors(uri):
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = body.partition("/")
        if not version:
            raise JobConfigError(f"{uri}: give a version or an alias (models:/NAME/VERSION or models:/NAME@ALIAS)")
        return name, version


def _requirements() -> list[str]:
    """What serving the model needs, pinned to what trained it. Given explicitly: MLflow's default
    list for torch models adds torchvision, which a text model does not use."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in ("torch", "transformers", "tokenizers")]


def _experiment_of(model_dir: Path) -> str:
    """The job's name from the job file saved with the model, as pretrain names its experiment."""
    import yaml

    job_file = model_dir / "job.yaml"
    if job_file.is_file():
        data = yaml.safe_load(job_file.read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return "kantai-registry"


@contextlib.contextmanager
def _tracking_errors(uri: str | None = None) -> Iterator[None]:
    """MLflow failures as one-line errors naming the tracking store (and the model URI)."""
    import mlflow

    try:
        yield
    except mlflow.exceptions.MlflowException as exc:
        where = f"{uri} in " if uri else ""
        missing = getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
        error = InputDataError if missing else SourceUnavailableError
        raise error(f"{where}MLflow {mlflow.get_tracking_uri()}: {first_line(exc)}") from None
