"""launch: one process per device on this node (torchrun), exiting with what the processes exited with.

torchrun itself exits 1 whenever a worker fails, which would hide a config error (2) or a preemption
(143) from the Kubernetes ``podFailurePolicy`` that acts on those codes. This runs torchrun's own
launcher in-process and passes the first failed worker's exit code on instead.

Topology comes from torchrun's options or their ``PET_*`` environment variables (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ...), which is how the pod specs set
it and what Kubeflow's trainer injects.
"""

from __future__ import annotations

import logging
import signal

from kantai_batch.errors import JobConfigError

log = logging.getLogger(__name__)


def launch(torchrun_options: list[str], command: list[str]) -> int:
    """Run ``kantai-batch COMMAND`` under torchrun with ``torchrun_options``; return the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        args = get_args_parser().parse_args([*torchrun_options, "--module", "kantai_batch", *command])
    except SystemExit as exc:  # argparse has printed what it did not understand
        raise JobConfigError(f"launch: invalid torchrun options {' '.join(torchrun_options)}") from exc
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        # A negative code is the signal that killed the process; report it the way a shell does.
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        log.error("launch: process of rank %d exited with %d", rank, code)
        return code
    except SignalException as exc:
        return 128 + signal.Signals(exc.sigval).value
    return 0
