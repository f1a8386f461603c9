"""Preemption and failure across ranks: two CPU processes under `kantai-batch launch`, over gloo.

A signal or a death reaches one process (one pod, one node); every rank must act on it together:
save at the same step, stop, exit with a code the pod failure policy understands, resume together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from helpers import ROOT, free_port, invoke, prepared_run, tiny
from kantai_batch.preemption import DEADLINE_THREAD
from kantai_batch.rundir import RunDir

pytestmark = pytest.mark.slow

STEPS = 200
JOB = ("train.max_steps=200", "train.save_steps=25", "train.logging_steps=50", "train.precision=fp32")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _launch(run_dir: Path, *options: str, cwd: Path, env: dict[str, str] | None = None, **job: str):
    overrides = [f"train.{key}={value}" for key, value in job.items()]
    command = [sys.executable, "-m", "kantai_batch", "launch", *options, "pretrain", "--run-dir", str(run_dir)]
    command += ["--no-tracking", *tiny(*JOB, *overrides)]
    return subprocess.Popen(
        command, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _two_ranks(run_dir: Path, cwd: Path, **job: str) -> subprocess.Popen:
    return _launch(run_dir, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                   str(free_port()), cwd=cwd, **job)  # fmt: skip


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    """The PID of the training process of ``rank`` among the launcher's children."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no process of rank {rank} under launcher {launcher.pid}")


def _wait_for_checkpoint(run_dir: Path, step: int, launcher: subprocess.Popen) -> None:
    marker = run_dir / "checkpoints" / f"checkpoint-{step}" / "_COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.is_file():
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {marker} within 240 s"
        time.sleep(0.1)


def _complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*/_COMPLETE"))


def _resume(run_dir: Path, cwd: Path) -> dict:
    launcher = _two_ranks(run_dir, cwd)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-3000:]
    return json.loads((run_dir / "model" / "train_summary.json").read_text())


def test_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint_and_the_retry_resumes(
    tmp_path: Path, corpus_file: Path
):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    launcher = _two_ranks(run_dir, tmp_path)
    _wait_for_checkpoint(run_dir, 25, launcher)
    os.kill(_worker(launcher, 1), signal.SIGTERM)  # one pod's process alone, as when one node is drained
    _, stderr = launcher.communicate(timeout=120)

    assert launcher.returncode == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "stopped on SIGTERM at step" in line]
    stopped = [int(line.split("at step ")[1].split(";")[0]) for line in lines]
    assert len(stopped) == 2 and stopped[0] == stopped[1] > 25, "both ranks stop, at the same step"
    assert "another rank received SIGTERM" in stderr, "rank 0 learned of rank 1's signal"
    step = stopped[0]
    assert _complete_checkpoints(run_dir)[-1] == step
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}, "both ranks saved"
    assert not (run_dir / "model").exists()

    summary = _resume(run_dir, tmp_path)
    assert summary["resumed_from_step"] == step and summary["global_step"] == STEPS
    assert summary["stopped_by"] == "max_steps" and summary["world_size"] == 2
    # One tiny all_reduce per step: a small share of training time even on 2 loaded CPU cores.
    assert 0 < summary["stop_agreement_s"] < summary["train_runtime_s"]


def test_sigterm_during_the_last_save_is_a_preemption_and_the_retry_takes_no_step(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    job = tiny("train.max_steps=20", "train.save_steps=10")
    seal = RunDir.seal_checkpoint

    def sealed_then_terminated(self, step, **extra):  # the signal lands after the last step's agreement
        folder = seal(self, step, **extra)
        if step == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        return folder

    monkeypatch.setattr(RunDir, "seal_checkpoint", sealed_then_terminated)
    stopped = invoke("pretrain", "--run-dir", str(run_dir), *job, expect=143)
    assert "pretrain stopped on SIGTERM at step 20" in stopped.stderr
    # Tracked (the tests' sqlite store): a preempted run is KILLED, not FAILED, and its retry finishes it.
    run_id = json.loads((run_dir / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    # Its hard-exit deadline ends with the stop: left running, it ended this test run 120 s later.
    assert DEADLINE_THREAD not in {thread.name for thread in threading.enumerate()}
    assert not (run_dir / "model").exists(), "nothing evaluated or committed after the signal"
    monkeypatch.undo()
    invoke("pretrain", "--run-dir", str(run_dir), *job)
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    assert (summary["global_step"], summary["resumed_from_step"]) == (20, 20)
    assert summary["mlflow_run_id"] == run_id and mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_killed_rank_brings_the_launch_down_and_the_retry_resumes(tmp_path: Path, corpus_file: Path):
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    launcher = _two_ranks(run_dir, tmp_path, collective_timeout_s="30")
    _wait_for_checkpoint(run_dir, 25, launcher)
    os.kill(_worker(launcher, 1), signal.SIGKILL)  # out of memory: no warning, no checkpoint
    _, stderr = launcher.communicate(timeout=120)  # torchrun's agent tears the group down
    assert launcher.returncode == 128 + signal.SIGKILL, stderr[-3000:]
    assert "process of rank 1 exited with 137" in stderr
    newest = _complete_checkpoints(run_dir)[-1]
    assert newest >= 25

    summary = _resume(run_dir, tmp_path)
    assert summary["resumed_from_step"] == newest and summary["global_step"] == STEPS


def test_a_silent_node_fails_the_other_after_the_collective_timeout(tmp_path: Path, corpus_file: Path):
    """A node that vanishes without closing its connections: only the collective timeout ends the wait."""
    run_dir = prepared_run(tmp_path / "run", corpus_file)
    port = str(free_port())
    nodes = [
        _launch(run_dir, cwd=tmp_path, collective_timeout_s="15", env=_env(
            PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(rank),
            PET_MASTER_ADDR="localhost", PET_MASTER_PORT=port,
        ))
        for rank in (0, 1)
    ]  # fmt: skip
    frozen = None
    try:
        _wait_for_checkpoint(run_dir, 25, nodes[0])
        frozen = _worker(nodes[1], 1)
        os.kill(frozen, signal.SIGSTOP)  # alive, sockets open, never answering: a partitioned node
        _, stderr = nodes[0].communicate(timeout=180)
        assert nodes[0].returncode not in (0, 143), stderr[-3000:]
        assert "Timed out waiting 15000ms" in stderr, stderr[-3000:]
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGKILL)  # its launcher then sees it die and exits
        for node in nodes:
            if node.poll() is None:
                node.kill()
            node.communicate(timeout=60)
    assert _complete_checkpoints(run_dir)[-1] >= 25, "the newest complete checkpoint is intact"


def test_launch_waits_for_the_rendezvous_host_then_names_it(tmp_path: Path):
    unresolvable = "kantai-pretrain-0.kantai-pretrain.invalid"
    command = [sys.executable, "-m", "kantai_batch", "launch", "--nnodes", "2", "--node_rank", "1",
               "--master_addr", unresolvable, "pretrain"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=_env(KANTAI_RENDEZVOUS_WAIT_S="2"), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 4, done.stderr  # retryable: the pod is restarted, not the Job failed
    errors = [line for line in done.stderr.splitlines() if line.startswith("kantai-batch: error:")]
    assert len(errors) == 1 and f"rendezvous host {unresolvable} did not resolve within 2 s" in errors[0], done.stderr
    assert "waiting for rendezvous host" in done.stderr, "it retried before giving up"

    bad = subprocess.run(command, cwd=tmp_path, env=_env(KANTAI_RENDEZVOUS_WAIT_S="soon"), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "KANTAI_RENDEZVOUS_WAIT_S" in bad.stderr.strip().splitlines()[-1]


def test_sigterm_ends_a_phase_with_143_even_as_a_containers_first_process(tmp_path: Path):
    """As PID 1 Python ignores a signal it has no handler for: a drained pod would wait for SIGKILL (137)."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a process namespace of its own needs root and unshare")
    command = ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "kantai_batch", "launch",
               "--nnodes", "2", "--node_rank", "1", "--master_addr", "kantai-pretrain-0.kantai-pretrain.invalid",
               "prepare"]  # fmt: skip
    waiting = subprocess.Popen(command, cwd=tmp_path, env=_env(KANTAI_RENDEZVOUS_WAIT_S="120"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while "waiting for rendezvous host" not in (line := waiting.stderr.readline()):
        assert line and time.monotonic() < deadline, "launch never started waiting"
    # To the namespace's first process, as the kubelet sends it.
    os.kill(int(Path(f"/proc/{waiting.pid}/task/{waiting.pid}/children").read_text().split()[0]), signal.SIGTERM)
    assert waiting.wait(timeout=30) == 143


def test_a_preemption_saves_before_an_evaluation_due_at_its_step():
    """The Trainer evaluates before it saves: an evaluation due at the step the ranks stop on would spend
    the grace period, and the deadline would end the process without the checkpoint."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from kantai_batch.preemption import Preemption
    from kantai_batch.stopping import StopAgreement

    preemption = Preemption(3600.0)
    preemption.received.set()
    stop = StopAgreement(preemption)
    args = TrainingArguments(output_dir="unused", report_to=[])
    try:
        control = stop.on_step_end(args, TrainerState(global_step=10), TrainerControl(should_evaluate=True))
    finally:
        preemption.cancel_deadline()
    assert control.should_save and control.should_training_stop and not control.should_evaluate
