"""run: every phase in order against one run dir, skipping those complete with unchanged inputs.

Under a multi-process launcher (``torchrun``, ``WORLD_SIZE`` > 1) pretrain and evaluate run on every
rank (data-parallel; the main process commits); the main process runs prepare and train-tokenizer
while the others wait, and then find them complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from kantai_batch.distributed import distributed_state
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.storage import RunDir

log = logging.getLogger(__name__)


def run_pipeline(job: Job, run: RunDir, *, track: bool = True) -> list[str]:
    """Run prepare, train-tokenizer, pretrain and evaluate as needed; return the phases that ran."""
    from kantai_batch.corpus import prepare
    from kantai_batch.evaluate import evaluate
    from kantai_batch.tokenizer import train_tokenizer
    from kantai_batch.train import pretrain

    phases: list[tuple[str, Path, Callable[[], object]]] = [
        ("prepare", run.corpus, lambda: prepare(job, run)),
        ("train-tokenizer", run.tokenizer, lambda: train_tokenizer(job, run)),
        ("pretrain", run.model, lambda: pretrain(job, run, track=track)),
        ("evaluate", run.eval, lambda: evaluate(job, run)),
    ]
    state = distributed_state()
    ran = []
    for name, output, phase in phases:
        if state is None:
            turn = contextlib.nullcontext()
        elif name in ("pretrain", "evaluate"):
            state.wait_for_everyone()  # every rank decides on the same run dir, then all take part
            turn = contextlib.nullcontext()
        else:
            turn = state.main_process_first()
        with turn:
            if _run_phase(job, run, name, output, phase):
                ran.append(name)
    return ran


def _run_phase(job: Job, run: RunDir, name: str, output: Path, phase: Callable[[], object]) -> bool:
    """Run one phase unless its output is complete with unchanged inputs; return whether it ran."""
    marker = run.marker(output)
    if marker is not None:
        if marker.get("inputs_sha256") == fingerprint_of(job, name, run):
            log.info("%s: %s is complete and its inputs are unchanged, skipped", name, run.uri(output))
            return False
        log.info("%s: %s is complete but its inputs changed, redoing it", name, run.uri(output))
    else:
        log.info("%s: starting", name)
    phase()
    return True
