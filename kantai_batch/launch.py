"""launch: one process per device on this node (torchrun), exiting with what the processes exited with.

torchrun itself exits 1 whenever a worker fails, which would hide a config error (2) or a preemption
(143) from the Kubernetes ``podFailurePolicy`` that acts on those codes. This runs torchrun's own
launcher in-process and passes the first failed worker's exit code on instead.

Topology comes from torchrun's options or their ``PET_*`` environment variables (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ...), which is how the pod specs set
it and what Kubeflow's trainer injects. The rendezvous host (pod 0's name behind the headless Service)
may not resolve yet when the other pods start, so launch waits for it, boundedly
(``KANTAI_RENDEZVOUS_WAIT_S``, default 300 s), before torchrun tries it once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import time

from kantai_batch.environment import seconds
from kantai_batch.errors import JobConfigError, SourceUnavailableError

log = logging.getLogger(__name__)


def launch(torchrun_options: list[str], command: list[str]) -> int:
    """Run ``kantai-batch COMMAND`` under torchrun with ``torchrun_options``; return the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage text: 20 lines before the one that matters
            args = get_args_parser().parse_args([*torchrun_options, "--module", "kantai_batch", *command])
    except SystemExit as exc:
        problem = (said.getvalue().strip().splitlines() or ["?"])[-1].partition("error: ")[2]
        settings = [f"{name}={value!r}" for name, value in sorted(os.environ.items()) if name.startswith("PET_")]
        given = " ".join([*torchrun_options, *settings]) or "none"
        raise JobConfigError(f"launch: invalid torchrun options or PET_* settings ({given}): {problem}") from exc
    require_topology(args.nproc_per_node, args.nnodes)
    require_rendezvous(args, torchrun_options)
    wait_for_host(rendezvous_host(args), rendezvous_wait_s())
    try:
        run(args)
    except ChildFailedError as exc:
        rank, code = reported_failure(exc.failures)
        log.error("launch: process of rank %d exited with %d", rank, code)
        return code
    except SignalException as exc:
        return 128 + signal.Signals(exc.sigval).value
    return 0


# How the peers of a dead rank exit: the lost connection, or torchrun's SIGTERM (handled, or not).
_PEER_EXITS = (1, 128 + signal.SIGTERM, -signal.SIGTERM)
_STOPPED = (128 + signal.SIGTERM, -signal.SIGTERM)


def reported_failure(failures: dict) -> tuple[int, int]:
    """The rank and exit code a launch reports when ranks failed (``ChildFailedError.failures``).

    When a rank dies, its peers exit 1 on the lost connection or 143 on the SIGTERM with which torchrun
    stops them, sometimes before torchrun has seen the death, and torchrun stamps failures in whole
    seconds; so the cause (another signal or a specific code) wins over those, then the earlier
    failure, then the lower rank.
    """
    # 1 before torchrun's SIGTERM: a rank that crashed (1) and a peer stopped in the same second (143)
    # is a crash, not a preemption, which the pod failure policy would retry without counting it.
    rank, failure = min(
        failures.items(),
        key=lambda item: (
            item[1].exitcode in _PEER_EXITS,
            item[1].exitcode in _STOPPED,
            item[1].timestamp,
            item[0],
        ),
    )
    # A negative code is the signal that killed the process; report it the way a shell does.
    return rank, failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def require_topology(nproc_per_node: str, nnodes: str) -> None:
    """What torchrun would otherwise assert deep inside (exit 1, which the pod failure policy takes for
    a crash worth retrying): at least one process per node, and one node or a MIN:MAX range of them."""
    if nproc_per_node not in ("auto", "cpu", "gpu", "xpu") and not (
        nproc_per_node.isdigit() and int(nproc_per_node) >= 1
    ):
        raise JobConfigError(
            f"launch: --nproc-per-node (PET_NPROC_PER_NODE) must be a count of at least 1 or auto/cpu/gpu, "
            f"got {nproc_per_node!r}"
        )
    if nproc_per_node == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise JobConfigError("launch: --nproc-per-node (PET_NPROC_PER_NODE) gpu, but this node has no CUDA device")
    bounds = nnodes.split(":")
    if not (
        1 <= len(bounds) <= 2 and all(b.isdigit() and int(b) >= 1 for b in bounds) and int(bounds[0]) <= int(bounds[-1])
    ):
        raise JobConfigError(f"launch: --nnodes (PET_NNODES) must be N or MIN:MAX of at least 1, got {nnodes!r}")


def require_rendezvous(args, torchrun_options: list[str]) -> None:
    """A node rank among the nodes, and a place to meet for several: otherwise torchrun waits out its
    10-minute rendezvous timeout (at 127.0.0.1, its default address) and exits 1, which is retried."""
    nodes = int(args.nnodes.split(":")[-1])
    if not 0 <= args.node_rank < nodes:
        raise JobConfigError(
            f"launch: --node-rank (PET_NODE_RANK) must be 0 to {nodes - 1} for --nnodes (PET_NNODES) "
            f"{args.nnodes}, got {args.node_rank}"
        )
    given = any(option.split("=")[0] in _MEETING_OPTIONS for option in torchrun_options)
    if nodes > 1 and not (given or args.rdzv_endpoint or os.environ.get("PET_MASTER_ADDR")):
        raise JobConfigError(
            f"launch: {args.nnodes} nodes need a place to meet: --master-addr (PET_MASTER_ADDR) or --rdzv-endpoint "
            "(PET_RDZV_ENDPOINT), e.g. the first pod's name behind the headless Service"
        )


_MEETING_OPTIONS = frozenset(("--master-addr", "--master_addr", "--rdzv-endpoint", "--rdzv_endpoint"))


def rendezvous_wait_s() -> float:
    return seconds("KANTAI_RENDEZVOUS_WAIT_S", 300.0, zero=True)


def rendezvous_host(args) -> str:
    """The host every node meets at: ``--rdzv-endpoint``'s when given, else ``--master-addr``."""
    if args.rdzv_endpoint:
        return args.rdzv_endpoint.rsplit(":", 1)[0].strip("[]")
    return args.master_addr


def wait_for_host(host: str, wait_s: float) -> None:
    """Return once ``host`` resolves; retry for ``wait_s`` seconds, then fail in one line naming it."""
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except OSError as exc:  # socket.gaierror: the name does not exist (yet)
            if time.monotonic() + delay > deadline:
                raise SourceUnavailableError(
                    f"launch: rendezvous host {host} did not resolve within {wait_s:g} s ({exc.strerror or exc})"
                ) from None
        log.info("launch: waiting for rendezvous host %s to resolve", host)
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
