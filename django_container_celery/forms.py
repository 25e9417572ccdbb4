"""Forms of the admin: a job's definition, its environment as lines, and "schedule for later".

The environment is edited as ``KEY=value`` lines rather than raw JSON: operators paste
``.env``-style snippets, and every mistake can be reported with the line it is on.
Values of secret-looking names are shown as the mask; a mask sent back unchanged keeps the
stored secret, so opening and saving a job never needs the secret itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .masking import MASK, is_secret_key
from .models import ContainerJob
from .states import Status
from .validators import ENV_KEY_RE

__all__ = [
    "DEFINITION_FIELDS",
    "EDITABLE_STATUSES",
    "LOCKED_STATUSES",
    "ContainerJobForm",
    "EnvironmentField",
    "ScheduleForm",
    "format_environment",
    "parse_environment",
]

# A job's definition may change only while no container exists for its current attempt:
# once launching, the worker has read it, and a finished job is a record of what ran.
EDITABLE_STATUSES = frozenset({Status.PENDING, Status.QUEUED, Status.RETRYING, Status.FAILED})
LOCKED_STATUSES = frozenset(Status) - EDITABLE_STATUSES

DEFINITION_FIELDS = ContainerJob.DEFINITION_FIELDS


def format_environment(environment: dict[str, Any], masked: bool = True) -> str:
    """``KEY=value`` lines, secret-looking values replaced by the mask when ``masked``."""
    lines = []
    for key, value in environment.items():
        shown = MASK if masked and is_secret_key(str(key)) else value
        lines.append(f"{key}={shown}")
    return "\n".join(lines)


def parse_environment(text: str) -> dict[str, str]:
    """Parse ``KEY=value`` lines into a dict; ValidationError lists every bad line.

    Blank lines and lines starting with ``#`` are ignored. The value is everything after
    the first ``=``, with surrounding spaces removed, so ``URL=a=b`` keeps ``a=b``.
    """
    result: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    errors: list[ValidationError] = []
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            errors.append(
                ValidationError(
                    _("Line %(line)s: '%(text)s' has no '='; write NAME=value."),
                    code="environment_no_equals",
                    params={"line": number, "text": line[:80]},
                )
            )
            continue
        if not ENV_KEY_RE.fullmatch(key):
            errors.append(
                ValidationError(
                    _(
                        "Line %(line)s: '%(key)s' is not a valid variable name; use letters, "
                        "digits and _, not starting with a digit."
                    ),
                    code="environment_bad_key",
                    params={"line": number, "key": key[:80]},
                )
            )
            continue
        if key in first_seen:
            errors.append(
                ValidationError(
                    _("Line %(line)s: '%(key)s' is already set on line %(first)s."),
                    code="environment_duplicate_key",
                    params={"line": number, "key": key, "first": first_seen[key]},
                )
            )
            continue
        first_seen[key] = number
        result[key] = value.strip()
    if errors:
        raise ValidationError(errors)
    return result


class EnvironmentField(forms.Field):
    """A textarea of ``KEY=value`` lines that cleans to a dict of strings.

    ``stored`` is the environment saved in the database; a secret-looking variable sent
    back with the mask as its value takes its stored value.
    """

    widget = forms.Textarea(attrs={"rows": 6, "cols": 80, "class": "vLargeTextField dcc-env"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault(
            "help_text",
            _(
                "One NAME=value per line; blank lines and lines starting with # are "
                "ignored. Values of names containing PASSWORD, SECRET, TOKEN or KEY are "
                "shown as %(mask)s: leave the mask to keep the stored value."
            )
            % {"mask": MASK},
        )
        super().__init__(*args, **kwargs)
        self.stored: dict[str, Any] = {}

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return format_environment(value, masked=True)
        return value

    def to_python(self, value: Any) -> dict[str, str]:
        if isinstance(value, dict):
            return value
        parsed = parse_environment(str(value or ""))
        return self.restore_masked(parsed)

    def restore_masked(self, parsed: dict[str, str]) -> dict[str, str]:
        errors = []
        result = dict(parsed)
        for key, value in parsed.items():
            if value != MASK:
                continue
            if key in self.stored:
                result[key] = self.stored[key]
            else:
                errors.append(
                    ValidationError(
                        _(
                            "'%(key)s' has the mask %(mask)s as its value but no stored value "
                            "to keep; type the real value."
                        ),
                        code="environment_mask_without_value",
                        params={"key": key, "mask": MASK},
                    )
                )
        if errors:
            raise ValidationError(errors)
        return result

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            new = self.to_python(data)
        except ValidationError:
            return True
        return new != (initial or {})


class ContainerJobForm(forms.ModelForm):
    """The definition of a job; queue and execution state are never part of it."""

    environment = EnvironmentField(label=_("Environment"))

    class Meta:
        model = ContainerJob
        fields = DEFINITION_FIELDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields.get("environment")
        if isinstance(field, EnvironmentField) and not self.instance._state.adding:
            field.stored = dict(self.instance.environment or {})


_INPUT_FORMATS = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"]


class ScheduleForm(forms.Form):
    """When the selected jobs should become due."""

    scheduled_for = forms.DateTimeField(
        label=_("Run at"),
        input_formats=_INPUT_FORMATS,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["scheduled_for"].help_text = _(
            "In the server's time zone (%(zone)s). The jobs are queued now and start once "
            "this time has come."
        ) % {"zone": timezone.get_current_timezone_name()}

    @staticmethod
    def default_time() -> datetime:
        """An hour from now, on the minute: a starting point an operator adjusts."""
        later = timezone.localtime() + timedelta(hours=1)
        return later.replace(second=0, microsecond=0)

    def clean_scheduled_for(self) -> datetime:
        value: datetime = self.cleaned_data["scheduled_for"]
        if value <= timezone.now():
            raise ValidationError(
                _("Choose a time in the future; to run the jobs now, use Queue."),
                code="schedule_in_past",
            )
        return value
