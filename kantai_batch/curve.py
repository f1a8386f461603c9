"""Held-out loss against training time: the curve time-to-quality is read from.

Training time is wall-clock time with the evaluations taken out, so evaluating often does not make
a configuration look slower, and a time budget counts training only.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class LossCurve(TrainerCallback):
    """Evaluates every ``eval_seconds`` of training time (if set), stops after ``seconds`` (if set),
    and records every evaluation the Trainer runs as a point: training seconds, step, metrics."""

    def __init__(self, *, seconds: float | None = None, eval_seconds: float | None = None) -> None:
        self.seconds = seconds
        self.eval_seconds = eval_seconds
        self.points: list[dict[str, Any]] = []
        self._start = time.perf_counter()
        self._paused = 0.0
        self._step_end = self._start
        self._next_eval = eval_seconds or 0.0
        self.timed_out = False
        """Whether training stopped because ``seconds`` were spent."""

    def training_seconds(self, at: float | None = None) -> float:
        return (self._step_end if at is None else at) - self._start - self._paused

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._step_end = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = time.perf_counter()
        elapsed = self.training_seconds()
        if self.eval_seconds and elapsed >= self._next_eval:
            control.should_evaluate = True
            while self._next_eval <= elapsed:
                self._next_eval += self.eval_seconds
        if self.seconds and elapsed >= self.seconds:
            control.should_training_stop = self.timed_out = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # A dict of eval sets is evaluated one set at a time: the sets of one step share a point.
        now = time.perf_counter()
        if not self.points or self.points[-1]["step"] != state.global_step:
            self.points.append({"seconds": round(self.training_seconds(), 2), "step": state.global_step})
        point = self.points[-1]
        for key, value in (metrics or {}).items():
            if key.endswith(("_loss", "_accuracy")):
                point[key.removeprefix("eval_")] = value
        self._paused += now - self._step_end
        self._step_end = now
        return control


def time_to_reach(points: list[dict[str, Any]], key: str, target: float) -> float | None:
    """Training seconds at which ``key`` first falls to ``target``, interpolated between evaluations."""
    previous = None
    for point in points:
        if key in point and point[key] <= target:
            if previous is None or previous[key] == point[key]:
                return point["seconds"]
            share = (previous[key] - target) / (previous[key] - point[key])
            return previous["seconds"] + share * (point["seconds"] - previous["seconds"])
        if key in point:
            previous = point
    return None
