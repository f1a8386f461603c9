"""train.max_seconds: train for a wall-clock budget, with the learning-rate schedule ending when it does.

A schedule that decays to zero must know its length in steps, and a budget gives it in seconds. So
the steps after the first (which pays for warm-up of caches and compilation) are timed, and the
schedule is planned to end at the step the budget allows. The plan is checked again each time
another tenth of the budget, or of the planned steps left, has passed, against the step time since
the last check (not the mean since the start, which keeps the slow first steps), and re-planned when
that has drifted: steps that speed up or slow down after a check (a plan from slow first steps, a
noisy neighbour leaving) would otherwise end training before the budget or cut its decay short.
The ranks plan with the slowest rank's step time, so all of them share one schedule
(their learning rates must match, or the data-parallel replicas drift apart), and they stop
together through ``StopAgreement``. Evaluations do not count as training time.

Time already spent is kept in each checkpoint's marker (``train_seconds``), so a resumed run trains
only for what is left of the budget, and the plan itself is part of the saved state of the scheduler
that ``trainer.PretrainTrainer`` builds from it.
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger(__name__)

# Steps timed for the first plan, after the first step of a run (which pays for warm-up).
ESTIMATE_STEPS = 10
# Re-plan when the step time since the last check differs from the planned one by more than this.
DRIFT = 0.05
# After the first plan, checks come each time another 1/CHECKS of the budget (or of the steps left) passes.
CHECKS = 10


class PlannedSchedule:
    """The learning-rate factor of each step, for a total that may be re-planned while training.

    A callable object, so ``LambdaLR`` saves its fields with the scheduler and a resume restores them.
    """

    def __init__(self, shape: str, total_steps: int, warmup_steps: int, warmup_ratio: float, decay_ratio: float):
        self.shape = shape
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.decay_ratio = decay_ratio

    def __call__(self, step: int) -> float:
        total = max(1, self.total_steps)
        warmup = self.warmup_steps or math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return step / warmup
        if self.shape == "constant_with_warmup":
            return 1.0
        if self.shape == "warmup_stable_decay":
            decay = max(1, math.ceil(self.decay_ratio * total))
            return min(1.0, max(0.0, (total - step) / decay))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear


class TimeBudget:
    """How much of ``max_seconds`` is spent, the measured step time, and the plan built from it."""

    def __init__(self, max_seconds: float, spent_s: float = 0.0) -> None:
        self.max_seconds = max_seconds
        # Set by whoever knows the training set's size (``build_trainer``), before training starts.
        self.schedule: PlannedSchedule | None = None
        self.spent_before = spent_s
        self._started: float | None = None
        self._stopped: float | None = None
        self._excluded = 0.0
        self._timing_from: tuple[int, float] | None = None
        self._planned_step_s: float | None = None
        self._planned_at: int | None = None
        self._bound = 0
        self._next_check = (math.inf, math.inf)  # the seconds spent, or the step, at which the plan is checked

    def start(self) -> None:
        """Training (not data loading or model set-up) begins: the clock runs from here."""
        self._started = time.monotonic()

    def stop(self) -> None:
        """Training ended: evaluating and saving the model do not count against the budget."""
        self._stopped = time.monotonic()

    def exclude(self, seconds: float) -> None:
        """Time that was not training (a periodic evaluation) does not count against the budget."""
        if self._stopped is None:  # once stopped the clock stands: the final evaluation is not on it
            self._excluded += seconds

    def exhausted(self) -> bool:
        return self.spent() >= self.max_seconds

    def spent(self) -> float:
        if self._started is None:
            return self.spent_before
        return self.spent_before + ((self._stopped or time.monotonic()) - self._started) - self._excluded

    def plan_within(self, schedule: PlannedSchedule) -> None:
        """Plan ``schedule``, never past its total now (max_steps, or the epochs' steps).

        Taken here, before a resume restores the saved plan into the same object: a bound read later
        would be the old plan, and a faster resumed run could not plan past it.
        """
        self.schedule = schedule
        self._bound = schedule.total_steps

    def observe(self, step: int) -> tuple[float, float]:
        """This rank's view after ``step``: seconds of the budget spent, mean step time since the last plan.

        Steps are timed on the budget's own clock: an evaluation between them would otherwise count
        as step time, and a plan from inflated steps ends the schedule (and training) early.
        """
        spent = self.spent()
        if self._timing_from is None:
            self._timing_from = (step, spent)  # the first step of a run pays for warm-up: not timed
        first, since = self._timing_from
        step_s = (spent - since) / (step - first) if step > first else 0.0
        return spent, step_s

    def steer(self, step: int, spent: float, step_s: float) -> bool:
        """Act on what the ranks agreed (the most any of them spent, the slowest step time): (re-)plan
        when due; return whether training ends at ``step``, the schedule's end or the budget's.

        Every rank plans from the same agreed numbers: each rank's own clock started a little apart,
        and plans a step apart would stop one rank while the others wait in a collective.
        """
        if self._planned_at is None:
            if self._timing_from is not None and step == self._timing_from[0] + ESTIMATE_STEPS:
                self._plan(step, step_s, spent)
            elif self.spent_before and step >= self.schedule.total_steps:
                # A resume under a longer budget than the one whose plan it restored: that plan is over (its
                # learning rate 0 from here), so plan now from the steps' mean time so far, checked later.
                self._plan(step, spent / step, spent)
        elif self._check_due(step, spent):
            if abs(step_s / self._planned_step_s - 1) > DRIFT:
                self._plan(step, step_s, spent)
            else:
                self._checked(step, spent)
        # A plan cut to max_steps or the epochs' end leaves the ending to that bound.
        # A plan restored by a resume is another budget's: only this run's own plan ends training.
        planned_end = (
            self._planned_at is not None
            and self.schedule.total_steps < self._bound
            and step >= self.schedule.total_steps
        )
        return planned_end or spent >= self.max_seconds

    def _plan(self, step: int, step_s: float, spent: float) -> None:
        """End the schedule at the step where, at ``step_s`` per step, the budget runs out."""
        left = max(0.0, self.max_seconds - spent)
        total = min(step + max(1, int(left / step_s)), self._bound)
        log.info(
            "pretrain: %.3f s per step, %.0f s of the budget left: the schedule ends at step %d%s",
            step_s,
            left,
            total,
            f" (re-planned from {self.schedule.total_steps})" if self._planned_step_s is not None else "",
        )
        self.schedule.total_steps = total
        self._planned_step_s = step_s
        self._planned_at = step
        self._checked(step, spent)

    def _check_due(self, step: int, spent: float) -> bool:
        # At a time and step every rank agrees on, as each holds the same plan; timed over enough steps.
        enough = step >= self._timing_from[0] + ESTIMATE_STEPS
        return enough and (spent >= self._next_check[0] or step >= self._next_check[1])

    def _checked(self, step: int, spent: float) -> None:
        self._timing_from = (step, self.spent())  # the next check times only the steps after this one
        steps_left = self.schedule.total_steps - step
        self._next_check = (spent + self.max_seconds / CHECKS, step + max(ESTIMATE_STEPS, steps_left // CHECKS))
