r"""Forms of the admin: a job's definition, its environment as lines, and "schedule for later".

The environment is edited as ``KEY=value`` lines rather than raw JSON: operators paste
``.env``-style snippets, and every mistake can be reported with the line it is on.

The lines are lossless: any string value survives being shown and sent back unchanged.

- Lines end at ``\n``, ``\r\n`` or ``\r``. Blank lines and lines whose first non-blank
  character is ``#`` are ignored; every other line is ``KEY=value``.
- Spaces around the name are ignored (``  KEY=x`` sets ``KEY``). The value is everything
  after the first ``=``, exactly as typed: ``KEY= x `` sets `` x ``, ``URL=a=b`` sets
  ``a=b``, ``KEY=`` sets the empty string, ``KEY=#1`` sets ``#1``.
- A value whose first character is ``"`` is one JSON string, optionally followed by
  spaces: ``KEY="two\nlines"``. It is how a value is shown when plain text would change
  it or hide part of it: a value with a line break, tab or other control character, a
  line or paragraph separator, leading or trailing whitespace, or a leading ``"``.
- A NUL character (``\x00``, or ``\u0000`` in a JSON string) is refused: PostgreSQL
  cannot store it.

Values of secret-looking names are shown as the mask; a mask sent back unchanged keeps the
stored secret, so opening and saving a job never needs the secret itself. A submission
whose text is the one the form showed leaves the stored environment untouched.
"""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..masking import MASK, is_secret_key
from ..models import ContainerJob
from ..states import Status
from ..validators import ENV_KEY_RE

__all__ = [
    "DEFINITION_FIELDS",
    "EDITABLE_STATUSES",
    "LOCKED_STATUSES",
    "ContainerJobForm",
    "EnvironmentField",
    "ScheduleForm",
    "format_environment",
    "parse_environment",
    "quote_value",
]

# A job's definition may change only while no container exists for its current attempt:
# once launching, the worker has read it, and a finished job is a record of what ran.
EDITABLE_STATUSES = frozenset({Status.PENDING, Status.QUEUED, Status.RETRYING, Status.FAILED})
LOCKED_STATUSES = frozenset(Status) - EDITABLE_STATUSES

DEFINITION_FIELDS = ContainerJob.DEFINITION_FIELDS

# Browsers send a textarea's lines ending in CRLF; the other characters str.splitlines()
# breaks on are left inside values, so that a value holding one is not cut in two.
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")

# Control characters, line and paragraph separators (they break or vanish in a textarea)
# and surrogates (they cannot be sent as UTF-8) are written as \u escapes in a quoted value.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})

_NUL = "\x00"


def _needs_quotes(value: str) -> bool:
    return (
        value != value.strip()
        or value.startswith('"')
        or any(unicodedata.category(char) in _ESCAPED_CATEGORIES for char in value)
    )


def quote_value(value: str) -> str:
    """``value`` as written after ``KEY=``: as it is, or as a JSON string when plain text
    would be read back differently or would hide characters."""
    if not _needs_quotes(value):
        return value
    # Keeping non-ASCII text readable, the JSON encoder escapes only C0 controls, quotes
    # and backslashes; the other characters of _ESCAPED_CATEGORIES are escaped here.
    return "".join(
        f"\\u{ord(char):04x}" if unicodedata.category(char) in _ESCAPED_CATEGORIES else char
        for char in json.dumps(value, ensure_ascii=False)
    )


def format_environment(environment: dict[str, Any], masked: bool = True) -> str:
    """``KEY=value`` lines, secret-looking values replaced by the mask when ``masked``.

    :func:`parse_environment` reads the text back to the same dict of strings (with the
    mask as the value of each masked variable).
    """
    lines = []
    for key, value in environment.items():
        shown = MASK if masked and is_secret_key(str(key)) else str(value)
        lines.append(f"{key}={quote_value(shown)}")
    return "\n".join(lines)


def _nul_error(number: int) -> ValidationError:
    return ValidationError(
        _(
            "Line %(line)s holds a NUL character (\\x00 or \\u0000), which cannot be "
            "stored; remove it."
        ),
        code="environment_nul",
        params={"line": number},
    )


def parse_environment(text: str) -> dict[str, str]:
    """Parse ``KEY=value`` lines into a dict; ValidationError lists every bad line.

    Blank lines and lines starting with ``#`` are ignored. Spaces around the name are
    ignored; the value is everything after the first ``=``, exactly as typed, so
    ``URL=a=b`` keeps ``a=b`` and ``A= 1`` keeps `` 1``. A value starting with ``"`` is
    read as one JSON string: ``A="two\\nlines"``.
    """
    result: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    errors: list[ValidationError] = []
    for number, raw in enumerate(_LINE_BREAK_RE.split(text or ""), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if _NUL in raw:
            errors.append(_nul_error(number))
            continue
        name, sep, rest = raw.partition("=")
        key = name.strip()
        if not sep:
            errors.append(
                ValidationError(
                    _("Line %(line)s: '%(text)s' has no '='; write NAME=value."),
                    code="environment_no_equals",
                    params={"line": number, "text": stripped[:80]},
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
        if not rest.startswith('"'):
            result[key] = rest
            continue
        try:
            # strict=False lets a pasted tab stand inside the quotes as itself.
            value = json.loads(rest, strict=False)
        except json.JSONDecodeError as exc:
            errors.append(
                ValidationError(
                    _(
                        "Line %(line)s: the value of '%(key)s' starts with \" but is not one "
                        "JSON string (%(error)s: column %(column)s); inside the quotes "
                        'write \\" for " and \\\\ for \\.'
                    ),
                    code="environment_bad_quoted_value",
                    params={
                        "line": number,
                        "key": key,
                        "error": exc.msg,
                        "column": len(name) + 2 + exc.pos,
                    },
                )
            )
            continue
        if _NUL in value:
            errors.append(_nul_error(number))
            continue
        if any("\ud800" <= char <= "\udfff" for char in value):
            errors.append(
                ValidationError(
                    _(
                        "Line %(line)s: the value of '%(key)s' holds a \\u escape of a lone "
                        "surrogate (\\ud800 to \\udfff), which is not a character."
                    ),
                    code="environment_surrogate",
                    params={"line": number, "key": key},
                )
            )
            continue
        result[key] = value
    if errors:
        raise ValidationError(errors)
    return result


def _same_lines(first: str, second: str) -> bool:
    return _LINE_BREAK_RE.split(first) == _LINE_BREAK_RE.split(second)


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
                "ignored. The value is everything after the first =, exactly as typed. "
                'A value starting with " is a JSON string: NAME="two\\nlines" (values '
                'with line breaks, tabs, leading or trailing spaces or a leading " are '
                "shown that way). Values of names containing PASSWORD, SECRET, TOKEN or "
                "KEY are shown as %(mask)s: leave the mask to keep the stored value."
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
        # The text the form showed, sent back as it was, is no change even where parsing
        # would not give back the stored dict (a value that is not a string): the
        # environment is then left out of the save.
        shown = self.prepare_value(initial or {})
        if isinstance(data, str) and isinstance(shown, str) and _same_lines(data, shown):
            return False
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
