"""Exceptions raised by the app."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.exceptions import ValidationError


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


class InvalidJobDefinition(ValueError):
    """A container task's canvas step (``.s()``/``.si()``) could not build its job: the
    definition its function and options give is invalid, and nothing was saved.

    The worker raises it in place of Django's ``ValidationError``, whose per-field
    structure does not survive a JSON result backend. Its one argument is a flat message
    naming each field and its problem (``docker_image: 'Bad Image' is not a valid Docker
    image reference…``), so ``AsyncResult.get()`` re-raises it readably, and the task
    lists it as expected: the worker logs it at INFO, without a traceback.
    """

    @classmethod
    def from_validation_error(cls, error: ValidationError) -> InvalidJobDefinition:
        if hasattr(error, "error_dict"):
            parts = [f"{field}: {' '.join(texts)}" for field, texts in error.message_dict.items()]
        else:
            parts = list(error.messages)
        return cls("; ".join(parts))
