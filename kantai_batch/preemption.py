"""SIGTERM during pretraining: every rank checkpoints at the same step boundary, commits, exits in time.

Kubernetes sends SIGTERM when it preempts or drains a pod and SIGKILL ``terminationGracePeriodSeconds``
later. A multi-node job that loses one node sees SIGTERM on that node's processes only, so a signal
is never acted on alone: this process records it, and the ranks agree at the next step boundary
(``StopAgreement``) to save and stop together. The checkpoint is marked and uploaded like any other,
and ``pretrain`` exits with ``PreemptedError`` on every rank, so every pod of the job is retried and
they resume together. If the step, save and upload cannot finish within ``train.preemption_grace_s``
the process exits anyway, before the SIGKILL: the previous complete checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from kantai_batch.errors import PreemptedError

log = logging.getLogger(__name__)

DEADLINE_THREAD = "kantai-preemption-deadline"


class Preemption:
    """SIGTERM seen by this process, and the hard deadline that starts once a stop is under way."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received = threading.Event()
        self._deadline: threading.Timer | None = None
        # Reentrant: the SIGTERM handler runs on the main thread, possibly while it holds the lock here.
        self._lock = threading.RLock()

    def start_deadline(self) -> None:
        """Exit with 143 after ``grace_s`` unless the process is done by then; idempotent."""
        with self._lock:
            if self._deadline is not None:
                return
            self._deadline = threading.Timer(self.grace_s, self._hard_exit)
            self._deadline.name = DEADLINE_THREAD
            self._deadline.daemon = True
            self._deadline.start()

    def cancel_deadline(self) -> None:
        with self._lock:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline.join(timeout=1.0)  # it wakes at once to see it was cancelled
                self._deadline = None

    def _hard_exit(self) -> None:
        log.error(
            "pretrain: no checkpoint within %.0f s of SIGTERM; exiting, the last complete one stays", self.grace_s
        )
        os._exit(PreemptedError.exit_code)


@contextlib.contextmanager
def sigterm_checkpoints(preemption: Preemption) -> Iterator[None]:
    """While training, SIGTERM asks every rank for a checkpoint and starts this process's deadline."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def on_sigterm(signum, frame) -> None:
        if preemption.received.is_set():
            return
        log.warning(
            "pretrain: SIGTERM: every rank saves a checkpoint at the end of this step (grace %.0f s)",
            preemption.grace_s,
        )
        preemption.received.set()
        preemption.start_deadline()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        # The stop got through its step, save and upload: what follows is the exit itself. A deadline
        # left running would end the process later whatever it then does (a test run's, in-process).
        preemption.cancel_deadline()
