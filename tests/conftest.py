"""Shared fixtures: an isolated environment, a generated corpus, trained tiny runs, S3 and MLflow servers.

Every model here is tiny (2 layers, width 64) so the whole suite trains on a laptop CPU in minutes.
The plain helpers the fixtures and tests share live in helpers.py.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import seaweed
from helpers import (
    SUPPORT_JOB,
    SUPPORT_OVERRIDES,
    invoke,
    kantian_text,
    mlflow_server_process,
    s3_environment,
    seaweed_server,
    support_conversations,
    tiny,
    twcs_csv,
)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Caches and the MLflow store live in the test's temp folder, never in the user's home."""
    home = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        # MLflow's sqlite store puts artifacts in ./mlruns: keep them out of the checkout.
        mp.chdir(home)
        mp.setenv("HF_HOME", str(home / "hf"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("KANTAI_CACHE_DIR", str(home / "cache"))
        for name in ("KANTAI_RUN_DIR", "KANTAI_JOB", "KANTAI_CORPUS", "KANTAI_TRACKING", "KANTAI_LOG_LEVEL"):
            mp.delenv(name, raising=False)
        yield home


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Windows-1252, CRLF corpus, like real scanned books."""
    path = tmp_path_factory.mktemp("corpus") / "kantian.txt"
    path.write_bytes(kantian_text(400).replace("\n", "\r\n").encode("cp1252"))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path, isolated_env: Path) -> Iterator[Path]:
    """One complete `run` of the tiny job, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = invoke("run", "--run-dir", str(run_dir), "--corpus", str(corpus_file), *tiny())
    (run_dir.parent / "run_stdout.txt").write_text(result.stdout)
    yield run_dir


@pytest.fixture(scope="session")
def support_run(tmp_path_factory: pytest.TempPathFactory, isolated_env: Path) -> Iterator[Path]:
    """One `run` of the customer-support job, tiny model, on generated conversations."""
    root = tmp_path_factory.mktemp("support")
    source = twcs_csv(root / "twcs.csv", support_conversations(300), bom=True)
    run_dir = root / "run"
    result = invoke(
        "run", "--job", SUPPORT_JOB, "--run-dir", str(run_dir), "--corpus", str(source), *tiny(*SUPPORT_OVERRIDES)
    )
    (root / "run_stdout.txt").write_text(result.stdout)
    yield run_dir


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweed.SeaweedS3]:
    """One real S3 server (SeaweedFS) on loopback for the whole session."""
    server = seaweed_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: seaweed.SeaweedS3) -> Iterator[str]:
    """The session's S3 endpoint URL, with boto3's environment (endpoint, keys, region) pointing at it."""
    with s3_environment(s3_server.endpoint) as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    # S3 bucket names: lowercase letters, digits and hyphens (a parametrized test's id has others),
    # at most 63; the digest keeps two long names that share a beginning apart.
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    import boto3  # lazily, like every S3 import of the tests: the GPU check carries no S3 stack

    name = f"kantai-{slug}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server`: SQLite backend store, artifacts in the loopback S3 bucket."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="kantai-mlflow")
    home = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server_process(home, "s3://kantai-mlflow/artifacts", MLFLOW_S3_ENDPOINT_URL=s3_endpoint) as (url, _):
        yield url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`, which holds parameter ids too
            item.add_marker(skip)
