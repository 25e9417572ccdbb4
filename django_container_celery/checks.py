"""System checks of the ``CONTAINER_CELERY`` settings, run by ``manage.py check``, by every
management command that runs checks, and at Celery worker start (``worker.py``).

Settings are read lazily at use, so without these a wrong type shows up late or not at
all: ``ALLOWED_BIND_MOUNTS = "/data"`` once let every host path be mounted, because a
string iterates as its characters and ``"/"`` allows everything.

One :class:`Spec` per key of :data:`conf.DEFAULTS` (its type, its range, a check of its
content) and one :class:`Relation` per pair of settings that must agree. Ids are stable:

    E001  CONTAINER_CELERY is not a dict
    E002  an unknown key
    E003  a value of the wrong type
    E004  a value out of range
    E005  invalid content (a relative path, a bad pattern, URL, strategy or executor)
    E006  two settings that contradict each other
    W001  an allowed bind mount that allows the whole host
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.checks import CheckMessage
from django.utils.module_loading import import_string

from .conf import DEFAULTS
from .retry import RETRY_STRATEGIES, RetryStrategy

TAG = "django_container_celery"

E_NOT_A_DICT = "django_container_celery.E001"
E_UNKNOWN_KEY = "django_container_celery.E002"
E_TYPE = "django_container_celery.E003"
E_RANGE = "django_container_celery.E004"
E_CONTENT = "django_container_celery.E005"
E_RELATION = "django_container_celery.E006"
W_WHOLE_HOST = "django_container_celery.W001"

# Below this a stored log is little more than its truncation marker: a value this small
# is almost always a size meant in KiB.
MIN_LOG_MAX_BYTES = 256

_DOCKER_SCHEMES = ("unix", "tcp", "ssh", "npipe", "http", "https", "http+unix")
_DOCKER_HOST_HINT = (
    "Use a Docker URL like unix:///var/run/docker.sock, tcp://host:2376 or ssh://user@host."
)
_STRATEGY_FIELDS = tuple(field.name for field in dataclasses.fields(RetryStrategy))


@dataclasses.dataclass(frozen=True)
class Kind:
    """A type a setting must have, as a user would write it in a message."""

    description: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True is never meant as a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # NaN would pass every range test (all its comparisons are false) and then break them.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


INT = Kind("a whole number", _is_int)
NUMBER = Kind("a finite number", _is_number)
BOOL = Kind("True or False", lambda value: isinstance(value, bool))
STR = Kind("a string", lambda value: isinstance(value, str))
OPTIONAL_STR = Kind("None or a string", lambda value: value is None or isinstance(value, str))
STR_LIST = Kind(
    "a list of strings",
    lambda value: isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
)
DICT = Kind("a dict", lambda value: isinstance(value, Mapping))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a value. ``where`` follows the key (``['fast']``, ``[0]``)."""

    text: str
    hint: str
    check_id: str = E_CONTENT
    where: str = ""
    warning: bool = False


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one setting must be. ``content`` runs only on a value of the right kind."""

    kind: Kind
    at_least: float | None = None
    above: float | None = None
    why: str = ""
    content: Callable[[Any], Iterable[Problem]] | None = None

    def range_text(self) -> str:
        if self.at_least is not None:
            return f"at least {self.at_least:g}"
        if self.above is not None:
            return f"greater than {self.above:g}"
        return ""

    def in_range(self, value: float) -> bool:
        if self.at_least is not None and value < self.at_least:
            return False
        return self.above is None or value > self.above


def _not_blank(value: str | None) -> Iterator[Problem]:
    if value is not None and not value.strip():
        yield Problem("is blank", "Give a name, or None where the setting allows it.")


def _log_max_bytes(value: int) -> Iterator[Problem]:
    if 0 < value < MIN_LOG_MAX_BYTES:
        yield Problem(
            f"is {value} bytes, less than {MIN_LOG_MAX_BYTES}",
            f"It counts bytes, not KiB (the default, {DEFAULTS['LOG_MAX_BYTES']}, is 64 KiB); "
            "0 stores logs whole.",
            check_id=E_RANGE,
        )


def _bind_mount_roots(value: Sequence[str]) -> Iterator[Problem]:
    for index, path in enumerate(value):
        if not os.path.isabs(path):
            yield Problem(
                f"is {path!r}, not an absolute path",
                "Mounts are matched against resolved absolute host paths; write it from '/'.",
                where=f"[{index}]",
            )
        elif os.path.realpath(path) == "/":
            yield Problem(
                f"is {path!r}, which allows every host path, the Docker socket included",
                "List only the directories jobs need to mount.",
                check_id=W_WHOLE_HOST,
                where=f"[{index}]",
                warning=True,
            )


def _patterns(value: Sequence[str]) -> Iterator[Problem]:
    for index, pattern in enumerate(value):
        try:
            re.compile(pattern, re.IGNORECASE | re.DOTALL)
        except re.error as exc:
            yield Problem(
                f"is {pattern!r}, not a valid regular expression: {exc}",
                "Patterns use Python's re syntax; escape literal brackets and parentheses.",
                where=f"[{index}]",
            )


def _retry_strategies(value: Mapping[Any, Any]) -> Iterator[Problem]:
    fields = ", ".join(_STRATEGY_FIELDS)
    for name, entry in value.items():
        where = f"[{name!r}]"
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            yield Problem(
                "is not a usable strategy name",
                "Jobs name their strategy in retry_strategy: use a non-blank string "
                "without surrounding spaces.",
                where=where,
            )
            continue
        if isinstance(entry, RetryStrategy):
            continue
        if not isinstance(entry, Mapping):
            yield Problem(
                f"must be a dict of RetryStrategy fields, not {type(entry).__name__}",
                f"Fields: {fields}.",
                check_id=E_TYPE,
                where=where,
            )
            continue
        unknown = sorted(repr(field) for field in entry if field not in _STRATEGY_FIELDS)
        if unknown:
            yield Problem(
                f"has unknown field(s) {', '.join(unknown)}",
                f"Fields: {fields}.",
                where=where,
            )
            continue
        try:
            RetryStrategy(**entry)
        except (TypeError, ValueError) as exc:
            yield Problem(
                f"is invalid: {exc}",
                "Delays are seconds; max_delay >= base_delay >= 0, backoff_factor >= 1, "
                "jitter from 0 to 1, max_attempts a whole number >= 0.",
                where=where,
            )


def _executor(value: str | None) -> Iterator[Problem]:
    if value in (None, "", "docker", "memory"):
        return  # None and "" mean "docker", as the executor factory reads them
    hint = "Use 'docker', 'memory' or the dotted path of an Executor subclass."
    try:
        cls = import_string(value)
    except Exception as exc:  # importing runs the module: any error means it is unusable
        yield Problem(f"is {value!r}, which cannot be imported ({exc})", hint)
        return
    from .executors.base import Executor

    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        yield Problem(f"is {value!r}, which is not an Executor subclass", hint)


def _docker_host(value: str) -> Iterator[Problem]:
    scheme, separator, _rest = value.partition("://")
    if not separator or scheme not in _DOCKER_SCHEMES:
        yield Problem(f"is {value!r}, not a Docker daemon URL", _DOCKER_HOST_HINT)
        return
    import docker.errors
    from docker.utils import parse_host

    # The Docker client's own parser: what it refuses here, it would refuse at first use.
    try:
        parse_host(value)
    except docker.errors.DockerException as exc:
        yield Problem(f"is {value!r}: {exc}", _DOCKER_HOST_HINT)


_SECONDS = "A number of seconds."

SPECS: dict[str, Spec] = {
    "LEASE_SECONDS": Spec(
        NUMBER,
        at_least=2,
        why="A launch renews its lease at most once a second: a shorter lease can run out "
        "between two renewals.",
    ),
    "LAUNCH_TIMEOUT": Spec(NUMBER, above=0, why=_SECONDS),
    "FINISH_TRIES": Spec(INT, at_least=1, why="A count of tries: 1 gives up at the first."),
    "MAX_ATTEMPTS_WITHOUT_OUTCOME": Spec(
        INT, at_least=1, why="A count of attempts: 1 stops a job at the first."
    ),
    "HOST_FAILURES_BEFORE_UNHEALTHY": Spec(
        INT, at_least=1, why="A count of failed calls: 1 marks a host at the first."
    ),
    "DISPATCH_INTERVAL": Spec(NUMBER, above=0, why=_SECONDS),
    "REDISPATCH_SECONDS": Spec(NUMBER, above=0, why=_SECONDS),
    "MAX_CONCURRENT_JOBS": Spec(INT, at_least=1, why="With 0 no job would ever start."),
    "LOG_MAX_BYTES": Spec(INT, content=_log_max_bytes),
    "ALLOWED_BIND_MOUNTS": Spec(STR_LIST, content=_bind_mount_roots),
    # "" routes like None (Celery's default queue), as routing and beat read it.
    "TASK_QUEUE": Spec(OPTIONAL_STR),
    "PER_HOST_QUEUES": Spec(BOOL),
    "RETRY_STRATEGIES": Spec(DICT, content=_retry_strategies),
    "DEFAULT_RETRY_STRATEGY": Spec(STR, content=_not_blank),
    "TRANSIENT_PATTERNS": Spec(STR_LIST, content=_patterns),
    "PERMANENT_PATTERNS": Spec(STR_LIST, content=_patterns),
    "DEFAULT_JOB_MEMORY_MB": Spec(INT, at_least=4, why="No job may ask for less than 4 MiB."),
    "DEFAULT_JOB_CPUS": Spec(NUMBER, at_least=0.01, why="No job may ask for less than 0.01 cores."),
    "HOST_MEMORY_RESERVE_MB": Spec(INT, at_least=0, why="MiB kept back; 0 keeps none."),
    "HOST_CPU_RESERVE": Spec(NUMBER, at_least=0, why="Cores kept back; 0 keeps none."),
    "MAX_MEMORY_MB": Spec(INT, at_least=4, why="No job may ask for less than 4 MiB."),
    "MAX_CPUS": Spec(NUMBER, at_least=0.01, why="No job may ask for less than 0.01 cores."),
    "MAX_TIMEOUT_SECONDS": Spec(INT, at_least=1, why="No job may ask for less than 1 second."),
    "POLL_INTERVAL": Spec(NUMBER, above=0, why=_SECONDS),
    "WATCHER": Spec(BOOL),
    "RECONCILE_INTERVAL": Spec(NUMBER, above=0, why=_SECONDS),
    "SEND_TASK_EVENTS": Spec(BOOL),
    "KEEP_CONTAINERS": Spec(BOOL),
    "NETWORK_MODE": Spec(OPTIONAL_STR),
    "CLEANUP_AFTER_DAYS": Spec(INT, at_least=0, why="Days; 0 removes every finished job."),
    "EXECUTOR": Spec(OPTIONAL_STR, content=_executor),
    "DEFAULT_DOCKER_HOST": Spec(STR, content=_docker_host),
    "SHUTDOWN_TIMEOUT": Spec(NUMBER, at_least=0, why=_SECONDS),
}


@dataclasses.dataclass(frozen=True)
class Relation:
    """``holds(value of key, value of other)`` must be true. Checked only when both values
    are valid on their own, so that one mistake is not reported twice."""

    key: str
    wording: str
    other: str
    holds: Callable[[Any, Any], bool]
    why: str


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "POLL_INTERVAL",
        "less than",
        "LEASE_SECONDS",
        lambda poll, lease: poll < lease,
        "A canvas step waiting for its job looks at it every POLL_INTERVAL; where no watcher "
        "runs, that look is what finishes the job.",
    ),
    Relation(
        "RECONCILE_INTERVAL",
        "at most half of",
        "LEASE_SECONDS",
        lambda reconcile, lease: reconcile <= lease / 2,
        "Each reconcile pass renews the leases of running jobs: passes further apart let "
        "leases expire and running jobs be taken over.",
    ),
    Relation(
        "DISPATCH_INTERVAL",
        "less than",
        "REDISPATCH_SECONDS",
        lambda dispatch, redispatch: dispatch < redispatch,
        "Otherwise every dispatch finds the messages it sent last time presumed lost, "
        "and sends them again.",
    ),
    Relation(
        "DEFAULT_JOB_MEMORY_MB",
        "at most",
        "MAX_MEMORY_MB",
        lambda default, maximum: default <= maximum,
        "A job without a memory_limit would count for more than any job may ask for.",
    ),
    Relation(
        "DEFAULT_JOB_CPUS",
        "at most",
        "MAX_CPUS",
        lambda default, maximum: default <= maximum,
        "A job without a cpu_limit would count for more than any job may ask for.",
    ),
)


def _message(msg: str, hint: str, check_id: str, warning: bool = False) -> CheckMessage:
    cls = checks.Warning if warning else checks.Error
    return cls(msg, hint=hint, id=check_id)


def _name(key: Any) -> str:
    return f"CONTAINER_CELERY[{key!r}]"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_value(key: str, value: Any) -> list[CheckMessage]:
    spec = SPECS[key]
    default = DEFAULTS[key]
    range_text = spec.range_text()
    if not spec.kind.accepts(value):
        wanted = spec.kind.description + (f", {range_text}" if range_text else "")
        if spec.kind is STR_LIST and isinstance(value, str):
            hint = f"A lone string is not a list: write [{value!r}]."
        else:
            hint = f"Use {wanted} (the default is {default!r})."
        got = f"{type(value).__name__} ({_short(value)})"
        return [_message(f"{_name(key)} must be {spec.kind.description}, not {got}.", hint, E_TYPE)]
    if range_text and not spec.in_range(value):
        hint = f"{spec.why} The default is {default!r}.".lstrip()
        msg = f"{_name(key)} must be {range_text}, not {_short(value)}."
        return [_message(msg, hint, E_RANGE)]
    problems = spec.content(value) if spec.content is not None else ()
    return [
        _message(f"{_name(key)}{p.where} {p.text.rstrip('.')}.", p.hint, p.check_id, p.warning)
        for p in problems
    ]


def _check_relations(values: Mapping[str, Any], merged: Mapping[str, Any]) -> list[CheckMessage]:
    """``values``: the settings valid on their own; ``merged``: all, valid or not."""
    messages: list[CheckMessage] = []
    for rel in RELATIONS:
        if rel.key in values and rel.other in values:
            mine, theirs = values[rel.key], values[rel.other]
            if not rel.holds(mine, theirs):
                msg = (
                    f"{_name(rel.key)} ({_short(mine)}) must be {rel.wording} "
                    f"{_name(rel.other)} ({_short(theirs)})."
                )
                messages.append(_message(msg, rel.why, E_RELATION))
    configured = merged["RETRY_STRATEGIES"]
    # The names count even when an entry is invalid: that entry has its own error.
    if "DEFAULT_RETRY_STRATEGY" in values and isinstance(configured, Mapping):
        name = values["DEFAULT_RETRY_STRATEGY"].strip()
        known = set(RETRY_STRATEGIES) | set(configured)
        if name not in known:
            msg = f"{_name('DEFAULT_RETRY_STRATEGY')} is {name!r}, which is not a strategy."
            names = ", ".join(sorted(map(str, known)))
            hint = f"Known: {names} (built-ins and {_name('RETRY_STRATEGIES')})."
            messages.append(_message(msg, hint, E_RELATION))
    return messages


def check_container_celery_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Every problem with ``settings.CONTAINER_CELERY``; never raises."""
    # Read directly rather than through conf.app_settings, which raises at the first
    # problem where a check must report them all.
    user = getattr(settings, "CONTAINER_CELERY", None)
    if user is None:
        user = {}
    if not isinstance(user, dict):
        return [
            checks.Error(
                f"CONTAINER_CELERY must be a dict, not {type(user).__name__}.",
                hint="Write CONTAINER_CELERY = {'KEY': value, ...}, or leave it out.",
                id=E_NOT_A_DICT,
            )
        ]
    messages: list[CheckMessage] = []
    known = sorted(DEFAULTS)
    for key in user:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"Known: {', '.join(known)}."
            messages.append(
                checks.Error(
                    f"{_name(key)} is not a setting of this app.", hint=hint, id=E_UNKNOWN_KEY
                )
            )
    merged = {key: user.get(key, default) for key, default in DEFAULTS.items()}
    valid: dict[str, Any] = {}
    for key, value in merged.items():
        found = _check_value(key, value)
        messages.extend(found)
        if not any(m.is_serious() for m in found):
            valid[key] = value
    messages.extend(_check_relations(valid, merged))
    return messages


checks.register(check_container_celery_settings, TAG)
