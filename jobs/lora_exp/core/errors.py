"""Error classes and the process exit codes they map to.

Kubernetes reads these codes: the chart's podFailurePolicy fails the Job at once on USER_ERROR (a retry
cannot fix a bad spec), while INTERNAL errors are retried and a preempted pod is not counted at all.
"""

from __future__ import annotations

OK = 0
INTERNAL = 1  # a bug or an infrastructure fault: worth a retry
USER_ERROR = 2  # bad spec, data or arguments: fix the input, retrying will not help
SANITY_FAILED = 3  # `lora-exp sanity`: a check failed (retrying will not help either)
TRACKER_UNAVAILABLE = 75  # EX_TEMPFAIL: the MLflow server did not answer; results are on disk, a retry uploads
PREEMPTED = 143  # SIGTERM (128 + 15): checkpoint saved, the next attempt resumes


class UserError(Exception):
    """The user's input is wrong; the message names the field, file or row."""

    exit_code = USER_ERROR


class SpecError(UserError):
    """The experiment spec is invalid."""


class DataError(UserError):
    """A data file or data set does not fit the task."""


class Preempted(BaseException):
    """The job received SIGTERM: it stopped (after saving a checkpoint when it was training).

    A BaseException, like KeyboardInterrupt: the signal handler raises it wherever the main thread is, and a
    library's ``except Exception`` (a retry loop, an error wrapper) must not swallow it."""

    exit_code = PREEMPTED


class TrackerUnavailable(Exception):
    """The tracking server could not be reached (at start, or to finish the uploads at the end). Whatever the
    run produced is on disk; the next attempt uploads it (or starts, once the server answers)."""

    exit_code = TRACKER_UNAVAILABLE
