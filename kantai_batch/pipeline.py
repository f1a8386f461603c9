"""run: the phase table in order against one run dir, skipping phases complete with unchanged inputs.

Under a multi-process launcher (``torchrun``, ``WORLD_SIZE`` > 1) the phases marked ``every_rank``
(pretrain, evaluate) run on every rank, data-parallel, and the main process commits; the main process
runs the others while the rest wait, and then find them complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

from kantai_batch.distributed import distributed_state, main_first
from kantai_batch.errors import JobConfigError
from kantai_batch.fingerprint import fingerprint_of
from kantai_batch.job import Job
from kantai_batch.phases import PHASES, Phase
from kantai_batch.rundir import RunDir

log = logging.getLogger(__name__)


def run_pipeline(
    job: Job, run: RunDir, *, track: bool = True, phases: Iterable[Phase] = PHASES, redo: Iterable[str] = ()
) -> list[str]:
    """Run ``phases`` (every phase by default) as needed; return the names of those that ran.

    The phases named in ``redo`` (not every-rank ones) run even when complete, on the main process; the
    others then find them complete.
    """
    phases, redo = tuple(phases), set(redo)
    require_before_start(job, run, _from_the_first_to_run(job, run, phases, redo))
    state = distributed_state()
    ran = []
    for phase in phases:
        if state is None:
            turn = contextlib.nullcontext()
        elif phase.every_rank:
            state.wait_for_everyone()  # every rank decides on the same run dir, then all take part
            turn = contextlib.nullcontext()
        else:
            turn = main_first()  # waits past the collective timeout: tokenizing may take hours
        main = state is None or state.is_main_process
        forced = phase.name in redo and not phase.every_rank and main
        with turn:
            # What lies outside the run dir (a source file's size and time) may look different from
            # another node: the main process alone weighs it, and the others find its output complete.
            if _run_phase(job, run, phase, track=track, forced=forced, outside=main):
                ran.append(phase.name)
    return ran


def require_before_start(job: Job, run: RunDir, phases: set[str], *, leased: bool = True) -> None:
    """What ``phases`` will need, checked before the first phase runs: a missing probe file or DeepSpeed
    config, a misspelt starting model or (``leased``: pretrain holds its lease) a lease term the
    training cannot wait out was found after the phases before it."""
    from kantai_batch.probes import read_probes

    if "evaluate" in phases and job.task == "mlm" and job.eval.probes:
        read_probes(job.eval.probes, job.tokenizer.special_tokens[4])
    if leased and "pretrain" in phases and run.remote is not None:
        from kantai_batch.lease import require_term_within

        require_term_within(job.train.collective_timeout_s, "train.collective_timeout_s")
    if "pretrain" in phases and job.train.deepspeed:
        from kantai_batch.distributed import deepspeed_config

        deepspeed_config(job.train.deepspeed)
    start = job.train.init_from
    local = start and "://" not in start and not start.startswith("models:/")
    if local and {"train-tokenizer", "pretrain"} & phases and not Path(start).expanduser().exists():
        raise JobConfigError(f"train.init_from {start} does not exist (relative paths start at {Path.cwd()})")


def _from_the_first_to_run(job: Job, run: RunDir, phases: tuple[Phase, ...], redo: set[str]) -> set[str]:
    """The names of the phases from the first that will run (missing, redone or of other inputs) on: a
    finished run dir is not refused for a file that only its finished phases read (a probe file moved
    since). What changed outside the run dir (its corpus's files) is left to the phases to find."""
    for index, phase in enumerate(phases):
        marker = None if phase.name in redo else run.marker(phase.output_of(run))
        if marker is None or not _inputs_unchanged(job, phase, run, marker):
            return {later.name for later in phases[index:]}
    return set()


def _run_phase(job: Job, run: RunDir, phase: Phase, *, track: bool, forced: bool = False, outside: bool = True) -> bool:
    """Run one phase unless its output is complete with unchanged inputs; return whether it ran."""
    output = phase.output_of(run)
    marker = None if forced else run.marker(output)
    if forced:
        log.info("%s: redoing it, to see what its sources hold now", phase.name)
    elif marker is not None:
        if not _inputs_unchanged(job, phase, run, marker):
            log.info("%s: %s is complete but its inputs changed, redoing it", phase.name, run.uri(output))
        elif outside and (change := phase.change_outside(job, run, marker)):
            log.info("%s: %s is complete but %s, redoing it", phase.name, run.uri(output), change)
        else:
            log.info("%s: %s is complete and its inputs are unchanged, skipped", phase.name, run.uri(output))
            return False
    else:
        log.info("%s: starting", phase.name)
    phase.run(job, run, track=track)
    return True


def _inputs_unchanged(job: Job, phase: Phase, run: RunDir, marker: dict) -> bool:
    """Whether ``marker`` records the phase's fingerprint now, or as recorded before 2026-12-07 (a run dir
    made then is not redone for it): that form is computed only where the current one differs."""
    recorded = marker.get("inputs_sha256")
    return recorded == fingerprint_of(job, phase.name, run) or recorded == fingerprint_of(
        job, phase.name, run, legacy=True
    )
