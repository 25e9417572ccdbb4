"""Error classification and back-off: pure functions, no database or Docker daemon."""

from __future__ import annotations

import itertools
import math
import random
import socket

import docker.errors
import pytest
import requests
import requests.exceptions
import urllib3
import urllib3.exceptions
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from hypothesis import given
from hypothesis import strategies as st

from django_container_celery import retry
from django_container_celery.exceptions import ExecutorError
from django_container_celery.retry import (
    RETRY_STRATEGIES,
    ErrorClassifier,
    ErrorType,
    RetryStrategy,
    get_strategy,
    is_retryable_exit_code,
    strategy_names,
)

T = ErrorType.TRANSIENT
P = ErrorType.PERMANENT
U = ErrorType.UNKNOWN

OCI_NOT_FOUND = (
    "failed to create task for container: failed to create shim task: OCI runtime create "
    'failed: runc create failed: unable to start container process: exec: "nope": '
    "executable file not found in $PATH: unknown"
)


POOL = urllib3.HTTPConnectionPool("localhost")


def classify(error: BaseException | str) -> ErrorType:
    return ErrorClassifier.classify_error(error)


def response(status: int) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.reason = "Reason"
    resp.url = "http+docker://localhost/v1.47/containers/create"
    return resp


def api_error(
    status: int | None,
    explanation: str = "something happened",
    cls: type[docker.errors.APIError] = docker.errors.APIError,
) -> docker.errors.APIError:
    resp = response(status) if status is not None else None
    return cls("request failed", response=resp, explanation=explanation)


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as caught:
        return caught


# --- exception types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(
            api_error(404, "No such image: foo:1", docker.errors.ImageNotFound), P, id="image"
        ),
        # A "timeout" explanation must not outweigh the type.
        pytest.param(api_error(404, "timeout", docker.errors.ImageNotFound), P, id="image-type"),
        pytest.param(api_error(404, "No such image: foo:1"), P, id="404-no-such-image"),
        pytest.param(api_error(400, "conflicting options: x and y"), P, id="400"),
        pytest.param(api_error(401, "authentication required"), P, id="401"),
        pytest.param(api_error(403, "forbidden"), P, id="403"),
        pytest.param(api_error(404, "page missing", docker.errors.NotFound), P, id="404"),
        pytest.param(api_error(409, "name already in use"), P, id="409"),
        pytest.param(api_error(408), T, id="408"),
        pytest.param(api_error(429), T, id="429"),
        pytest.param(api_error(500), T, id="500"),
        pytest.param(api_error(502), T, id="502"),
        pytest.param(api_error(503), T, id="503"),
        pytest.param(api_error(599), T, id="599"),
        # The OCI runtime reports a broken command as a server error: permanent anyway.
        pytest.param(api_error(500, OCI_NOT_FOUND), P, id="500-oci-executable"),
        pytest.param(
            api_error(500, 'exec: "/entry.sh": stat /entry.sh: no such file or directory'),
            P,
            id="500-oci-no-such-file",
        ),
        pytest.param(
            api_error(500, "error mounting: mount /x: permission denied"), P, id="500-perm"
        ),
        pytest.param(api_error(500, "invalid reference format"), P, id="500-reference"),
        pytest.param(api_error(500, "write /sys/fs/cgroup: invalid argument"), P, id="500-einval"),
        pytest.param(api_error(503, "toomanyrequests: rate limit"), T, id="503-rate-limit"),
        # runc's words for a container whose limit is too low to even start: the same
        # limit fails again, whatever the server-error status says.
        pytest.param(
            api_error(
                500,
                "OCI runtime start failed: starting container process caused: "
                "container init was OOM-killed (memory limit too low?): unknown",
            ),
            P,
            id="500-oom-killed-init",
        ),
        # No response: nothing to go on but the message.
        pytest.param(api_error(None, "nothing known"), U, id="no-status"),
        pytest.param(api_error(None, "connection refused"), T, id="no-status-message"),
        pytest.param(docker.errors.InvalidArgument("bad value"), P, id="invalid-argument"),
        pytest.param(
            docker.errors.InvalidArgument("timeout must be positive"), P, id="invalid-arg-type"
        ),
        pytest.param(docker.errors.InvalidRepository("bad repo"), P, id="invalid-repository"),
        pytest.param(requests.exceptions.ConnectionError("boom"), T, id="requests-connection"),
        pytest.param(requests.exceptions.Timeout("boom"), T, id="requests-timeout"),
        pytest.param(requests.exceptions.ReadTimeout("boom"), T, id="requests-read-timeout"),
        pytest.param(requests.exceptions.ConnectTimeout("boom"), T, id="requests-conn-timeout"),
        pytest.param(urllib3.exceptions.ReadTimeoutError(POOL, "/x", "boom"), T, id="u3-read"),
        pytest.param(urllib3.exceptions.ConnectTimeoutError("boom"), T, id="urllib3-connect"),
        pytest.param(urllib3.exceptions.ProtocolError("boom"), T, id="urllib3-protocol"),
        pytest.param(ConnectionError("boom"), T, id="connection-error"),
        pytest.param(ConnectionRefusedError("boom"), T, id="connection-refused"),
        pytest.param(BrokenPipeError("boom"), T, id="broken-pipe"),
        pytest.param(TimeoutError("boom"), T, id="timeout-error"),
        pytest.param(
            FileNotFoundError(2, "No such file or directory", "/var/run/docker.sock"),
            T,
            id="missing-docker-socket",
        ),
        pytest.param(
            FileNotFoundError(2, "No such file or directory", "/app/config.yaml"),
            U,
            id="missing-other-file",
        ),
        pytest.param(
            docker.errors.DockerException(
                "Error while fetching server API version: ('Connection aborted.', "
                "FileNotFoundError(2, 'No such file or directory'))"
            ),
            T,
            id="daemon-unreachable",
        ),
        pytest.param(docker.errors.DockerException("weird"), U, id="docker-other"),
        pytest.param(RuntimeError("weird"), U, id="unrelated"),
    ],
)
def test_exception_types(error: BaseException, expected: ErrorType) -> None:
    assert classify(error) is expected


def test_real_socket_timeout_is_transient() -> None:
    left, right = socket.socketpair()
    try:
        left.settimeout(0.01)
        with pytest.raises(OSError) as info:
            left.recv(1)
    finally:
        left.close()
        right.close()
    assert classify(info.value) is T


def test_api_error_status_outweighs_message() -> None:
    # str() of a 500 says "Server Error" and of a 4xx "Client Error": the code decides.
    assert classify(api_error(400, "read timed out somewhere")) is P
    assert classify(api_error(503, "unrecognised failure")) is T


def test_executor_error_is_unwrapped() -> None:
    image = api_error(404, "No such image: foo", docker.errors.ImageNotFound)
    assert classify(ExecutorError("launch failed", original=image)) is P
    conn = requests.exceptions.ConnectionError("boom")
    assert classify(ExecutorError("launch failed", original=conn)) is T
    assert classify(ExecutorError("launch failed")) is U


def test_cause_chain_is_unwrapped() -> None:
    inner = requests.exceptions.ReadTimeout("boom")
    assert classify(chained(RuntimeError("launch failed"), inner)) is T
    nested = ExecutorError("outer", original=chained(RuntimeError("middle"), inner))
    assert classify(nested) is T


def test_innermost_classified_exception_wins() -> None:
    invalid = docker.errors.InvalidArgument
    assert classify(chained(invalid("bad"), ConnectionResetError("reset"))) is T
    assert classify(chained(ConnectionResetError("reset"), invalid("bad"))) is P


def test_sdk_shape_of_server_error_with_oci_message() -> None:
    # The SDK raises APIError from requests' HTTPError, whose own text says "Server Error";
    # the unclassifiable inner error must not hide the outer APIError's explanation.
    http = requests.exceptions.HTTPError("500 Server Error: Internal Server Error")
    assert classify(chained(api_error(500, OCI_NOT_FOUND), http)) is P


def test_cyclic_chain_terminates() -> None:
    first = RuntimeError("first")
    second = RuntimeError("second")
    first.__cause__ = second
    second.__cause__ = first
    assert classify(first) is U
    second.__cause__ = TimeoutError("late")
    assert classify(first) is T


def test_broken_str_does_not_crash() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert classify(Unprintable()) is U
    assert classify(chained(Unprintable(), TimeoutError())) is T


# --- message patterns ------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "pull access denied for foo, repository does not exist or may require 'docker login'",
        "repository does not exist",
        "manifest unknown: manifest unknown",
        "manifest for foo:9 not found: manifest unknown",
        "No such image: foo:latest",
        "image not found",
        "IMAGE NOT FOUND",
        "invalid reference format: repository name must be lowercase",
        "invalid configuration for container",
        "open /data: permission denied",
        "sh: foo: command not found",
        'exec: "foo": executable file not found in $PATH',
        "host path '/etc' is not in ALLOWED_BIND_MOUNTS",
        # A kill for memory is never a passing daemon hiccup.
        "container was OOMKilled",
        "OOM-killed at its memory limit",
        "out of memory: the container was killed at its 16 MiB memory limit (exit code 137)",
        "Out of memory: Killed process 4242 (sh); server error",
        # Permanent patterns are checked first.
        "permission denied while reading; connection timed out",
    ],
)
def test_permanent_messages(message: str) -> None:
    assert classify(message) is P
    assert classify(RuntimeError(message)) is P


@pytest.mark.parametrize(
    "message",
    [
        "dial tcp 10.0.0.1:2375: connect: connection refused",
        "read: Connection reset by peer",
        "('Connection aborted.', RemoteDisconnected())",
        "Read timed out. (read timeout=60)",
        "context deadline exceeded (Client.Timeout exceeded)",
        "Resource temporarily unavailable",
        "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.",
        "dial unix /var/run/docker.sock: connect: no such file or directory",
        "No such file or directory: '/var/run/docker.sock'",
        "toomanyrequests: Too Many Requests",
        "503 Service Unavailable",
        "dial tcp: lookup registry: i/o timeout",
        "write: broken pipe",
        "connect: network is unreachable",
        "500 Server Error for http+docker://localhost",
    ],
)
def test_transient_messages(message: str) -> None:
    assert classify(message) is T
    assert classify(RuntimeError(message)) is T


@pytest.mark.parametrize(
    "message",
    [
        "no such file or directory: /app/data.csv",
        "something odd happened",
        "",
    ],
)
def test_unknown_messages(message: str) -> None:
    assert classify(message) is U


def test_error_type_is_a_string() -> None:
    assert ErrorType.TRANSIENT == "transient"
    assert f"{ErrorType.PERMANENT}" == "permanent"
    assert {e.value for e in ErrorType} == {"transient", "permanent", "unknown"}


# --- settings patterns -----------------------------------------------------------------


def test_user_permanent_pattern_extends_builtins() -> None:
    assert classify("Quota exceeded for project") is U
    with override_settings(CONTAINER_CELERY={"PERMANENT_PATTERNS": [r"quota\s+exceeded"]}):
        assert classify("Quota exceeded for project") is P
        assert classify(ExecutorError("x", original=RuntimeError("quota exceeded"))) is P
        assert classify("connection refused") is T
        assert classify("no such image: foo") is P


def test_user_transient_pattern_extends_builtins() -> None:
    assert classify("registry is warming up") is U
    with override_settings(CONTAINER_CELERY={"TRANSIENT_PATTERNS": ["registry is warming"]}):
        assert classify("Registry is warming up") is T
        assert classify("no such image: foo") is P
        assert classify("connection refused") is T


def test_user_patterns_take_precedence_over_builtins() -> None:
    assert classify("timeout from billing service") is T
    assert classify("permission denied on /mnt/flaky-nfs") is P
    settings = {
        "PERMANENT_PATTERNS": ["from billing"],
        "TRANSIENT_PATTERNS": ["flaky-nfs", "billing"],
    }
    with override_settings(CONTAINER_CELERY=settings):
        assert classify("timeout from billing service") is P
        assert classify("permission denied on /mnt/flaky-nfs") is T
        assert classify(api_error(404, "no such image on flaky-nfs")) is T


def test_single_string_pattern_is_one_pattern() -> None:
    with override_settings(CONTAINER_CELERY={"PERMANENT_PATTERNS": "quota"}):
        assert classify("quota reached") is P
        # Not split into characters, which would match almost anything.
        assert classify("hello") is U


def test_invalid_user_pattern_is_reported() -> None:
    with (
        override_settings(CONTAINER_CELERY={"TRANSIENT_PATTERNS": ["(unclosed"]}),
        pytest.raises(ImproperlyConfigured, match="TRANSIENT_PATTERNS"),
    ):
        classify("anything")


def test_user_patterns_compiled_once_per_value() -> None:
    retry._compile_user.cache_clear()
    with override_settings(CONTAINER_CELERY={"PERMANENT_PATTERNS": ["quota"]}):
        for _ in range(50):
            assert classify("quota reached") is P
            assert classify("nothing to see") is U
    info = retry._compile_user.cache_info()
    # One compile per setting (permanent and transient), whatever the number of calls.
    assert info.misses == 2
    with override_settings(CONTAINER_CELERY={"PERMANENT_PATTERNS": ["other"]}):
        assert classify("quota reached") is U
    assert retry._compile_user.cache_info().misses == 3


# --- back-off --------------------------------------------------------------------------


def test_exact_backoff_without_jitter() -> None:
    strategy = RetryStrategy(base_delay=5, max_delay=300, backoff_factor=2, jitter=0)
    delays = [strategy.get_retry_delay(n) for n in range(1, 7)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
    assert strategy.get_retry_delay(7) == 300.0  # 320 capped
    assert strategy.get_retry_delay(8) == 300.0


def test_backoff_with_other_factor_and_cap() -> None:
    strategy = RetryStrategy(base_delay=2, max_delay=50, backoff_factor=3, jitter=0)
    assert [strategy.get_retry_delay(n) for n in range(1, 6)] == [2.0, 6.0, 18.0, 50.0, 50.0]
    assert isinstance(strategy.get_retry_delay(1), float)


def test_attempt_below_one_counts_as_first_retry() -> None:
    strategy = RetryStrategy(base_delay=5, max_delay=300, backoff_factor=2, jitter=0)
    assert strategy.get_retry_delay(0) == 5.0
    assert strategy.get_retry_delay(-3) == 5.0


@pytest.mark.parametrize("n", [1_100, 10**6, 10**100, 10**400])
def test_huge_attempt_counts_do_not_overflow(n: int) -> None:
    strategy = RetryStrategy(base_delay=5, max_delay=300, backoff_factor=2, jitter=0)
    assert strategy.get_retry_delay(n) == 300.0
    assert RetryStrategy(backoff_factor=1, jitter=0).get_retry_delay(n) == 5.0
    tiny = RetryStrategy(base_delay=1e-300, max_delay=1e300, backoff_factor=1.000001, jitter=0)
    assert 0 < tiny.get_retry_delay(n) <= 1e300


def test_constant_and_zero_delays() -> None:
    assert RetryStrategy(backoff_factor=1, jitter=0).get_retry_delay(5) == 5.0
    zero = RetryStrategy(base_delay=0, max_delay=0, jitter=0.5)
    assert [zero.get_retry_delay(n) for n in (1, 2, 10)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("jitter", [0.1, 0.25, 1.0])
def test_jitter_range(jitter: float) -> None:
    strategy = RetryStrategy(base_delay=10, max_delay=100, backoff_factor=2, jitter=jitter)
    rng = random.Random(1234)
    expected = 40.0  # third retry, before jitter
    low = expected * (1 - jitter)
    draws = [strategy.get_retry_delay(3, rng) for _ in range(2000)]
    assert all(low <= d <= expected for d in draws)
    assert len(set(draws)) > 1000
    # The draws spread over the whole interval rather than clustering at one end.
    span = expected - low
    assert min(draws) < low + span * 0.05
    assert max(draws) > expected - span * 0.05


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    strategy = RetryStrategy(jitter=0.5)
    first = [strategy.get_retry_delay(2, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    a, b = random.Random(7), random.Random(7)
    assert [strategy.get_retry_delay(2, a) for _ in range(5)] == [
        strategy.get_retry_delay(2, b) for _ in range(5)
    ]


def test_jitter_without_rng_uses_module_random() -> None:
    strategy = RetryStrategy(base_delay=10, max_delay=100, backoff_factor=2, jitter=0.5)
    draws = [strategy.get_retry_delay(2) for _ in range(200)]
    assert all(10.0 <= d <= 20.0 for d in draws)
    assert len(set(draws)) > 1


# --- should_retry ----------------------------------------------------------------------


@pytest.mark.parametrize("error_type", [T, U])
def test_retryable_types_retry_until_max_attempts(error_type: ErrorType) -> None:
    strategy = RetryStrategy(max_attempts=3)
    assert [strategy.should_retry(n, error_type) for n in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_permanent_never_retries() -> None:
    strategy = RetryStrategy(max_attempts=10)
    assert not any(strategy.should_retry(n, P) for n in range(12))


def test_zero_attempts_never_retries() -> None:
    strategy = RetryStrategy(max_attempts=0)
    assert not any(strategy.should_retry(0, t) for t in ErrorType)


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": -1}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"base_delay": -0.1}, "base_delay"),
        ({"base_delay": math.nan}, "base_delay"),
        ({"base_delay": "5"}, "base_delay"),
        ({"base_delay": 10, "max_delay": 9}, "max_delay"),
        ({"max_delay": math.inf}, "max_delay"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"backoff_factor": math.nan}, "backoff_factor"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_invalid_strategy_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryStrategy(**kwargs)  # type: ignore[arg-type]


def test_boundary_arguments_are_accepted() -> None:
    strategy = RetryStrategy(max_attempts=0, base_delay=0, max_delay=0, backoff_factor=1, jitter=1)
    assert strategy.get_retry_delay(3) == 0.0
    assert RetryStrategy(jitter=0).jitter == 0


# --- named strategies ------------------------------------------------------------------


def test_builtin_strategies() -> None:
    assert set(RETRY_STRATEGIES) == {"default", "aggressive", "conservative", "high_priority"}
    default = RETRY_STRATEGIES["default"]
    aggressive = RETRY_STRATEGIES["aggressive"]
    conservative = RETRY_STRATEGIES["conservative"]
    fast = RETRY_STRATEGIES["high_priority"]
    assert aggressive.max_attempts > default.max_attempts
    assert aggressive.base_delay < default.base_delay
    assert aggressive.max_delay < default.max_delay
    assert conservative.max_attempts < default.max_attempts
    assert conservative.base_delay > default.base_delay
    assert conservative.max_delay > default.max_delay
    assert fast.max_attempts > default.max_attempts
    assert fast.base_delay < default.base_delay
    assert fast.max_delay < default.max_delay


def test_get_strategy_defaults() -> None:
    assert get_strategy(None) is RETRY_STRATEGIES["default"]
    assert get_strategy("") is RETRY_STRATEGIES["default"]
    assert get_strategy("  ") is RETRY_STRATEGIES["default"]
    assert get_strategy("conservative") is RETRY_STRATEGIES["conservative"]
    with override_settings(CONTAINER_CELERY={"DEFAULT_RETRY_STRATEGY": "aggressive"}):
        assert get_strategy(None) is RETRY_STRATEGIES["aggressive"]
        assert get_strategy("") is RETRY_STRATEGIES["aggressive"]
        assert get_strategy("default") is RETRY_STRATEGIES["default"]


def test_settings_add_and_replace_strategies() -> None:
    assert "nightly" not in strategy_names()
    configured = {
        "nightly": {"max_attempts": 1, "base_delay": 600, "max_delay": 600},
        "default": {"max_attempts": 7},
    }
    with override_settings(CONTAINER_CELERY={"RETRY_STRATEGIES": configured}):
        assert strategy_names() == {
            "default",
            "aggressive",
            "conservative",
            "high_priority",
            "nightly",
        }
        assert get_strategy("nightly") == RetryStrategy(
            max_attempts=1, base_delay=600, max_delay=600
        )
        # Replaced outright: the other fields are the dataclass defaults.
        assert get_strategy("default") == RetryStrategy(max_attempts=7)
        assert get_strategy(None) == RetryStrategy(max_attempts=7)
        assert get_strategy("aggressive") is RETRY_STRATEGIES["aggressive"]
    assert get_strategy("default") is RETRY_STRATEGIES["default"]


def test_unknown_strategy_names_the_known_ones() -> None:
    with (
        override_settings(CONTAINER_CELERY={"RETRY_STRATEGIES": {"nightly": {}}}),
        pytest.raises(KeyError) as info,
    ):
        get_strategy("sometimes")
    message = str(info.value)
    assert "sometimes" in message
    for name in ("default", "aggressive", "conservative", "high_priority", "nightly"):
        assert name in message


@pytest.mark.parametrize(
    "entry",
    [{"max_attempts": -1}, {"retries": 3}, ["not", "a", "dict"]],
)
def test_invalid_settings_strategy(entry: object) -> None:
    with (
        override_settings(CONTAINER_CELERY={"RETRY_STRATEGIES": {"bad": entry}}),
        pytest.raises(ImproperlyConfigured, match="bad"),
    ):
        get_strategy("bad")


# --- exit codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "codes", "expected"),
    [
        (3, [3, 4], True),
        (4, [3, 4], True),
        (5, [3, 4], False),
        (3, [], False),
        (0, [0], False),
        (None, [1], False),
        (137, [137], True),
    ],
)
def test_is_retryable_exit_code(exit_code: int | None, codes: list[int], expected: bool) -> None:
    assert is_retryable_exit_code(exit_code, codes) is expected


# --- properties ------------------------------------------------------------------------

delays = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(
    base=delays,
    extra=delays,
    factor=st.floats(min_value=1, max_value=100, allow_nan=False, allow_infinity=False),
    start=st.integers(min_value=-5, max_value=10**6),
)
def test_delays_are_non_decreasing_and_bounded(
    base: float, extra: float, factor: float, start: int
) -> None:
    strategy = RetryStrategy(
        base_delay=base, max_delay=base + extra, backoff_factor=factor, jitter=0
    )
    values = [strategy.get_retry_delay(n) for n in range(start, start + 40)]
    assert all(0 <= v <= strategy.max_delay for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values))


@given(
    base=delays,
    extra=delays,
    factor=st.floats(min_value=1, max_value=100, allow_nan=False, allow_infinity=False),
    jitter=st.floats(min_value=0, max_value=1),
    n=st.integers(min_value=-5, max_value=10**9),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jittered_delays_stay_within_bounds(
    base: float, extra: float, factor: float, jitter: float, n: int, seed: int
) -> None:
    strategy = RetryStrategy(
        base_delay=base, max_delay=base + extra, backoff_factor=factor, jitter=jitter
    )
    plain = RetryStrategy(base_delay=base, max_delay=base + extra, backoff_factor=factor, jitter=0)
    ceiling = plain.get_retry_delay(n)
    value = strategy.get_retry_delay(n, random.Random(seed))
    assert 0 <= value <= strategy.max_delay
    assert ceiling * (1 - jitter) <= value <= ceiling
