"""Several processes of one training (``torchrun``): which one is the main process, and their barriers."""

from __future__ import annotations

import os


def distributed_state():
    """accelerate's process state when launched as several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from kantai_batch.hardware import has_accelerator

    # Initializes the process group (gloo on CPU, nccl on GPU) that the Trainer then reuses. The
    # state is a singleton whose first construction wins, so it must say `cpu` exactly as the
    # Trainer's arguments do (use_cpu without an accelerator): without it, accelerate sees one process.
    return PartialState(cpu=not has_accelerator())


def is_main_process() -> bool:
    state = distributed_state()
    return state is None or state.is_main_process
