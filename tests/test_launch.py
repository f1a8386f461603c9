"""Which failure a launch reports when several ranks failed."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from helpers import invoke
from kantai_batch.launch import reported_failure


def _failure(exitcode: int, timestamp: int) -> SimpleNamespace:
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp)


def test_a_killed_rank_is_reported_over_the_peer_that_lost_its_connection():
    # torchrun's timestamps are whole seconds: both failures in the same second, rank 0 first.
    failures = {0: _failure(1, 100), 1: _failure(-signal.SIGKILL, 100)}
    assert reported_failure(failures) == (1, 128 + signal.SIGKILL)
    # Or rank 0 was stopped by torchrun's SIGTERM in that second (CI, 2026-12-04: 143 was reported).
    for stopped in (128 + signal.SIGTERM, -signal.SIGTERM):
        failures = {0: _failure(stopped, 100), 1: _failure(-signal.SIGKILL, 100)}
        assert reported_failure(failures) == (1, 128 + signal.SIGKILL)


def test_a_crash_is_reported_over_the_peer_torchrun_stopped_in_the_same_second():
    # 143 is a preemption to the pod failure policy, retried without counting: a crash every time it runs
    # was retried for free whenever the peer stopped by torchrun had the lower rank.
    for stopped in (128 + signal.SIGTERM, -signal.SIGTERM):
        assert reported_failure({0: _failure(stopped, 100), 1: _failure(1, 100)}) == (1, 1)
    assert reported_failure({0: _failure(143, 100), 1: _failure(143, 100)}) == (0, 143)


def test_a_specific_code_wins_over_1_and_otherwise_the_earliest_then_the_lowest_rank():
    assert reported_failure({0: _failure(1, 100), 1: _failure(2, 101)}) == (1, 2)
    assert reported_failure({0: _failure(143, 101), 1: _failure(3, 100)}) == (1, 3)
    assert reported_failure({0: _failure(1, 100), 1: _failure(1, 100)}) == (0, 1)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    ("options", "env", "message"),
    [
        (["--nproc-per-node", "0"], {}, "--nproc-per-node (PET_NPROC_PER_NODE) must be a count of at least 1"),
        (["--nproc-per-node", "-1"], {}, "got '-1'"),
        ([], {"PET_NPROC_PER_NODE": "0"}, "got '0'"),
        ([], {"PET_NNODES": "0"}, "--nnodes (PET_NNODES) must be N or MIN:MAX of at least 1, got '0'"),
        ([], {"PET_NNODES": "3:2"}, "got '3:2'"),
        # torchrun waited out its 10-minute rendezvous timeout, then exited 1 (retried).
        ([], {"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "h"}, "must be 0 to 1 for --nnodes"),
        (
            [],
            {"PET_NNODES": "2", "PET_NODE_RANK": "1"},
            "2 nodes need a place to meet: --master-addr (PET_MASTER_ADDR)",
        ),
        ([], {"PET_NODE_RANK": ""}, "invalid torchrun options or PET_* settings (PET_NODE_RANK='')"),
        pytest.param(
            [],
            {"PET_NPROC_PER_NODE": "gpu"},
            "gpu, but this node has no CUDA device",
            marks=pytest.mark.skipif(_has_cuda(), reason="this node has a CUDA device"),
        ),  # fmt: skip
    ],
)
def test_a_topology_torchrun_cannot_run_is_a_config_error(options, env, message, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PET_MASTER_ADDR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke("launch", *options, "inspect", expect=2)
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
