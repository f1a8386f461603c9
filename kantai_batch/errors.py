"""The errors a user can cause, each with the exit code a scheduler can act on.

A Kubernetes ``podFailurePolicy`` fails a Job at once on the codes of errors that a retry cannot fix
(a bad job file, bad data) and retries the rest (an unreachable source, a preempted pod).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class KantaiError(Exception):
    """An error the user can fix; the CLI prints it as one line, without a traceback."""

    exit_code = 1


class JobConfigError(KantaiError):
    """The job file, a ``--set`` override or a command-line option is invalid."""

    exit_code = 2


class InputDataError(KantaiError):
    """An input exists but cannot be used: empty corpus, not a model folder, text without a mask."""

    exit_code = 3


class SourceUnavailableError(KantaiError):
    """An input could not be reached (download failed, file missing); a retry may succeed."""

    exit_code = 4


class NotPromotedError(KantaiError):
    """``run --register --fail-if-not-promoted``: the new version did not beat the champion on the benchmark.

    Not an error of the run (the version is registered as the challenger); a scheduler that wants to
    hear of it gets its own code, which no retry changes.
    """

    exit_code = 5


class TrainingDivergedError(KantaiError):
    """``pretrain``: the training loss or gradient norm became NaN or infinite; nothing past it was saved.

    A retry would resume from the last checkpoint with the same samples in the same order and diverge
    again, so a scheduler fails the Job at once: the job's settings must change.
    """

    exit_code = 6


class PreemptedError(KantaiError):
    """Training stopped on SIGTERM after committing a checkpoint; a retry resumes from it.

    128 + SIGTERM, the code a process killed by SIGTERM reports, so schedulers treat it alike.
    """

    exit_code = 143


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries put tracebacks and hints below it), else its type."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def unusable_as(description: str, remedy: str = "") -> Iterator[None]:
    """Turn any library failure to load ``description`` into a one-line InputDataError, ending with ``remedy``."""
    try:
        yield
    except KantaiError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, tokenizers and OS errors all mean "unusable"
        then = f"; {remedy}" if remedy else ""
        raise InputDataError(f"{description} cannot be loaded: {first_line(exc)}{then}") from None
