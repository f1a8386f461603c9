"""The Trainer's metrics into the pretrain run's MLflow run, each step once across resumes.

transformers' ``MLflowCallback`` logs every TrainingArguments field and the model's config as params
when training begins, and each log line at its step. A resumed training continues its MLflow run
(``tracking.pretrain_run``), where both go wrong: the params are the run's already, and some differ on
another pod or path (``output_dir``, the data loader's workers, the transformers version) while MLflow
refuses to change a param; and the steps between the checkpoint and where the stopped process got to
are trained again, and were logged a second time at the same steps, so the run held two curves.
"""

from __future__ import annotations

import logging
import os
import re

from transformers.integrations import MLflowCallback

from kantai_batch.errors import first_line

log = logging.getLogger(__name__)


class MetricsCallback(MLflowCallback):
    """``MLflowCallback`` for the run ``run_id``; when ``continued``, no params and no step logged twice
    (the values first logged at a step stand: a redone step of a deterministic training repeats them)."""

    def __init__(self, run_id: str, *, continued: bool) -> None:
        super().__init__()
        self._tracked_run = run_id
        self._continued = continued
        self._logged_through: dict[str, int] = {}

    def setup(self, args, state, model):
        if not self._continued:
            super().setup(args, state, model)
            return
        # (Its own _run_id is MLFLOW_RUN_ID's, set in setup: the run here is ours, _tracked_run.)
        # The callback's own door: at most this many params, read from the environment here.
        before = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
        os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
        try:
            super().setup(args, state, model)
        finally:
            if before is None:
                os.environ.pop("MLFLOW_MAX_LOG_PARAMS")
            else:
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = before

    def on_log(self, args, state, control, logs, model=None, **kwargs):
        if self._continued and state.is_world_process_zero and logs:
            if state.global_step <= self._through(_series(logs)):
                return
        super().on_log(args, state, control, logs, model=model, **kwargs)

    def _through(self, series: str) -> int:
        """The last step the run holds a value of ``series`` at (-1 for none), asked once per series."""
        if series not in self._logged_through:
            try:
                history = self._ml_flow.MlflowClient().get_metric_history(self._tracked_run, series)
            except Exception as exc:  # noqa: BLE001 - a store that does not answer now must not stop training
                log.warning(
                    "mlflow: run %s's %s could not be read (%s); its steps are logged as they come",
                    self._tracked_run, series, first_line(exc),
                )  # fmt: skip
                history = []
            self._logged_through[series] = max((metric.step for metric in history), default=-1)
        return self._logged_through[series]


def _series(logs: dict) -> str:
    # One log line's metrics are logged together: its first numeric one stands for all of them, named
    # as MLflowCallback names it.
    first = next((key for key, value in logs.items() if isinstance(value, (int, float))), next(iter(logs)))
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", first)
