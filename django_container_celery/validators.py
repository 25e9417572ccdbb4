"""Field validators. Each raises ``ValidationError`` with a message a user can act on."""

from __future__ import annotations

import os
import re
import shlex
import sys
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import CharField, Field, FloatField, IntegerField, TextField
from django.utils import timezone

from .conf import app_settings

# The secret-name rule and the mask live with the rest of the masking; kept importable
# from here, where they were first defined.
from .masking import MASK, SECRET_KEY_RE, is_secret_key, mask_environment

# Docker's reference grammar: [host[:port]/]component(/component)*[:tag][@sha256:<hex>]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# A first component names a registry only when it holds a dot or a port, or is exactly
# localhost; otherwise Docker reads it as a path component, which must be lowercase.
_DOMAIN = (
    rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})+(?::[0-9]+)?"
    rf"|{_DOMAIN_PART}:[0-9]+"
    r"|localhost)"
)
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[a-f0-9]{64}"
IMAGE_REFERENCE_RE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?", re.ASCII
)
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# How far ahead a job may be scheduled by eta or countdown: ten years (3650 days). Further
# is a unit mistake (milliseconds for seconds), and beyond datetime's range it would
# overflow instead of failing validation.
MAX_SCHEDULE_SECONDS = 3650 * 24 * 3600
_NUL = "\x00"
# A job may ask for at most this many times its memory on an out-of-memory retry.
MAX_MEMORY_RETRY_FACTOR = 16.0


def validate_no_nul(value: Any) -> None:
    """Refuse text holding a NUL character, which PostgreSQL cannot store."""
    if isinstance(value, str) and _NUL in value:
        raise ValidationError(
            "NUL characters (\\x00) are not allowed.", code="null_characters_not_allowed"
        )


def validate_raw_value(field: Field[Any, Any], value: Any) -> None:
    """Refuse what Django's own field cleaning lets through or crashes on, before it runs:
    ``None`` where the column cannot hold it, a blank of the wrong kind (``[]`` for an
    object: Django skips a blank value's validators, so they run here), text that is not
    a string or holds NUL, True/False or a fraction for a whole number, an integer beyond
    a float's range."""
    if value is None:
        if not field.null:
            raise ValidationError(field.error_messages["null"], code="null")
        return
    if field.blank and value in field.empty_values:
        for check in field.validators:
            check(value)
    if isinstance(field, CharField | TextField):
        if not isinstance(value, str):
            raise ValidationError(
                "Must be text, not %(type)s.",
                code="invalid_type",
                params={"type": type(value).__name__},
            )
        validate_no_nul(value)
    elif isinstance(field, IntegerField | FloatField):
        _validate_raw_number(field, value)


def _validate_raw_number(field: Field[Any, Any], value: Any) -> None:
    if isinstance(value, bool):
        raise ValidationError(
            "Must be a number, not %(value)s.", code="invalid", params={"value": value}
        )
    whole = isinstance(field, IntegerField)
    if whole and isinstance(value, float) and not value.is_integer():
        raise ValidationError(
            "Must be a whole number, not %(value)s.", code="invalid", params={"value": value}
        )
    if not whole and isinstance(value, int) and abs(value) > sys.float_info.max:
        raise ValidationError("The number is out of range.", code="invalid")


def validate_image_reference(value: str) -> None:
    if not value or len(value) > 255 or not IMAGE_REFERENCE_RE.fullmatch(value):
        raise ValidationError(
            "'%(value)s' is not a valid Docker image reference: use lowercase path "
            "components, an optional registry prefix (a first component holding a dot or "
            "a :port, or localhost), an optional :tag of at most 128 characters and an "
            "optional @sha256:<64 hex digits> digest.",
            code="invalid_image",
            params={"value": value[:300]},
        )


def validate_command(value: str) -> None:
    try:
        shlex.split(value or "")
    except ValueError as exc:
        raise ValidationError(
            "The command cannot be split into arguments: %(error)s.",
            code="invalid_command",
            params={"error": exc},
        ) from exc


def validate_environment(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError(
            "The environment must be an object of names to string values.",
            code="invalid_environment",
        )
    for key, val in value.items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise ValidationError(
                "Environment variable name '%(key)s' is invalid: it must match "
                "[A-Za-z_][A-Za-z0-9_]*.",
                code="invalid_environment_key",
                params={"key": key},
            )
        if not isinstance(val, str):
            raise ValidationError(
                "Environment variable '%(key)s' must have a string value, not %(type)s.",
                code="invalid_environment_value",
                params={"key": key, "type": type(val).__name__},
            )
        if _NUL in val:
            raise ValidationError(
                "Environment variable '%(key)s' has a NUL character (\\x00) in its value.",
                code="null_characters_not_allowed",
                params={"key": key},
            )


def validate_memory_limit(value: int | None) -> None:
    if value is None:
        return
    maximum = app_settings.MAX_MEMORY_MB
    if not 4 <= value <= maximum:
        raise ValidationError(
            "Memory limit must be between 4 and %(max)s MiB.",
            code="invalid_memory_limit",
            params={"max": maximum},
        )


LANE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}", re.ASCII)


def validate_lane_name(value: str) -> None:
    """A lane's name: letters, digits, ``_ . : -``, starting with a letter or digit (it is
    a metrics label and a command argument)."""
    if value and not LANE_NAME.fullmatch(value):
        raise ValidationError(
            "A lane name is 1 to 100 letters, digits, '_', '.', ':' or '-', starting with a "
            "letter or digit.",
            code="invalid_lane",
        )


def validate_memory_retry_factor(value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not 1.0 < value <= MAX_MEMORY_RETRY_FACTOR:
        raise ValidationError(
            "The memory retry factor must be more than 1 and at most %(max)s.",
            code="invalid_memory_retry_factor",
            params={"max": MAX_MEMORY_RETRY_FACTOR},
        )


def validate_cpu_limit(value: float | None) -> None:
    if value is None:
        return
    maximum = app_settings.MAX_CPUS
    if not 0.01 <= value <= maximum:
        raise ValidationError(
            "CPU limit must be between 0.01 and %(max)s cores.",
            code="invalid_cpu_limit",
            params={"max": maximum},
        )


def validate_timeout(value: int | None) -> None:
    if value is None:
        return
    maximum = app_settings.MAX_TIMEOUT_SECONDS
    if not 1 <= value <= maximum:
        raise ValidationError(
            "Timeout must be between 1 and %(max)s seconds.",
            code="invalid_timeout",
            params={"max": maximum},
        )


def validate_priority(value: int) -> None:
    # A whole float (50.0) passes, as it does through the model field's own conversion.
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if not whole or isinstance(value, bool) or not 0 <= value <= 100:
        raise ValidationError(
            "Priority must be a whole number from 0 to 100.",
            code="invalid_priority",
        )


def validate_eta(value: Any) -> None:
    """An ``eta`` call option: a datetime, aware when USE_TZ is on (naive when it is off),
    at most ``MAX_SCHEDULE_SECONDS`` ahead. One in the past means now."""
    if not isinstance(value, datetime):
        raise ValidationError(
            "eta must be a datetime, not %(type)s.",
            code="invalid_eta",
            params={"type": type(value).__name__},
        )
    if timezone.is_aware(value) != bool(settings.USE_TZ):
        wanted = "an aware datetime (USE_TZ is on)" if settings.USE_TZ else "a naive datetime"
        raise ValidationError(
            "eta must be %(wanted)s, not %(value)s.",
            code="invalid_eta",
            params={"wanted": wanted, "value": value.isoformat()},
        )
    if (value - timezone.now()).total_seconds() > MAX_SCHEDULE_SECONDS:
        raise ValidationError(
            "eta %(value)s is more than 3650 days ahead.",
            code="invalid_eta",
            params={"value": value.isoformat()},
        )


def validate_countdown(value: Any) -> None:
    """A ``countdown`` call option: a finite number of seconds of at most
    ``MAX_SCHEDULE_SECONDS`` either way. Zero or less means now, as in Celery."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not -MAX_SCHEDULE_SECONDS <= value <= MAX_SCHEDULE_SECONDS:
        raise ValidationError(
            "countdown must be a finite number of seconds, %(max)s (3650 days) at most.",
            code="invalid_countdown",
            params={"max": MAX_SCHEDULE_SECONDS},
        )


def validate_exit_codes(value: Any) -> None:
    if not isinstance(value, list) or not all(
        isinstance(code, int) and not isinstance(code, bool) and 1 <= code <= 255 for code in value
    ):
        raise ValidationError(
            "Retryable exit codes must be a list of whole numbers from 1 to 255.",
            code="invalid_exit_codes",
        )


def validate_retry_strategy(value: str) -> None:
    if not value:
        return
    from .retry import strategy_names

    if value not in strategy_names():
        raise ValidationError(
            "Unknown retry strategy '%(value)s'; choose one of: %(names)s.",
            code="invalid_retry_strategy",
            params={"value": value, "names": ", ".join(sorted(strategy_names()))},
        )


def parse_bind_mount(spec: str) -> tuple[str, str, bool]:
    """Split ``host:container[:ro|rw]`` into (host path, container path, read only)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(f"'{spec}' is not of the form host_path:container_path[:ro|rw]")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ValueError(f"'{spec}' has mode '{mode}'; use ro or rw")
    if not (parts[0].startswith("/") and parts[1].startswith("/")):
        raise ValueError(f"'{spec}' must use absolute paths on both sides")
    return parts[0], parts[1], mode == "ro"


def bind_mount_allowed(host_path: str) -> bool:
    roots = app_settings.ALLOWED_BIND_MOUNTS
    # Fail closed: a lone string would be iterated as characters, and "/" allows everything.
    if not isinstance(roots, list | tuple) or not all(isinstance(root, str) for root in roots):
        return False
    resolved = os.path.realpath(host_path)
    for allowed in roots:
        root = os.path.realpath(allowed)
        if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
            return True
    return False


def validate_bind_mounts(value: Any) -> None:
    if not isinstance(value, list):
        raise ValidationError(
            "Bind mounts must be a list of 'host_path:container_path[:ro|rw]' strings.",
            code="invalid_bind_mounts",
        )
    for spec in value:
        if not isinstance(spec, str) or _NUL in spec:
            raise ValidationError(
                "Each bind mount must be a 'host_path:container_path[:ro|rw]' string "
                "without NUL characters.",
                code="invalid_bind_mounts",
            )
        try:
            host_path, _target, _ro = parse_bind_mount(spec)
        except ValueError as exc:
            raise ValidationError(str(exc), code="invalid_bind_mounts") from exc
        if not bind_mount_allowed(host_path):
            raise ValidationError(
                "Host path '%(path)s' is not in CONTAINER_CELERY['ALLOWED_BIND_MOUNTS'].",
                code="bind_mount_not_allowed",
                params={"path": host_path},
            )


__all__ = [
    "ENV_KEY_RE",
    "IMAGE_REFERENCE_RE",
    "MASK",
    "MAX_SCHEDULE_SECONDS",
    "SECRET_KEY_RE",
    "bind_mount_allowed",
    "is_secret_key",
    "mask_environment",
    "parse_bind_mount",
    "validate_bind_mounts",
    "validate_command",
    "validate_countdown",
    "validate_cpu_limit",
    "validate_environment",
    "validate_eta",
    "validate_exit_codes",
    "validate_image_reference",
    "validate_memory_limit",
    "validate_no_nul",
    "validate_priority",
    "validate_raw_value",
    "validate_retry_strategy",
    "validate_timeout",
]
