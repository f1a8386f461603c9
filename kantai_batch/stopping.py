"""Stopping training early, decided by every rank together at a step boundary.

A reason to stop is seen by one process: SIGTERM reaches the pods of one node, and each process has
its own clock for the time budget. A rank that stopped alone would leave the others waiting in a
collective it never joins, until the collective timeout kills them without a checkpoint. So after
every optimizer step the ranks share what they see in one tiny ``all_reduce`` (MAX of a few numbers:
SIGTERM, the budget's seconds spent, step time) and act on the same result: all save at the same
step, all stop, all plan the budget's schedule alike. Its cost is measured in every run
(``stop_agreement_s`` in the summary) and stays far below a step; with one process it is skipped.
The values never leave the host: they are reduced in a gloo group of their own. Through NCCL they
would be copied to the GPU and back, and each copy waits for every kernel queued before it, so the
host could no longer queue the next step while the GPU runs this one.

A diverged training (a NaN or infinite loss or gradient norm) needs no collective: the logged values
are the same on every rank. They are read back from the device only at a log line, so every
checkpoint gets a log line first, and a diverged model is never saved.
"""

from __future__ import annotations

import logging
import math
import time

from transformers import TrainerCallback

from kantai_batch.budget import TimeBudget
from kantai_batch.distributed import host_all_reduce
from kantai_batch.preemption import Preemption

log = logging.getLogger(__name__)

PREEMPTION = "preemption"
BUDGET = "max_seconds"
DIVERGED = "diverged"


class StopAgreement(TrainerCallback):
    """Every rank stops (and, when preempted, saves) at the first step any rank has a reason to."""

    def __init__(self, preemption: Preemption, budget: TimeBudget | None = None) -> None:
        self.preemption = preemption
        self.budget = budget
        self.stopped_by: str | None = None
        self.agreement_s = 0.0
        self._step_end: float | None = None
        self.divergence: dict[str, float] = {}  # what was logged at the step where training diverged
        self.saved_step: int | None = None  # the newest checkpoint this training wrote

    @property
    def preempted(self) -> bool:
        return self.stopped_by == PREEMPTION

    @property
    def diverged(self) -> bool:
        return self.stopped_by == DIVERGED

    def on_train_begin(self, args, state, control, **kwargs):
        if self.budget is not None:
            self.budget.start()
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        # An evaluation runs right after the step that asked for it: its time is not training time.
        if self.budget is not None and self._step_end is not None:
            now = time.monotonic()
            self.budget.exclude(now - self._step_end)
            self._step_end = now
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.budget is not None:
            self.budget.stop()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = time.monotonic()
        step = state.global_step
        spent, step_s = self.budget.observe(step) if self.budget else (0.0, 0.0)
        started = time.perf_counter()
        shared = agree_max([float(self.preemption.received.is_set()), spent, step_s], timeout_s=args.ddp_timeout)
        self.agreement_s += time.perf_counter() - started
        preempted, spent, step_s = bool(shared[0]), shared[1], shared[2]
        if preempted:
            if not self.preemption.received.is_set():
                log.warning("pretrain: another rank received SIGTERM; saving a checkpoint at step %d", step)
            self.stopped_by = PREEMPTION
            self.preemption.start_deadline()
            control.should_save = True
            control.should_training_stop = True
            # The Trainer evaluates before it saves: an evaluation due at this step would spend the grace.
            control.should_evaluate = False
        elif self.budget is not None and self.budget.steer(step, spent, step_s):
            log.info("pretrain: the time budget of %.0f s ends training at step %d", self.budget.max_seconds, step)
            self.stopped_by = BUDGET
            control.should_training_stop = True
            # As the Trainer does at max_steps: a pod retried before the commit then commits this step.
            # Not where nothing is saved at all (bench's configurations).
            control.should_save = args.save_strategy != "no"
        if control.should_save:
            # The loss is read back from the device only at a log line: one before every checkpoint lets
            # on_log keep a diverged model out of it.
            control.should_log = True
        return control

    def settle(self, timeout_s: float | None = None) -> None:
        """After training: a SIGTERM that came after the last step boundary (during the final save or
        its upload) is a preemption too, agreed by every rank, so no process goes on to evaluate and
        commit while another exits."""
        if self.stopped_by in (None, BUDGET):  # the same on every rank
            if agree_max([float(self.preemption.received.is_set())], timeout_s=timeout_s)[0]:
                self.stopped_by = PREEMPTION

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The logged loss and gradient norm are the same on every rank (the loss is gathered, the norm
        # is of the reduced gradients), so every rank stops at this step without a collective. Under fp16's
        # loss scaling an infinite gradient norm is a step the scaler skips by design, not a divergence.
        watched = ("loss",) if getattr(args, "fp16", False) else ("loss", "grad_norm")
        seen = {key: (logs or {}).get(key) for key in watched}
        if self.stopped_by != DIVERGED and any(v is not None and not math.isfinite(v) for v in seen.values()):
            self.stopped_by = DIVERGED
            self.divergence = {"step": state.global_step, **{k: v for k, v in seen.items() if v is not None}}
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step
        return control


def agree_max(values: list[float], *, timeout_s: float | None = None) -> list[float]:
    """Each value's maximum over every process of the training (the values themselves in one process)."""
    return host_all_reduce(values, "max", timeout_s=timeout_s)
