"""The retry decision (:func:`get_retry_decision`), with the error classification and the
back-off strategies it uses.

A failure is TRANSIENT (worth retrying: the daemon or registry is briefly unreachable),
PERMANENT (retrying cannot help: a missing image, a bad configuration) or UNKNOWN (retried
like TRANSIENT, so an unforeseen error never loses a job that a retry would have saved).

A kill for memory is never transient: the same container with the same limit runs out
again. A container that ran and was killed is an ``End.OUT_OF_MEMORY`` ending, retried (with
more memory) only as :func:`get_retry_decision` says; a failed launch that mentions running
out of memory (runc's "container init was OOM-killed (memory limit too low?)") is PERMANENT.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import random
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import docker.errors
import requests.exceptions
import urllib3.exceptions
from django.core.exceptions import ImproperlyConfigured

from .conf import app_settings
from .exceptions import ExecutorError
from .outcomes import End, Ending

if TYPE_CHECKING:
    from .models import ContainerJob

__all__ = [
    "RETRY_STRATEGIES",
    "ErrorClassifier",
    "ErrorType",
    "RetryDecision",
    "RetryStrategy",
    "get_retry_decision",
    "get_strategy",
    "is_retryable_exit_code",
    "strategy_names",
]


class ErrorType(enum.StrEnum):
    # StrEnum (a str and an Enum) so str() and f-strings give the bare value for logs and rows.
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


_BUILTIN_PERMANENT_PATTERNS: tuple[str, ...] = (
    r"image not found",
    r"no such image",
    r"pull access denied",
    r"repository does not exist",
    r"manifest unknown",
    r"manifest for \S+ not found",
    r"invalid reference",
    r"invalid (?:container |host |mount )?config(?:uration)?",
    r"permission denied",
    r"command not found",
    r"executable file not found",
    r"exec format error",
    r"not in ALLOWED_BIND_MOUNTS",
    # Killed for memory: the same limit runs out again (an API error's 5xx status would
    # otherwise call it transient).
    r"OOM[- ]?kill",
    r"out of memory",
    r"memory limit too low",
)

# An API error means the daemon answered, so these OCI runtime messages describe the job's
# own image or command (a missing entrypoint, a bad mount) rather than the connection.
_API_PERMANENT_PATTERNS: tuple[str, ...] = (
    *_BUILTIN_PERMANENT_PATTERNS,
    r"no such file or directory",
    r"not a directory",
    r"invalid argument",
)

# Only a missing Docker socket (or Windows named pipe) is transient: the daemon may be
# restarting. Any other missing file is the job's own problem.
_DOCKER_SOCKET = r"docker\.sock|docker_engine"

_BUILTIN_TRANSIENT_PATTERNS: tuple[str, ...] = (
    r"connection (?:refused|reset|aborted)",
    r"timed out",
    r"timeout",
    r"temporar(?:il)?y unavailable",
    r"temporary failure in name resolution",
    r"cannot connect to the docker daemon",
    r"error while fetching server api version",
    rf"no such file or directory.*(?:{_DOCKER_SOCKET})",
    rf"(?:{_DOCKER_SOCKET}).*no such file or directory",
    r"too many requests",
    r"service unavailable",
    r"bad gateway",
    r"i/o timeout",
    r"broken pipe",
    r"network is unreachable",
    r"server error",
)

_FLAGS = re.IGNORECASE | re.DOTALL


def _compile_builtin(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(pattern, _FLAGS) for pattern in patterns)


_BUILTIN_PERMANENT = _compile_builtin(_BUILTIN_PERMANENT_PATTERNS)
_API_PERMANENT = _compile_builtin(_API_PERMANENT_PATTERNS)
_BUILTIN_TRANSIENT = _compile_builtin(_BUILTIN_TRANSIENT_PATTERNS)
_DOCKER_SOCKET_RE = re.compile(_DOCKER_SOCKET, _FLAGS)
_API_VERSION_RE = re.compile(r"error while fetching server api version", _FLAGS)


@functools.lru_cache(maxsize=16)
def _compile_user(setting: str, patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, _FLAGS))
        except (re.error, TypeError) as exc:
            raise ImproperlyConfigured(
                f"CONTAINER_CELERY['{setting}'] has an invalid pattern {pattern!r}: {exc}"
            ) from exc
    return tuple(compiled)


def _user_patterns(setting: str) -> tuple[re.Pattern[str], ...]:
    value = getattr(app_settings, setting) or ()
    # A lone string would otherwise be split into one pattern per character.
    patterns = (value,) if isinstance(value, str) else tuple(value)
    return _compile_user(setting, patterns)


def _matches(patterns: Iterable[re.Pattern[str]], messages: Iterable[str]) -> bool:
    return any(pattern.search(message) for message in messages for pattern in patterns)


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.ProtocolError,
    ConnectionError,
    # Also socket.timeout, an alias of TimeoutError since Python 3.10.
    TimeoutError,
)

_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    docker.errors.ImageNotFound,
    docker.errors.InvalidArgument,
    docker.errors.InvalidRepository,
)

# Bound the walk so a pathological or cyclic chain cannot stall a worker.
_MAX_CHAIN = 32


def _chain(error: BaseException) -> list[BaseException]:
    """The exception and everything it wraps, outermost first."""
    found: list[BaseException] = []
    seen: set[int] = set()
    stack = [error]
    while stack and len(found) < _MAX_CHAIN:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        inner = [
            getattr(current, "original", None) if isinstance(current, ExecutorError) else None,
            current.__cause__,
        ]
        # Reversed so that ``original`` is visited first when both are set.
        stack.extend(exc for exc in reversed(inner) if isinstance(exc, BaseException))
    return found


def _message(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:
        # A broken __str__ must not turn a classifiable failure into a crash.
        text = ""
    if isinstance(error, OSError):
        names = [name for name in (error.filename, error.filename2) if name]
        text = " ".join([text, *map(str, names)])
    return text or type(error).__name__


def _classify_type(error: BaseException) -> ErrorType | None:
    if isinstance(error, _PERMANENT_TYPES):
        return ErrorType.PERMANENT
    if isinstance(error, docker.errors.APIError):
        return _classify_api_error(error)
    if isinstance(error, _TRANSIENT_TYPES):
        return ErrorType.TRANSIENT
    if isinstance(error, FileNotFoundError):
        return ErrorType.TRANSIENT if _DOCKER_SOCKET_RE.search(_message(error)) else None
    if isinstance(error, docker.errors.DockerException) and _API_VERSION_RE.search(_message(error)):
        return ErrorType.TRANSIENT
    return None


def _classify_api_error(error: docker.errors.APIError) -> ErrorType | None:
    messages = [_message(error), str(error.explanation or "")]
    if _matches(_API_PERMANENT, messages):
        return ErrorType.PERMANENT
    status = error.status_code
    if not isinstance(status, int):
        return None
    if status in (408, 429) or 500 <= status < 600:
        return ErrorType.TRANSIENT
    if 400 <= status < 500:
        return ErrorType.PERMANENT
    return None


class ErrorClassifier:
    """Decides whether a failed launch is worth retrying.

    Order: user PERMANENT_PATTERNS, user TRANSIENT_PATTERNS (so settings can override any
    built-in rule), exception types from the innermost wrapped exception outwards, then
    built-in permanent and finally built-in transient message patterns.
    """

    @classmethod
    def classify_error(cls, error: BaseException | str) -> ErrorType:
        if isinstance(error, BaseException):
            chain = _chain(error)
            messages = [_message(exc) for exc in chain]
        else:
            chain = []
            messages = [str(error)]

        if _matches(_user_patterns("PERMANENT_PATTERNS"), messages):
            return ErrorType.PERMANENT
        if _matches(_user_patterns("TRANSIENT_PATTERNS"), messages):
            return ErrorType.TRANSIENT
        for exc in reversed(chain):
            by_type = _classify_type(exc)
            if by_type is not None:
                return by_type
        if _matches(_BUILTIN_PERMANENT, messages):
            return ErrorType.PERMANENT
        if _matches(_BUILTIN_TRANSIENT, messages):
            return ErrorType.TRANSIENT
        return ErrorType.UNKNOWN


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RetryStrategy:
    """Exponential back-off: the n-th retry waits ``base_delay * backoff_factor ** (n - 1)``
    seconds, capped at ``max_delay``, shortened by up to ``jitter`` (a fraction) at random
    so that jobs failing together do not all retry at the same instant."""

    max_attempts: int = 3
    base_delay: float = 5.0
    max_delay: float = 300.0
    backoff_factor: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool):
            raise ValueError(f"max_attempts must be a whole number, not {self.max_attempts!r}")
        if self.max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0, not {self.max_attempts}")
        for name in ("base_delay", "max_delay", "backoff_factor", "jitter"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
        if self.base_delay < 0:
            raise ValueError(f"base_delay must be >= 0, not {self.base_delay}")
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay must be >= base_delay ({self.base_delay}), not {self.max_delay}"
            )
        if self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be >= 1, not {self.backoff_factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter}")

    def should_retry(self, attempt_count: int, error_type: ErrorType) -> bool:
        if error_type == ErrorType.PERMANENT:
            return False
        return attempt_count < self.max_attempts

    def get_retry_delay(self, attempt_count: int, rng: random.Random | None = None) -> float:
        delay = self._capped_delay(max(1, attempt_count))
        if self.jitter > 0 and delay > 0:
            draw = rng.uniform if rng is not None else random.uniform
            # uniform() may round a hair past either end; clamp so callers can rely on it.
            low = delay * (1 - self.jitter)
            delay = min(delay, max(low, draw(low, delay)))
        return float(delay)

    def _capped_delay(self, retry_number: int) -> float:
        base = float(self.base_delay)
        ceiling = float(self.max_delay)
        factor = float(self.backoff_factor)
        if base <= 0:
            return 0.0
        exponent = retry_number - 1
        if factor <= 1:
            exponent = 0
        else:
            # Beyond this exponent the cap applies anyway; stopping here keeps ``factor **
            # exponent`` finite however many attempts a job has made.
            needed = math.ceil((math.log(ceiling) - math.log(base)) / math.log(factor)) + 1
            exponent = min(exponent, max(needed, 0))
        try:
            delay = base * factor**exponent
        except OverflowError:
            # factor ** exponent alone can exceed the float range while the product does not
            # (a tiny base under a large ceiling); thirds of the exponent each stay in range.
            third = exponent // 3
            delay = base
            for part in (third, third, exponent - 2 * third):
                delay *= factor**part
        return min(ceiling, delay)


# Built-in strategies (delays in seconds; retry n waits min(max, base * factor ** (n - 1))):
#
#   name           attempts  base   max     factor  jitter  waits, no jitter
#   default        3         5      300     2.0     0.1     5, 10, 20
#   aggressive     8         1      30      1.5     0.2     1, 1.5, 2.25, 3.4, ... 17.1
#   conservative   2         60     1800    3.0     0.1     60, 180
#   high_priority  5         0.5    10      2.0     0.1     0.5, 1, 2, 4, 8
RETRY_STRATEGIES: dict[str, RetryStrategy] = {
    "default": RetryStrategy(
        max_attempts=3, base_delay=5.0, max_delay=300.0, backoff_factor=2.0, jitter=0.1
    ),
    "aggressive": RetryStrategy(
        max_attempts=8, base_delay=1.0, max_delay=30.0, backoff_factor=1.5, jitter=0.2
    ),
    "conservative": RetryStrategy(
        max_attempts=2, base_delay=60.0, max_delay=1800.0, backoff_factor=3.0, jitter=0.1
    ),
    "high_priority": RetryStrategy(
        max_attempts=5, base_delay=0.5, max_delay=10.0, backoff_factor=2.0, jitter=0.1
    ),
}


def _configured_strategies() -> Mapping[str, Any]:
    value = app_settings.RETRY_STRATEGIES or {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured("CONTAINER_CELERY['RETRY_STRATEGIES'] must be a dict.")
    return value


def _build(name: str, spec: Any) -> RetryStrategy:
    if isinstance(spec, RetryStrategy):
        return spec
    if not isinstance(spec, Mapping):
        raise ImproperlyConfigured(
            f"CONTAINER_CELERY['RETRY_STRATEGIES']['{name}'] must be a dict of "
            f"RetryStrategy arguments, not {type(spec).__name__}."
        )
    try:
        return RetryStrategy(**spec)
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"CONTAINER_CELERY['RETRY_STRATEGIES']['{name}'] is invalid: {exc}"
        ) from exc


def strategy_names() -> frozenset[str]:
    return frozenset(RETRY_STRATEGIES) | frozenset(_configured_strategies())


def get_strategy(name: str | None) -> RetryStrategy:
    """The named strategy; a blank name means ``DEFAULT_RETRY_STRATEGY``.

    A settings entry with a built-in name replaces that built-in entirely (fields it leaves
    out take the RetryStrategy defaults, not the built-in's values).
    """
    if name is None or not name.strip():
        name = (app_settings.DEFAULT_RETRY_STRATEGY or "default").strip()
    else:
        name = name.strip()
    configured = _configured_strategies()
    if name in configured:
        return _build(name, configured[name])
    if name in RETRY_STRATEGIES:
        return RETRY_STRATEGIES[name]
    known = ", ".join(sorted(strategy_names()))
    raise KeyError(f"Unknown retry strategy '{name}'; known strategies: {known}")


def is_retryable_exit_code(exit_code: int | None, retry_exit_codes: list[int]) -> bool:
    # Exit code 0 is success and None means the container never reported one (killed,
    # vanished): neither is the job asking to be retried.
    if exit_code is None or exit_code == 0:
        return False
    return exit_code in (retry_exit_codes or ())


@dataclasses.dataclass(frozen=True)
class RetryDecision:
    """Whether the job gets another attempt, after how long, and why (for ``last_error``)."""

    retry: bool
    delay: float = 0.0
    reason: str = ""
    # The job is stopped for a reason an operator should look at (``needs_attention``).
    needs_attention: bool = False
    # Fields the retry changes on the job (its next attempt's ``memory_limit``), written
    # in the same conditional transition that schedules the retry.
    changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def get_retry_decision(job: ContainerJob, ending: Ending) -> RetryDecision:
    """The one place that decides whether an ended attempt is retried.

    Retried: a vanished container; an exit code listed in the job's ``retry_exit_codes``;
    a launch failure its classifier does not call permanent; a container killed for memory
    when the job has a ``memory_retry_factor`` (with more memory: the decision's
    ``changes``) or lists its exit code in ``retry_exit_codes``. Never retried: success, a
    timeout, a cancel, a job given up as unfinishable, a definition the launcher refused.
    The job's ``max_retries`` bounds them all; its strategy sets the delay. Attempts that
    end without an outcome are bounded as well by ``MAX_ATTEMPTS_WITHOUT_OUTCOME``
    (``job.attempts_without_outcome`` counts them, this one included): a container that
    keeps vanishing is stopped, marked as needing attention, not retried for ever.
    """
    if ending.without_outcome:
        stopped = _stopped_without_outcome(job, ending)
        if stopped is not None:
            return stopped
    if ending.kind is End.VANISHED:
        transient, why = True, ""
    elif ending.kind is End.EXITED:
        transient = is_retryable_exit_code(ending.exit_code, job.retry_exit_codes or [])
        why = "listed in retry_exit_codes" if transient else ""
    elif ending.kind is End.LAUNCH_FAILED:
        kind = launch_error_type(ending)
        transient, why = kind is not ErrorType.PERMANENT, ""
    elif ending.kind is End.OUT_OF_MEMORY:
        return _out_of_memory(job, ending)
    else:
        return RetryDecision(False)
    if not transient:
        return RetryDecision(False)
    return within_budget(job, why)


def _out_of_memory(job: ContainerJob, ending: Ending) -> RetryDecision:
    """A container killed for memory: retried with ``memory_limit`` times the job's
    ``memory_retry_factor`` (rounded up, at most ``MAX_MEMORY_MB``), or, without a factor,
    with the same memory only if its exit code is listed in ``retry_exit_codes``."""
    limit, factor = job.memory_limit, job.memory_retry_factor
    if factor is None or limit is None:
        if is_retryable_exit_code(ending.exit_code, job.retry_exit_codes or []):
            return within_budget(job, "listed in retry_exit_codes; same memory")
        if factor is not None:
            return RetryDecision(False, reason="memory_retry_factor needs a memory_limit to raise")
        return RetryDecision(False)
    budget = within_budget(job)
    if not budget.retry:
        return budget
    maximum = int(app_settings.MAX_MEMORY_MB)
    # Rounded first so that a product like 100 * 1.1 (110.00000000000001) is not taken up.
    raised = min(math.ceil(round(limit * factor, 6)), maximum)
    if raised <= limit:
        return RetryDecision(
            False,
            reason=f"not retried with more memory: MAX_MEMORY_MB caps it at {maximum} MiB",
        )
    # Imported here: placement imports the models, which this module otherwise needs
    # only for type checking.
    from .placement import Need, capacity_rooms, too_big

    field, why = too_big(Need.of(raised, job.cpu_limit), job.docker_host_id, capacity_rooms())
    if field:
        return RetryDecision(False, reason=f"not retried with {raised} MiB: the job {why}")
    return dataclasses.replace(
        budget, reason=f"retried with {raised} MiB", changes={"memory_limit": raised}
    )


def _stopped_without_outcome(job: ContainerJob, ending: Ending) -> RetryDecision | None:
    if ending.kind is End.UNFINISHABLE:
        return RetryDecision(False, reason="needs attention", needs_attention=True)
    limit = int(app_settings.MAX_ATTEMPTS_WITHOUT_OUTCOME)
    if job.attempts_without_outcome < limit:
        return None
    return RetryDecision(
        False,
        reason=(
            f"stopped: {job.attempts_without_outcome} attempts ended without an outcome "
            f"(MAX_ATTEMPTS_WITHOUT_OUTCOME={limit}); needs attention"
        ),
        needs_attention=True,
    )


def within_budget(job: ContainerJob, why: str = "") -> RetryDecision:
    """A retry if the job's ``max_retries`` allows one, after its strategy's back-off."""
    if job.retry_count >= job.max_retries:
        return RetryDecision(False, reason=f"no retries left (max_retries={job.max_retries})")
    delay = get_strategy(job.retry_strategy).get_retry_delay(job.retry_count + 1)
    return RetryDecision(True, delay, why)


def launch_error_type(ending: Ending) -> ErrorType:
    """How a failed launch is classified: a refused definition is permanent."""
    if ending.refused:
        return ErrorType.PERMANENT
    return ErrorClassifier.classify_error(ending.exception or ending.error)
