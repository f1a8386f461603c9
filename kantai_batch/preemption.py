"""SIGTERM during pretraining: checkpoint at the next step boundary, commit it, exit within the grace period.

Kubernetes sends SIGTERM when it preempts or drains a pod and SIGKILL ``terminationGracePeriodSeconds``
later. On SIGTERM the Trainer is told to save and stop after the step it is in; the checkpoint is
marked and uploaded like any other, and ``pretrain`` exits with ``PreemptedError`` so the retried pod
resumes from that step. If the step, save and upload cannot finish within ``train.preemption_grace_s``
the process exits anyway, before the SIGKILL: the previous complete checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

from kantai_batch.errors import PreemptedError

log = logging.getLogger(__name__)


class PreemptionCallback(TrainerCallback):
    """Turns a received SIGTERM into save-and-stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested.is_set():
            control.should_save = True
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def sigterm_checkpoints(callback: PreemptionCallback, grace_s: float) -> Iterator[None]:
    """While training, SIGTERM requests a checkpoint; a timer ends the process after ``grace_s``."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def hard_exit() -> None:
        log.error("pretrain: no checkpoint within %.0f s of SIGTERM; exiting, the last complete one stays", grace_s)
        os._exit(PreemptedError.exit_code)

    def on_sigterm(signum, frame) -> None:
        if callback.requested.is_set():
            return
        log.warning("pretrain: SIGTERM: saving a checkpoint at the end of this step (grace %.0f s)", grace_s)
        callback.requested.set()
        timer = threading.Timer(grace_s, hard_exit)
        timer.daemon = True
        timer.start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
