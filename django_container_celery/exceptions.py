"""Exceptions raised by the app."""

from __future__ import annotations


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


class ExecutorError(Exception):
    """A container operation failed; ``original`` is the underlying exception, if any."""

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original


class ContainerJobFailed(Exception):
    """Raised by a task result's ``get()`` when the job ended failed or cancelled."""
