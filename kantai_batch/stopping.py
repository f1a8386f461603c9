"""Stopping training early, decided by every rank together at a step boundary.

A reason to stop is seen by one process: SIGTERM reaches the pods of one node, and each process has
its own clock for the time budget. A rank that stopped alone would leave the others waiting in a
collective it never joins, until the collective timeout kills them without a checkpoint. So after
every optimizer step the ranks share their reasons in one tiny ``all_reduce`` (MAX of a few flags)
and act on the union: all save at the same step and all stop. Its cost is measured in every run
(``stop_agreement_s`` in the summary) and stays far below a step; with one process it is skipped.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from kantai_batch.preemption import Preemption

log = logging.getLogger(__name__)

PREEMPTION = "preemption"


class StopAgreement(TrainerCallback):
    """Every rank stops (and, when preempted, saves) at the first step any rank has a reason to."""

    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption
        self.stopped_by: str | None = None
        self.agreement_s = 0.0

    @property
    def preempted(self) -> bool:
        return self.stopped_by == PREEMPTION

    def on_step_end(self, args, state, control, **kwargs):
        started = time.perf_counter()
        (preempted,) = any_rank([self.preemption.received.is_set()], args.device)
        self.agreement_s += time.perf_counter() - started
        if preempted:
            if not self.preemption.received.is_set():
                step = state.global_step
                log.warning("pretrain: another rank received SIGTERM; saving a checkpoint at step %d", step)
            self.stopped_by = PREEMPTION
            self.preemption.start_deadline()
            control.should_save = True
            control.should_training_stop = True
        return control


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag OR-ed over every process of the training (the flags unchanged in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    # On the training device: NCCL reduces only device tensors; gloo takes the CPU ones.
    shared = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return [bool(value) for value in shared.tolist()]
