"""Exceptions raised by the app."""

from __future__ import annotations

from collections.abc import Sequence


class InvalidTransition(ValueError):
    """A status change that the transition table forbids."""

    def __init__(self, old: str, new: str, job_id: object = None, reason: str = "") -> None:
        self.old = old
        self.new = new
        self.job_id = job_id
        where = f" for job {job_id}" if job_id is not None else ""
        detail = f": {reason}" if reason else ""
        super().__init__(f"Invalid transition from '{old}' to '{new}'{where}{detail}")


class TransitionConflict(InvalidTransition):
    """The row changed under us: its status, owner or attempt is no longer what we expected.

    Raised by conditional writes that matched no row, so a worker that lost its claim
    cannot overwrite the new owner's state.
    """


class OwnedFieldError(ValueError):
    """A ``save()`` would write fields the engine owns while a worker holds the job.

    Nothing was written. ``fields`` names them; the queue manager (cancel, dequeue, retry)
    changes a held job instead.
    """

    def __init__(self, fields: Sequence[str], job_id: object, holder: str) -> None:
        self.fields = tuple(fields)
        self.job_id = job_id
        super().__init__(
            f"Cannot save {', '.join(self.fields)} of job {job_id}: {holder}, and these "
            "fields are written by the queue and its workers; change the job through the "
            "queue manager (cancel, dequeue, retry) instead"
        )


class ExecutorError(Exception):
    """A container operation failed; ``original`` is the underlying exception, if any."""

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original


class ContainerJobFailed(Exception):
    """Raised by a task result's ``get()`` when the job ended failed or cancelled.

    Its message names the job, its status and its last error, with the values of the job's
    secret environment variables masked: it travels through the result backend.
    """
