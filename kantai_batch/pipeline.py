"""run: every phase in order against one run dir, skipping those complete with unchanged inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

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
    ran = []
    for name, output, phase in phases:
        marker = run.marker(output)
        if marker is not None:
            if marker.get("inputs_sha256") == fingerprint_of(job, name, run):
                log.info("%s: %s is complete and its inputs are unchanged, skipped", name, run.uri(output))
                continue
            log.info("%s: %s is complete but its inputs changed, redoing it", name, run.uri(output))
        else:
            log.info("%s: starting", name)
        phase()
        ran.append(name)
    return ran
