"""Secret environment values, hidden in everything the app shows or sends about a job.

A variable is secret when its name looks secret (:func:`is_secret_key`). Wherever a job's
text leaves the app (the admin, the Celery result and task events, the app's own log
lines, :class:`~django_container_celery.exceptions.ContainerJobFailed`) the values of its
secret variables are replaced by :data:`MASK`. The row itself keeps them as they are:
the container needs them, and the admin masks what it displays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SECRET_KEY_RE = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
MASK = "********"
# Shorter secret values are left in text: masking every "1" or "on" would ruin it.
MIN_MASKED_LENGTH = 4
# How deep a chain of causes is copied for a log record; real chains are a few links.
_MAX_CAUSES = 10


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY_RE.search(key))


def mask_environment(environment: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``environment`` with the values of secret-looking names masked."""
    return {k: (MASK if is_secret_key(k) else v) for k, v in environment.items()}


def secret_values(environment: Mapping[str, Any] | None) -> list[str]:
    """The values to hide, longest first so that a secret inside another is not left
    half visible."""
    values = {
        str(value)
        for key, value in (environment or {}).items()
        if is_secret_key(str(key)) and len(str(value)) >= MIN_MASKED_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def mask_text(text: str, environment: Mapping[str, Any] | None) -> str:
    """``text`` with every occurrence of a secret value of ``environment`` masked."""
    return _replace(text, secret_values(environment))


def mask_data(value: Any, environment: Mapping[str, Any] | None) -> Any:
    """A copy of a result or payload (dicts, lists, strings) with the secrets masked.

    Strings are masked as text; a dict entry under a secret-looking name (an environment
    carried in the payload) is masked whole, whatever its length.
    """
    return _mask_data(value, secret_values(environment))


def _mask_data(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return _replace(value, secrets)
    if isinstance(value, Mapping):
        return {
            key: (
                MASK
                if isinstance(key, str) and is_secret_key(key) and isinstance(item, str)
                else _mask_data(item, secrets)
            )
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_mask_data(item, secrets) for item in value)
    return value


def _replace(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class MaskedError(Exception):
    """Stands in, in a log record, for an exception whose message quoted a secret.

    Its message is the original's type and masked message; it keeps the original's
    traceback, so the logged frames are the same.
    """


def masked_exception(exc: BaseException, environment: Mapping[str, Any] | None) -> BaseException:
    """What to pass as ``exc_info`` when logging ``exc`` for a job with this environment.

    ``exc`` itself when the job has no secret; else a :class:`MaskedError` copy of it and
    of its causes, with the secrets masked.
    """
    secrets = secret_values(environment)
    if not secrets:
        return exc
    return _masked_copy(exc, secrets, _MAX_CAUSES)


def _masked_copy(exc: BaseException, secrets: list[str], depth: int) -> BaseException:
    kind = type(exc)
    copy = MaskedError(_replace(f"{kind.__module__}.{kind.__qualname__}: {exc}", secrets))
    copy = copy.with_traceback(exc.__traceback__)
    copy.__suppress_context__ = exc.__suppress_context__
    if depth > 0 and exc.__cause__ is not None:
        copy.__cause__ = _masked_copy(exc.__cause__, secrets, depth - 1)
    if depth > 0 and exc.__context__ is not None and not exc.__suppress_context__:
        copy.__context__ = _masked_copy(exc.__context__, secrets, depth - 1)
    return copy


__all__ = [
    "MASK",
    "MIN_MASKED_LENGTH",
    "SECRET_KEY_RE",
    "MaskedError",
    "is_secret_key",
    "mask_data",
    "mask_environment",
    "mask_text",
    "masked_exception",
    "secret_values",
]
