"""The errors a user can cause, each with the exit code a scheduler can act on.

A Kubernetes ``podFailurePolicy`` fails a Job at once on the codes of errors that a retry cannot fix
(a bad job file, bad data) and retries the rest (an unreachable source, a preempted pod).
"""


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
