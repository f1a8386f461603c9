"""The image, built here and run as containers: `make image-cpu` (docker/Dockerfile on a Debian base
with torch's CPU wheel), then the rendered pods of a submission run as containers of it, each given
what the kubelet would give it.

Needs buildah, podman, runc and mmdebstrap, as root (`make test` installs them where it can); skipped
elsewhere. The image is built once per session and shared by every test here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import yaml
from test_k8s import K8S, _container_env, _expand, documents

from helpers import ROOT, TINY, free_port
from kantai_batch.job import load_job
from kantai_batch.submission import PHASES, Submission, render

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

# Tagged once, rebuilt in place: `make image-cpu` removes the image the tag named before.
IMAGE, TAG = "localhost/kantai-batch", "test"
BUILT = f"{IMAGE}:{TAG}-cpu"
TOOLS = ("buildah", "podman", "runc", "mmdebstrap")
# The same podman settings as the Makefile's.
CONTAINERS_ENV = {"CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))}
# What a pod's container may write besides its volumes: nothing (readOnlyRootFilesystem).
READ_ONLY = ("--read-only", "--read-only-tmpfs=false")
# The pods' /tmp (an emptyDir): Python's tempfile, and so torch's import, needs one writable folder.
SCRATCH = ("--tmpfs", "/tmp:rw,exec,nosuid,nodev")


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env={**os.environ, **CONTAINERS_ENV}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    if check:
        assert done.returncode == 0, f"podman {' '.join(args[:3])} …: {done.stderr[-3000:]}"
    return done


def _why_not_here() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (`make container-tools` installs them as root with apt)"
    if os.geteuid() != 0:
        return "building the image here needs root (mmdebstrap and podman's system storage)"
    return None


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`make image-cpu`, once per session; its log is in the fixture's folder."""
    reason = _why_not_here()
    if reason:
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("image") / "build.log"
    with log.open("w") as out:
        done = subprocess.run(["make", "image-cpu", f"IMAGE={IMAGE}", f"TAG={TAG}"], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, timeout=2700)  # fmt: skip
    assert done.returncode == 0, f"make image-cpu failed ({log}):\n{log.read_text()[-5000:]}"
    return BUILT


def test_the_image_is_the_dockerfile_built_on_debian_with_cpu_torch(image: str):
    (config,) = json.loads(podman("image", "inspect", image).stdout)
    assert config["Size"] < 3e9, f"{config['Size'] / 1e9:.2f} GB: the CPU image is about 2.7 GB"
    assert config["Config"]["User"] == "10001" and config["Config"]["Entrypoint"] == ["kantai-batch"]
    env = dict(item.split("=", 1) for item in config["Config"]["Env"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert (env["KANTAI_IMAGE"], env["KANTAI_GIT_COMMIT"]) == (image, head), "lineage tags come from the build"
    assert "HF_HOME" in env and env["HF_HOME"].startswith("/tmp/"), "caches live under /tmp (read-only root)"
    script = "import sys, torch; print(sys.version_info[:2], torch.__version__)"
    done = podman("run", "--rm", *READ_ONLY, *SCRATCH, "--entrypoint", "python", image, "-c", script)
    assert done.stdout.split() == ["(3,", "11)", "2.13.0+cpu"], "bookworm's Python 3.11, the pinned CPU torch"
    # The build's pip.conf, CA bundle and wheels were mounted, never copied: nothing of them is left.
    leftovers = "find / -xdev \\( -name pip.conf -o -name ca.crt -o -name 'torch-*.whl' \\) -print; ls -A /root"
    done = podman("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", leftovers)
    assert sorted(done.stdout.split()) == [".bashrc", ".profile"], done.stdout


def test_help_runs_as_uid_10001_with_a_read_only_root(image: str):
    locked = (*READ_ONLY, "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
    done = podman("run", "--rm", *locked, image)  # the image's CMD is --help
    assert done.stdout.startswith("Usage: kantai-batch"), done.stdout
    assert podman("run", "--rm", *locked, "--entrypoint", "id", image, "-u").stdout.strip() == "10001"
    # `make local-pretrain` runs it as the user who calls it: the job files in its working directory are theirs to read.
    other = podman("run", "--rm", *locked, *SCRATCH, "--user", "1000:1000", image, "inspect", "--job",
                   "jobs/kantaibert.yaml", check=False)  # fmt: skip
    assert other.returncode == 0 and " parameters in 106 tensors" in other.stdout, other.stderr[-2000:]


def test_a_tiny_run_completes_with_only_tmp_and_the_run_dir_writable(image: str, tmp_path: Path, corpus_file: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 10001, 10001)
    # Compiled: torch.compile builds C++ kernels in the container (Triton's launcher on a GPU), with the
    # compiler and headers the image carries and its caches under /tmp.
    overrides = [arg for override in (*TINY, "train.torch_compile=true") for arg in ("--set", override)]
    done = podman(
        "run", "--rm", *READ_ONLY, "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *SCRATCH, "-v", f"{runs}:/home/kantai/runs",
        "-v", f"{corpus_file}:/data/corpus.txt:ro",
        # Tracking goes to a server (the pods' test); MLflow's local store would write to the working dir.
        image, "run", "--run-dir", "runs/tiny", "--corpus", "/data/corpus.txt", "--no-tracking", *overrides,
        timeout=900,
    )  # fmt: skip
    summary = json.loads((runs / "tiny" / "model" / "train_summary.json").read_text())
    assert summary["global_step"] == 40 and summary["torch_compile"] is True, done.stderr[-2000:]
    assert (runs / "tiny" / "eval" / "_COMPLETE").is_file()


# ---- the rendered pods, run as containers ----


def _quantity(value: str) -> str:
    """A Kubernetes memory quantity (16Gi) as a tmpfs size (16g)."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", value).groups()
    return number + (unit[0].lower() if unit else "")


class Kubelet:
    """Runs a rendered Job's pods as containers of their image, with what the kubelet gives a pod.

    Exactly the pod's: image (its entrypoint), args ($(VAR) expanded), env (envFrom: the ConfigMaps and
    the Secret; env: values, ConfigMap keys and the downward API's job name and completion index), user,
    group and fsGroup, read-only root, dropped capabilities, no privilege escalation, the runtime's
    seccomp profile, and volumes: emptyDirs as tmpfs (sizeLimit kept). An Indexed Job's pod i is host
    <job>-i, and the headless Service's names <job>-i.<service> resolve to it: here every pod is on
    the host's network, so they are all loopback, and the rendezvous port (29500 in the pod, where each
    pod has an address of its own) is a free one. Resources are not enforced.
    """

    def __init__(self, docs: list[dict], secrets: dict[str, dict[str, str]]) -> None:
        self.docs, self.secrets = docs, secrets

    def run(self, name_prefix: str, timeout: float = 900) -> list[subprocess.CompletedProcess]:
        (job,) = [d for d in self.docs if d["kind"] == "Job" and d["metadata"]["name"].startswith(name_prefix)]
        pods = job["spec"].get("completions", 1)
        port = str(free_port())
        names = [f"kantai-test-{job['metadata']['name']}-{index}" for index in range(pods)]
        started = [
            subprocess.Popen(
                ["podman", "run", "--rm", "--replace", "--name", name, *self.pod(job, index, port)],
                env={**os.environ, **CONTAINERS_ENV},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index, name in enumerate(names)
        ]
        deadline = time.monotonic() + timeout
        try:
            done = []
            for process in started:
                stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
                done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
            return done
        finally:
            for process, name in zip(started, names, strict=True):
                if process.poll() is None:
                    podman("rm", "--force", "--ignore", name, check=False)
                    process.kill()
                    process.communicate()

    def pod(self, job: dict, index: int, port: str) -> list[str]:
        """`podman run` options, image and args of pod ``index`` of ``job``."""
        name = job["metadata"]["name"]
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = _container_env(container, self.docs, name, index)
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                secret = self.secrets.get(source["secretRef"]["name"], {})
                assert not secret.keys() & env.keys(), "the Secret's keys are its own, so envFrom's order is moot"
                env.update(secret)
        if "PET_MASTER_PORT" in env:
            env["PET_MASTER_PORT"] = port
        indexed = job["spec"].get("completionMode") == "Indexed"
        hostname = f"{name}-{index}" if indexed else f"{name}-{uuid.uuid4().hex[:5]}"  # as the Job controller names
        options = ["--pull", "never", "--network", "host", "--hostname", hostname]
        hosts = [hostname]
        if indexed and "subdomain" in spec:
            hosts += [f"{name}-{i}.{spec['subdomain']}" for i in range(job["spec"]["completions"])]
        options += [f"--add-host={host}:127.0.0.1" for host in hosts]

        pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
            assert user not in (None, 0), "the kubelet refuses to start a non-root pod as root"
        if user is not None:
            options += ["--user", f"{user}:{group}" if group is not None else str(user)]
        for extra in [pod_security.get("fsGroup"), *pod_security.get("supplementalGroups", [])]:
            if extra is not None:
                options += ["--group-add", str(extra)]
        if security.get("readOnlyRootFilesystem"):
            options += READ_ONLY
        for capability in security.get("capabilities", {}).get("drop", []):
            options += ["--cap-drop", capability]
        for capability in security.get("capabilities", {}).get("add", []):
            options += ["--cap-add", capability]
        if security.get("allowPrivilegeEscalation") is False:
            options += ["--security-opt", "no-new-privileges"]
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {})).get("type", "Unconfined")
        assert seccomp in ("RuntimeDefault", "Unconfined"), seccomp
        if seccomp == "Unconfined":
            options += ["--security-opt", "seccomp=unconfined"]

        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        mode = "2777" if "fsGroup" in pod_security else "0777"  # an emptyDir, group-owned with fsGroup
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            assert volume.keys() == {"name", "emptyDir"}, f"only emptyDirs are translated: {volume}"
            tmpfs = ["rw", "exec", "nosuid", "nodev", "notmpcopyup", f"mode={mode}"]
            if "sizeLimit" in volume["emptyDir"]:
                tmpfs.append(f"size={_quantity(volume['emptyDir']['sizeLimit'])}")
            options += ["--tmpfs", f"{mount['mountPath']}:{','.join(tmpfs)}"]
        if "workingDir" in container:
            options += ["--workdir", container["workingDir"]]
        if "command" in container:
            options += ["--entrypoint", json.dumps([_expand(part, env) for part in container["command"]])]
        for key, value in env.items():
            options += ["--env", f"{key}={value}"]
        args = [_expand(arg, env) for arg in container.get("args", [])]
        return [*options, container["image"], *args]


@pytest.fixture
def image_with_job(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image with a tiny job file next to the shipped ones, as a user ships a job of their own."""
    context = tmp_path_factory.mktemp("job-image")
    job = load_job(overrides=[*TINY, "name=kantai-containers", "train.precision=fp32", "train.per_device_batch_size=4"])
    (context / "tiny.yaml").write_text(job.to_yaml())
    (context / "Containerfile").write_text(f"FROM {image}\nCOPY tiny.yaml jobs/tiny.yaml\n")
    name = f"{IMAGE}:{TAG}-tiny-job"
    podman("build", "--pull=never", "--layers=false", "-t", name, str(context))
    yield name
    podman("rmi", "--force", name, check=False)


def test_the_rendered_pods_run_the_pipeline_as_containers(
    image: str,
    image_with_job: str,
    tmp_path: Path,
    corpus_file: Path,
    bucket: str,
    s3_endpoint: str,
    mlflow_server: str,
):
    # The cpu overlay, pointed at this machine's S3 and MLflow servers as a user points it at the
    # cluster's; the credentials are the Secret that the pods read where no cloud role gives them any.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    settings = [f"AWS_ENDPOINT_URL_S3={s3_endpoint}", f"MLFLOW_TRACKING_URI={mlflow_server}",
                "KANTAI_MODEL_NAME=kantaibert-containers"]  # fmt: skip
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "cpu", overlay)],
        "configMapGenerator": [{"name": "kantai-settings", "behavior": "merge", "literals": settings}],
    }))  # fmt: skip
    credentials = {key: os.environ[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    boto3.client("s3").upload_file(str(corpus_file), bucket, "corpora/kant.txt")
    submission = Submission(
        overlay=overlay, run_id="ctr", nodes=2, gpus=1, job="jobs/tiny.yaml", image=image_with_job,
        run_dir=f"s3://{bucket}/runs/ctr", corpus=f"s3://{bucket}/corpora/kant.txt",
    )  # fmt: skip
    docs = documents(render(submission))
    kubelet = Kubelet(docs, secrets={"kantai-credentials": credentials})

    for phase in PHASES:
        results = kubelet.run(f"kantai-{phase}-")
        assert len(results) == (2 if phase == "pretrain" else 1)
        for result in results:
            assert result.returncode == 0, f"{phase}: {result.stderr[-3000:]}"

    s3 = boto3.client("s3")
    summary = json.loads(s3.get_object(Bucket=bucket, Key="runs/ctr/model/train_summary.json")["Body"].read())
    assert summary["world_size"] == 2, "two pods, one process each, trained as one job"
    assert s3.head_object(Bucket=bucket, Key="runs/ctr/model/model.safetensors")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    (version,) = client.search_model_versions("name = 'kantaibert-containers'")
    assert client.get_model_version_by_alias("kantaibert-containers", "candidate").version == version.version
    assert client.get_run(version.run_id).data.tags["kantai.image"] == image, "trained in the image built here"
