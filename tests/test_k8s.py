"""k8s/: every overlay renders to manifests valid against the Kubernetes API, and the rendered
containers' commands and environments really run the pipeline, as local processes standing in for pods."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import pytest
import yaml

from helpers import ROOT, TINY, free_port, kantian_text
from kantai_batch.errors import (
    InputDataError,
    JobConfigError,
    NotPromotedError,
    PreemptedError,
    TrainingDivergedError,
)
from kantai_batch.job import TrainSection, load_job
from kantai_batch.submission import PHASES, QUEUE_LABEL, RETRAIN, Submission, kustomize, render

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = ROOT / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# A recent release that clusters run today; the validator also knows newer ones.
KUBERNETES_VERSION = "1.34.0"
SECRET_NAMES = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", re.IGNORECASE)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_specs(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(job spec, pod spec) of every Job and CronJob."""
    jobs = [d["spec"] for d in docs if d["kind"] == "Job"]
    jobs += [d["spec"]["jobTemplate"]["spec"] for d in docs if d["kind"] == "CronJob"]
    return [(job, job["template"]["spec"]) for job in jobs]


def test_there_are_overlays_for_gpu_and_cpu_clusters():
    assert {p.name for p in OVERLAYS} == {"gpu", "cpu"}


@pytest.mark.parametrize("folder", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_every_overlay_renders_manifests_the_api_accepts(folder: Path):
    docs = documents(kustomize(folder))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    jobs = {d["metadata"]["name"] for d in docs if d["kind"] == "Job"}
    assert jobs == {f"kantai-{phase}" for phase in PHASES}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "CronJob"] == ["kantai-retrain"]


def test_a_submission_sets_the_pretrain_topology_in_one_place():
    submission = Submission(overlay=K8S / "overlays" / "gpu", run_id="t1", nodes=3, gpus=8, run_dir="s3://b/r")
    docs = documents(render(submission, ("pretrain",)))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    topology = next(d["data"] for d in docs if d["metadata"]["name"].startswith("kantai-topology-t1"))
    pod = job["spec"]["template"]
    assert job["metadata"]["name"] == service["metadata"]["name"] == pod["spec"]["subdomain"] == "kantai-pretrain-t1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["spec"]["backoffLimit"] == 3 * 4, "one lost node fails all 3 pods: 4 retries per node"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert (topology["PET_NNODES"], topology["PET_NPROC_PER_NODE"]) == ("3", "8")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"]["kantai.io/run"] == "t1", "two runs' pods never share a rendezvous"
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "Service", "Job"}, "only the phase asked for"
    assert next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"] == "kantai-batch"


def test_the_retraining_pod_gets_a_gpu_per_process_and_gpu_nodes():
    submission = Submission(overlay=K8S / "overlays" / "gpu", run_id="t1", gpus=4, run_dir="s3://b/r")
    docs = documents(render(submission, ("retrain",)))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    topology = next(d["data"] for d in docs if d["metadata"]["name"].startswith("kantai-topology-t1"))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4 == int(topology["PET_NPROC_PER_NODE"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_a_submission_runs_tokenize_as_one_pod_per_part(overlay: Path):
    submission = Submission(overlay=overlay, run_id="t2", tokenize_pods=3, run_dir="s3://b/r")
    docs = documents(render(submission, ("tokenize",)))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "tokenize"
    # What the CLI reads: --part from the pod's index, --parts from the topology.
    for index in range(3):
        env = _container_env(container, docs, job["metadata"]["name"], index)
        assert (env["JOB_COMPLETION_INDEX"], env["KANTAI_TOKENIZE_PARTS"]) == (str(index), "3")
    single = documents(render(Submission(overlay=overlay, run_id="t2", run_dir="s3://b/r"), ("tokenize",)))
    (job,) = [d for d in single if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert _container_env(container, single, job["metadata"]["name"], 0)["KANTAI_TOKENIZE_PARTS"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_pods_are_locked_down_and_fail_fast_only_on_what_a_retry_cannot_fix(overlay: Path):
    docs = documents(kustomize(overlay))
    grace = TrainSection().preemption_grace_s
    for job, pod in pod_specs(docs):
        assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "kantai-batch"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert job["activeDeadlineSeconds"] > 0
        assert pod["terminationGracePeriodSeconds"] > grace, "the SIGTERM checkpoint must finish before SIGKILL"
        rules = job["podFailurePolicy"]["rules"]
        fail = [r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob"]
        ignore = [r.get("onExitCodes", {}).get("values") or r["onPodConditions"][0]["type"] for r in rules
                  if r["action"] == "Ignore"]  # fmt: skip
        cannot_retry = [JobConfigError, InputDataError, NotPromotedError, TrainingDivergedError]
        assert fail == [[error.exit_code for error in cannot_retry]]
        assert [PreemptedError.exit_code] in ignore and "DisruptionTarget" in ignore
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["capabilities"]["drop"] == ["ALL"] and security["allowPrivilegeEscalation"] is False
            assert {"configMapRef", "secretRef"} == {next(iter(s)) for s in container["envFrom"]}
            assert all(s["secretRef"]["optional"] for s in container["envFrom"] if "secretRef" in s)
            inline = [e["name"] for e in container.get("env", []) if "value" in e and SECRET_NAMES.search(e["name"])]
            assert not inline, f"credentials come from the Secret or the ServiceAccount's role, not inline: {inline}"
            timeout = {e["name"]: e.get("value") for e in container.get("env", [])}.get("PET_SHUTDOWN_TIMEOUT")
            if "launch" in container["args"]:
                assert grace < float(timeout) < pod["terminationGracePeriodSeconds"]
    settings = next(d["data"] for d in docs if d["metadata"]["name"].startswith("kantai-settings"))
    assert not [k for k in settings if SECRET_NAMES.search(k)], "no credentials in the ConfigMap"


def test_the_cronjob_pods_get_the_same_defaults_as_the_jobs():
    job = yaml.safe_load((K8S / "base" / "pod-defaults.yaml").read_text())
    cron = yaml.safe_load((K8S / "base" / "retrain-pod-defaults.yaml").read_text())
    assert cron["spec"]["jobTemplate"]["spec"] == job["spec"]


def test_bad_submissions_are_one_line_config_errors(tmp_path: Path):
    with pytest.raises(JobConfigError, match="run id"):
        Submission(overlay=K8S / "overlays" / "gpu", run_id="Not_A_Label")
    with pytest.raises(JobConfigError, match="at least 1"):
        Submission(overlay=K8S / "overlays" / "gpu", run_id="r", nodes=0)
    with pytest.raises(JobConfigError, match=r"run dir 'runs/local' must be s3://bucket/prefix"):
        Submission(overlay=K8S / "overlays" / "gpu", run_id="r", run_dir="runs/local")
    for bucketless in ("s3://", "s3:///run"):
        with pytest.raises(JobConfigError, match=rf"run dir '{bucketless}' must be s3://bucket/prefix"):
            Submission(overlay=K8S / "overlays" / "gpu", run_id="r", run_dir=bucketless)
    with pytest.raises(JobConfigError, match=r"tokenize pods \(0\) must be at least 1"):
        Submission(overlay=K8S / "overlays" / "gpu", run_id="r", tokenize_pods=0)
    with pytest.raises(JobConfigError, match="no kustomization.yaml"):
        Submission(overlay=tmp_path, run_id="r")
    with pytest.raises(JobConfigError, match="unknown phase"):
        render(Submission(overlay=K8S / "overlays" / "gpu", run_id="r"), ("pretrian",))
    for image in ("reg/x:", "", ":"):
        with pytest.raises(JobConfigError, match="has an empty name or tag"):
            Submission(overlay=K8S / "overlays" / "gpu", run_id="r", image=image)


def test_an_image_tag_alone_keeps_the_overlays_image_name():
    def image(**given) -> str:
        docs = documents(render(Submission(overlay=K8S / "overlays" / "gpu", run_id="r", **given), ("prepare",)))
        return next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]["image"]

    assert image() == "registry.example.com/kantai-batch:0.1.0"
    assert image(image=":v2") == "registry.example.com/kantai-batch:v2"
    assert image(image="host:5000/kb:v3") == "host:5000/kb:v3"


# ---- the rendered commands, run as pods would run them ----

_VARIABLE = re.compile(r"\$\((\w+)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values and args: unknown references stay as written."""
    return _VARIABLE.sub(lambda m: env.get(m[1], m[0]), text)


def _container_env(container: dict, docs: list[dict], job_name: str, index: int) -> dict[str, str]:
    """The environment the kubelet gives the container: envFrom first, then env in order."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        else:
            assert source["secretRef"]["optional"], "the only Secret is optional; none exists here"
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            env[var["name"]] = configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        elif ref["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']":
            env[var["name"]] = job_name
        elif ref["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']":
            env[var["name"]] = str(index)
        else:
            raise AssertionError(f"unexpected downward API field {ref}")
    return env


class Cluster:
    """Runs a rendered Job's pods as local processes: the image's entrypoint, the pod's args and env.

    Only what exists inside a cluster alone is replaced: pod DNS names by loopback, the in-cluster
    S3 and MLflow addresses by the test's, and the role's credentials by the test S3's keys.
    """

    def __init__(self, docs: list[dict], workdir: Path, s3_endpoint: str, mlflow_url: str) -> None:
        self.docs, self.workdir = docs, workdir
        self.outside = {
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "MLFLOW_TRACKING_URI": mlflow_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        self.pods = 0

    def run(self, kind: str, name_prefix: str, timeout: int = 300) -> list[subprocess.CompletedProcess]:
        (doc,) = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
        job = doc["spec"] if kind == "Job" else doc["spec"]["jobTemplate"]["spec"]
        pods = job.get("completions", 1)
        port = str(free_port())
        started = []
        for index in range(pods):
            (container,) = job["template"]["spec"]["containers"]
            env = _container_env(container, self.docs, doc["metadata"]["name"], index)
            if "PET_MASTER_ADDR" in env:
                service = job["template"]["spec"]["subdomain"]
                assert env["PET_MASTER_ADDR"] == f"{doc['metadata']['name']}-0.{service}"
                env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port)
            args = [_expand(a, env) for a in container["args"]]
            assert not any(_VARIABLE.search(a) for a in args), f"unresolved variable in {args}"
            self.pods += 1
            scratch = self.workdir.parent / f"pod-{self.pods}"  # each pod's own emptyDir
            pod_env = {
                "PATH": os.environ["PATH"], "HOME": str(scratch / "home"), "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KANTAI_CACHE_DIR": str(scratch / "cache"),
                **env, **self.outside,
            }  # fmt: skip
            command = [sys.executable, "-m", "kantai_batch", *args]  # the image's ENTRYPOINT is kantai-batch
            started.append(subprocess.Popen(command, cwd=self.workdir, env=pod_env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))  # fmt: skip
        done = []
        for process in started:
            stdout, stderr = process.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        return done


@pytest.mark.slow
def test_the_rendered_pods_run_every_phase_against_one_s3_run_dir(
    tmp_path: Path, corpus_file: Path, bucket: str, s3_endpoint: str, mlflow_server: str
):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text().splitlines()
    assert 'ENTRYPOINT ["kantai-batch"]' in dockerfile, "the pods' args follow this entrypoint"
    # The image's working directory holds jobs/; a user's job file sits next to the shipped ones.
    workdir = tmp_path / "image"
    (workdir / "jobs").mkdir(parents=True)
    job = load_job(overrides=[*TINY, "name=kantai-k8s", "train.precision=fp32", "train.per_device_batch_size=4"])
    (workdir / "jobs" / "tiny.yaml").write_text(job.to_yaml())
    boto3.client("s3").upload_file(str(corpus_file), bucket, "corpora/kant.txt")
    submission = Submission(
        overlay=K8S / "overlays" / "cpu", run_id="e2e", nodes=2, gpus=1, tokenize_pods=2, job="jobs/tiny.yaml",
        run_dir=f"s3://{bucket}/runs/e2e", corpus=f"s3://{bucket}/corpora/kant.txt",
    )  # fmt: skip
    docs = documents(render(submission, (*PHASES, RETRAIN)))
    cluster = Cluster(docs, workdir, s3_endpoint, mlflow_server)

    for phase in PHASES:
        results = cluster.run("Job", f"kantai-{phase}-")
        assert len(results) == (2 if phase in ("pretrain", "tokenize") else 1)
        for result in results:
            assert result.returncode == 0, f"{phase}: {result.stderr[-3000:]}"

    s3 = boto3.client("s3")
    summary = json.loads(s3.get_object(Bucket=bucket, Key="runs/e2e/model/train_summary.json")["Body"].read())
    assert summary["world_size"] == 2, "two pods, one process each, trained as one job"
    assert summary["nodes"] == 2, "each pod is a node of its own"
    assert s3.head_object(Bucket=bucket, Key="runs/e2e/eval/_COMPLETE")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions("name = 'kantaibert'")
    assert len(versions) == 1, "register (KANTAI_MODEL_NAME) made the first version"
    assert client.get_model_version_by_alias("kantaibert", "candidate").version == versions[0].version

    # The scheduled retraining. There is no champion yet (register moved `candidate`), so the CronJob's
    # train.init_from (models:/kantaibert@champion) has nothing to continue from: it trains from
    # scratch, scores the model on its held-out split (frozen then) and promotes it.
    marker = "runs/e2e/checkpoints/checkpoint-40/_COMPLETE"
    lineage = json.loads(s3.get_object(Bucket=bucket, Key=marker)["Body"].read())["lineage_sha256"]
    (result,) = cluster.run("CronJob", "kantai-retrain-")
    assert result.returncode == 0, result.stderr[-3000:]
    # A warning: the model has a version (@candidate), so an alias missing may as well be a typo.
    assert "train.init_from models:/kantaibert@champion: kantaibert has versions but not this one; training from " \
        "scratch" in result.stderr  # fmt: skip
    # The Jobs' checkpoints are of a training without train.init_from: deleted, not resumed.
    assert "is of another training" in result.stderr
    assert json.loads(s3.get_object(Bucket=bucket, Key=marker)["Body"].read())["lineage_sha256"] != lineage
    assert result.stdout.lstrip().startswith("promoted: kantaibert version 2 is champion"), result.stdout
    assert client.get_model_version_by_alias("kantaibert", "champion").version == "2"
    # Next week, the same corpus and job: nothing trained, no new version.
    (result,) = cluster.run("CronJob", "kantai-retrain-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.lstrip().startswith("nothing to do: the corpus"), result.stdout
    assert len(client.search_model_versions("name = 'kantaibert'")) == 2
    # The week after, the corpus object has grown in place: the CronJob continues from the champion's
    # weights and tokenizer, and both are scored on the frozen benchmark.
    grown = corpus_file.read_bytes() + b"\r\n\r\n" + kantian_text(200, seed=5).replace("\n", "\r\n").encode("cp1252")
    boto3.client("s3").put_object(Bucket=bucket, Key="corpora/kant.txt", Body=grown)
    (result,) = cluster.run("CronJob", "kantai-retrain-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizer: copied from models:/kantaibert@champion" in result.stderr
    assert "pretrain: continuing from" in result.stderr
    assert re.match(r"(promoted|not promoted): kantaibert version 3 is (champion|challenger)", result.stdout.lstrip())
    v2, v3 = (client.get_model_version("kantaibert", v).tags for v in ("2", "3"))
    assert float(v3["champion_loss"]) == pytest.approx(float(v2["benchmark_loss"]), rel=1e-5)
    assert v3["benchmark_sha256"] == v2["benchmark_sha256"] and v3["corpus_sha256"] != v2["corpus_sha256"]
    promoted = float(v3["benchmark_loss"]) <= float(v3["champion_loss"]) * (1 - 0.005)
    champion = client.get_model_version_by_alias("kantaibert", "champion").version
    assert champion == ("3" if promoted else "2"), "champion moves only to a better model"


@pytest.mark.slow
def test_a_config_error_in_a_pretrain_pod_exits_with_its_own_code(tmp_path: Path, bucket: str, s3_endpoint: str):
    """The failure policy fails the Job on exit 2; torchrun alone would have exited 1."""
    workdir = tmp_path / "image"
    workdir.mkdir()
    submission = Submission(overlay=K8S / "overlays" / "cpu", run_id="bad", job="jobs/missing.yaml",
                            run_dir=f"s3://{bucket}/runs/bad")  # fmt: skip
    cluster = Cluster(documents(render(submission, ("pretrain",))), workdir, s3_endpoint, "http://127.0.0.1:9")
    (result,) = cluster.run("Job", "kantai-pretrain-")
    assert result.returncode == JobConfigError.exit_code, result.stderr[-2000:]
    assert "jobs/missing.yaml does not exist" in result.stderr


def test_make_render_passes_the_submission_variables(tmp_path: Path):
    done = subprocess.run(
        ["make", "-s", "render", "OVERLAY=k8s/overlays/cpu", "RUN_ID=mk", "NODES=2", "GPUS=3", "RUN_DIR=s3://b/mk",
         "JOB=jobs/customer-support.yaml", "TOKENIZE_PODS=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    docs = documents(done.stdout)
    settings = next(d["data"] for d in docs if d["metadata"]["name"].startswith("kantai-settings-mk"))
    assert (settings["KANTAI_RUN_DIR"], settings["KANTAI_JOB"]) == ("s3://b/mk", "jobs/customer-support.yaml")
    pretrain = next(d for d in docs if d["metadata"]["name"] == "kantai-pretrain-mk" and d["kind"] == "Job")
    assert pretrain["spec"]["completions"] == 2
    tokenize = next(d for d in docs if d["metadata"]["name"] == "kantai-tokenize-mk")
    assert tokenize["spec"]["completions"] == 4


def test_make_targets_look_in_the_overlays_namespace_and_a_schedule_needs_its_name():
    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    for overlay, namespace in (("gpu", "kantai"), ("cpu", "kantai-dev")):
        for target in ("status", "logs", "submit-pipeline"):
            done = make(target, f"OVERLAY=k8s/overlays/{overlay}", "RUN_ID=x")
            assert f"-n {namespace} " in done.stdout, (target, done.stdout[-2000:])
    # Without a fixed name each `make schedule` would add another CronJob writing to the same run dir.
    unnamed = make("schedule")
    assert unnamed.returncode != 0 and "make schedule needs RUN_ID=NAME" in unnamed.stderr
    assert "--run-id weekly" in make("schedule", "RUN_ID=weekly").stdout
    from_env = subprocess.run(["make", "-n", "schedule"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RUN_ID": "nightly"})  # fmt: skip
    assert "--run-id nightly" in from_env.stdout, from_env.stderr
    assert "--image :v7 " in make("submit-pretrain", "TAG=v7", "RUN_ID=x").stdout


# ---- queueing on a shared cluster (Kueue) ----


def _without_queue(docs: list[dict]) -> list[dict]:
    for doc in docs:
        if doc["kind"] == "Job":
            assert doc["metadata"]["labels"].pop(QUEUE_LABEL) == "team-a"
        elif doc["kind"] == "CronJob":
            assert doc["spec"]["jobTemplate"]["metadata"]["labels"].pop(QUEUE_LABEL) == "team-a"
    return docs


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_a_queue_labels_the_jobs_for_kueue_and_changes_nothing_else(overlay: Path):
    plain = render(Submission(overlay=overlay, run_id="q", nodes=2), (*PHASES, RETRAIN))
    queued = documents(render(Submission(overlay=overlay, run_id="q", nodes=2, queue="team-a"), (*PHASES, RETRAIN)))
    for doc in queued:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert "kueue" not in plain, "without a queue nothing names Kueue"
    # Kueue reads the label on the Job (and suspends it until admitted); the CronJob's Jobs get it from
    # their template. Pods, Services and ConfigMaps are left alone.
    assert _without_queue(queued) == documents(plain)


def test_make_namespace_moves_the_jobs_where_make_looks_for_them():
    """NAMESPACE= was only where status, logs and submit-pipeline looked: the Jobs stayed in the overlay's
    namespace, and submit-pipeline gave up on a Job it could not find while the Job ran."""
    done = subprocess.run(["make", "-s", "render", "OVERLAY=k8s/overlays/cpu", "RUN_ID=ns", "NAMESPACE=team-a"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    docs = documents(done.stdout)
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert namespaced and {d["metadata"].get("namespace") for d in namespaced} == {"team-a"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    pipeline = ["make", "-n", "submit-pipeline", "OVERLAY=k8s/overlays/cpu", "RUN_ID=ns", "NAMESPACE=team-a"]
    waits = subprocess.run(pipeline, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "--namespace team-a" in waits and "-n team-a " in waits
    with pytest.raises(JobConfigError, match="namespace 'Team_A' must be"):
        Submission(overlay=K8S / "overlays" / "gpu", run_id="r", namespace="Team_A")


def test_a_bad_queue_name_is_a_one_line_config_error():
    for bad in ("Team_A", "-a", "a" * 64, ""):
        with pytest.raises(JobConfigError, match="queue .* must be a LocalQueue name"):
            Submission(overlay=K8S / "overlays" / "gpu", run_id="r", queue=bad)


def test_make_submit_passes_the_queue():
    """QUEUE= reaches render-k8s through the same RENDER line every submit-* target applies."""
    done = subprocess.run(["make", "-s", "render", "OVERLAY=k8s/overlays/cpu", "RUN_ID=mq", "QUEUE=team-a"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = [d for d in documents(done.stdout) if d["kind"] == "Job"]
    assert len(jobs) == len(PHASES) and all(j["metadata"]["labels"][QUEUE_LABEL] == "team-a" for j in jobs)
    done = subprocess.run(["make", "-s", "render", "OVERLAY=k8s/overlays/cpu", "RUN_ID=mq", "QUEUE=Team_A"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "kantai-batch: error: queue 'Team_A' must be a LocalQueue name" in done.stderr
