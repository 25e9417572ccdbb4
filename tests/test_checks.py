"""The system checks of ``CONTAINER_CELERY``: every key's type, range, content and the
settings that must agree, reported by ``manage.py check``, by ``process_container_jobs``
and by a Celery worker that then refuses to start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_container_celery import checks, conf
from django_container_celery.management.commands.process_container_jobs import (
    Command as ProcessCommand,
)
from django_container_celery.retry import RetryStrategy
from django_container_celery.validators import bind_mount_allowed
from django_container_celery.worker import check_settings, refuse_bad_settings

from .celery_support import CeleryCluster

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reference" / "settings.md"
# Never reached by a process that stops at its checks; one that gets past them by mistake
# fails instead of touching a database that other test runs use.
NO_DATABASE = "postgres://nobody:nothing@127.0.0.1:1/none"


def check(value: Any) -> list[CheckMessage]:
    with override_settings(CONTAINER_CELERY=value):
        return checks.check_container_celery_settings()


def errors_of(**values: Any) -> list[CheckMessage]:
    """The errors (not warnings) for these keys over the defaults."""
    return [m for m in check(values) if m.is_serious()]


def name(key: str) -> str:
    return f"CONTAINER_CELERY['{key}']"


def assert_one(found: list[CheckMessage], check_id: str, *fragments: str) -> CheckMessage:
    assert [m.id for m in found] == [check_id], [str(m) for m in found]
    message = found[0]
    for fragment in fragments:
        assert fragment in message.msg, message.msg
    assert message.hint, message
    return message


# -- coverage and clean settings --------------------------------------------------------


def test_every_setting_has_a_spec() -> None:
    assert set(checks.SPECS) == set(conf.DEFAULTS)


@pytest.mark.parametrize("value", [{}, None], ids=["empty", "none"])
def test_defaults_pass(value: Any) -> None:
    assert check(value) == []


def test_the_suites_settings_pass() -> None:
    assert checks.check_container_celery_settings() == []


def test_the_check_is_registered_with_the_tag() -> None:
    from django.core.checks import registry

    assert checks.check_container_celery_settings in registry.registry.get_checks()
    assert checks.TAG in registry.registry.tags_available()


# -- shape of the dict ------------------------------------------------------------------


@pytest.mark.parametrize("value", [["LEASE_SECONDS", 60], "LEASE_SECONDS=60"])
def test_not_a_dict(value: Any) -> None:
    message = assert_one(check(value), checks.E_NOT_A_DICT, "CONTAINER_CELERY must be a dict")
    assert type(value).__name__ in message.msg


def test_unknown_key_names_it_and_suggests_the_known_one() -> None:
    message = assert_one(errors_of(LEASE_SECOND=30), checks.E_UNKNOWN_KEY, name("LEASE_SECOND"))
    assert "'LEASE_SECONDS'" in str(message.hint)


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    message = assert_one(check({"ZZZ": 1}), checks.E_UNKNOWN_KEY, name("ZZZ"))
    assert "MAX_CONCURRENT_JOBS" in str(message.hint)


# -- type: one wrong value per key ------------------------------------------------------

WRONG_TYPES: dict[str, Any] = {
    "LEASE_SECONDS": "60",
    "LAUNCH_TIMEOUT": None,
    "FINISH_TRIES": 2.5,
    "MAX_ATTEMPTS_WITHOUT_OUTCOME": "3",
    "HOST_FAILURES_BEFORE_UNHEALTHY": 1.5,
    "DISPATCH_INTERVAL": True,
    "REDISPATCH_SECONDS": float("nan"),
    "MAX_CONCURRENT_JOBS": True,
    "LOG_MAX_BYTES": 65536.0,
    "ALLOWED_BIND_MOUNTS": "/data",
    "TASK_QUEUE": 5,
    "PER_HOST_QUEUES": 1,
    "RETRY_STRATEGIES": [("fast", {})],
    "DEFAULT_RETRY_STRATEGY": None,
    "TRANSIENT_PATTERNS": "timed out",
    "PERMANENT_PATTERNS": ["ok", 3],
    "MAX_MEMORY_MB": "64g",
    "DEFAULT_JOB_MEMORY_MB": "256m",
    "DEFAULT_JOB_CPUS": "1",
    "HOST_MEMORY_RESERVE_MB": 0.5,
    "HOST_CPU_RESERVE": None,
    "MAX_CPUS": float("inf"),
    "MAX_TIMEOUT_SECONDS": 3600.0,
    "POLL_INTERVAL": "1",
    "WATCHER": "false",
    "RECONCILE_INTERVAL": None,
    "SEND_TASK_EVENTS": 0,
    "KEEP_CONTAINERS": "yes",
    "NETWORK_MODE": False,
    "CLEANUP_AFTER_DAYS": "30",
    "EXECUTOR": 3,
    "DEFAULT_DOCKER_HOST": ("unix:///var/run/docker.sock",),
    "SHUTDOWN_TIMEOUT": False,
}


def test_the_wrong_types_cover_every_setting() -> None:
    assert set(WRONG_TYPES) == set(conf.DEFAULTS)


@pytest.mark.parametrize(("key", "value"), WRONG_TYPES.items(), ids=list(WRONG_TYPES))
def test_wrong_type_is_an_error_naming_the_key(key: str, value: Any) -> None:
    message = assert_one(errors_of(**{key: value}), checks.E_TYPE, name(key), "must be")
    assert type(value).__name__ in message.msg


def test_a_string_for_a_list_gets_a_hint_to_wrap_it() -> None:
    message = assert_one(errors_of(ALLOWED_BIND_MOUNTS="/data"), checks.E_TYPE)
    assert message.msg == (
        "CONTAINER_CELERY['ALLOWED_BIND_MOUNTS'] must be a list of strings, not str ('/data')."
    )
    assert "['/data']" in str(message.hint)


# -- range ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LEASE_SECONDS", 1),
        ("LAUNCH_TIMEOUT", 0),
        ("FINISH_TRIES", 0),
        ("MAX_ATTEMPTS_WITHOUT_OUTCOME", 0),
        ("HOST_FAILURES_BEFORE_UNHEALTHY", 0),
        ("DISPATCH_INTERVAL", 0),
        ("REDISPATCH_SECONDS", -5),
        ("MAX_CONCURRENT_JOBS", 0),
        ("LOG_MAX_BYTES", 64),
        ("MAX_MEMORY_MB", 2),
        ("MAX_CPUS", 0),
        ("MAX_TIMEOUT_SECONDS", 0),
        ("POLL_INTERVAL", 0.0),
        ("RECONCILE_INTERVAL", -1.0),
        ("CLEANUP_AFTER_DAYS", -1),
        ("SHUTDOWN_TIMEOUT", -0.5),
    ],
)
def test_out_of_range_is_an_error_naming_the_key(key: str, value: Any) -> None:
    assert_one(errors_of(**{key: value}), checks.E_RANGE, name(key), repr(value))


def test_edge_values_pass() -> None:
    assert (
        check(
            {
                "LEASE_SECONDS": 2,
                "RECONCILE_INTERVAL": 1,
                "POLL_INTERVAL": 0.05,
                "FINISH_TRIES": 1,
                "MAX_CONCURRENT_JOBS": 1,
                "LOG_MAX_BYTES": 0,  # documented: stores logs whole
                "MAX_MEMORY_MB": 4,
                "MAX_CPUS": 0.01,
                "DEFAULT_JOB_MEMORY_MB": 4,
                "DEFAULT_JOB_CPUS": 0.01,
                "MAX_TIMEOUT_SECONDS": 1,
                "CLEANUP_AFTER_DAYS": 0,
                "SHUTDOWN_TIMEOUT": 0,
            }
        )
        == []
    )
    assert check({"LOG_MAX_BYTES": -1}) == []
    assert check({"LOG_MAX_BYTES": checks.MIN_LOG_MAX_BYTES}) == []


# -- content ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "check_id", "where"),
    [
        ("ALLOWED_BIND_MOUNTS", ["/srv/data", "relative/dir"], checks.E_CONTENT, "[1]"),
        ("ALLOWED_BIND_MOUNTS", [""], checks.E_CONTENT, "[0]"),
        ("TRANSIENT_PATTERNS", ["(unclosed"], checks.E_CONTENT, "[0]"),
        ("PERMANENT_PATTERNS", ["fine", "[a-"], checks.E_CONTENT, "[1]"),
        ("RETRY_STRATEGIES", {"x": {"max_attempts": -1}}, checks.E_CONTENT, "['x']"),
        ("RETRY_STRATEGIES", {"x": {"base_delay": 5, "max_delay": 1}}, checks.E_CONTENT, "['x']"),
        ("RETRY_STRATEGIES", {"x": {"jitter": 2}}, checks.E_CONTENT, "['x']"),
        ("RETRY_STRATEGIES", {"x": {"backoff_factor": 0.5}}, checks.E_CONTENT, "['x']"),
        ("RETRY_STRATEGIES", {"x": {"max_attempts": 2.0}}, checks.E_CONTENT, "['x']"),
        ("RETRY_STRATEGIES", {"x": {"delay": 1}}, checks.E_CONTENT, "['x']"),
        ("RETRY_STRATEGIES", {"x": 3}, checks.E_TYPE, "['x']"),
        ("RETRY_STRATEGIES", {" x ": {}}, checks.E_CONTENT, "[' x ']"),
        ("EXECUTOR", "no_such_module.Executor", checks.E_CONTENT, ""),
        ("EXECUTOR", "django_container_celery.models.ContainerJob", checks.E_CONTENT, ""),
        ("DEFAULT_DOCKER_HOST", "/var/run/docker.sock", checks.E_CONTENT, ""),
        ("DEFAULT_DOCKER_HOST", "ftp://docker.example.com", checks.E_CONTENT, ""),
        ("DEFAULT_DOCKER_HOST", "tcp://docker.example.com", checks.E_CONTENT, ""),
        ("DEFAULT_RETRY_STRATEGY", "  ", checks.E_CONTENT, ""),
    ],
)
def test_invalid_content_is_an_error_naming_the_key(
    key: str, value: Any, check_id: str, where: str
) -> None:
    assert_one(errors_of(**{key: value}), check_id, name(key) + where)


def test_a_strategy_error_says_what_is_wrong() -> None:
    found = errors_of(RETRY_STRATEGIES={"x": {"base_delay": 5, "max_delay": 1}})
    assert "max_delay must be >= base_delay" in found[0].msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ALLOWED_BIND_MOUNTS", ("/srv/a", "/srv/b/")),
        ("TRANSIENT_PATTERNS", (r"quota\s+exceeded",)),
        (
            "RETRY_STRATEGIES",
            {"nightly": {"max_attempts": 4, "base_delay": 600, "max_delay": 7200}},
        ),
        ("RETRY_STRATEGIES", {"obj": RetryStrategy(max_attempts=1)}),
        ("EXECUTOR", "memory"),
        ("EXECUTOR", "django_container_celery.executors.MemoryExecutor"),
        ("DEFAULT_DOCKER_HOST", "tcp://127.0.0.1:2375"),
        ("DEFAULT_DOCKER_HOST", "ssh://deploy@docker.example.com"),
        ("DEFAULT_DOCKER_HOST", "unix:///run/user/1000/docker.sock"),
        ("TASK_QUEUE", "containers"),
        ("TASK_QUEUE", ""),  # routes like None
        ("EXECUTOR", None),  # means "docker"
        ("NETWORK_MODE", "none"),
    ],
)
def test_valid_content_passes(key: str, value: Any) -> None:
    assert check({key: value}) == []


def test_allowing_the_root_is_a_warning_not_an_error() -> None:
    found = check({"ALLOWED_BIND_MOUNTS": ["/srv", "/"]})
    message = assert_one(found, checks.W_WHOLE_HOST, name("ALLOWED_BIND_MOUNTS") + "[1]")
    assert not message.is_serious()


# -- relations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key", "other"),
    [
        ({"POLL_INTERVAL": 60.0, "LEASE_SECONDS": 60}, "POLL_INTERVAL", "LEASE_SECONDS"),
        ({"RECONCILE_INTERVAL": 31.0}, "RECONCILE_INTERVAL", "LEASE_SECONDS"),
        ({"LEASE_SECONDS": 8}, "RECONCILE_INTERVAL", "LEASE_SECONDS"),
        ({"DISPATCH_INTERVAL": 60}, "DISPATCH_INTERVAL", "REDISPATCH_SECONDS"),
        ({"REDISPATCH_SECONDS": 3}, "DISPATCH_INTERVAL", "REDISPATCH_SECONDS"),
        ({"DEFAULT_RETRY_STRATEGY": "nightly"}, "DEFAULT_RETRY_STRATEGY", "RETRY_STRATEGIES"),
        (
            {"DEFAULT_JOB_MEMORY_MB": 1024, "MAX_MEMORY_MB": 512},
            "DEFAULT_JOB_MEMORY_MB",
            "MAX_MEMORY_MB",
        ),
        ({"DEFAULT_JOB_CPUS": 4.0, "MAX_CPUS": 2.0}, "DEFAULT_JOB_CPUS", "MAX_CPUS"),
    ],
)
def test_settings_that_disagree_are_an_error_naming_both(
    values: dict[str, Any], key: str, other: str
) -> None:
    found = errors_of(**values)
    message = assert_one(found, checks.E_RELATION, name(key))
    assert other in message.msg + str(message.hint)


def test_half_the_lease_is_allowed_for_reconcile() -> None:
    assert check({"LEASE_SECONDS": 10, "RECONCILE_INTERVAL": 5.0}) == []


def test_a_configured_strategy_may_be_the_default() -> None:
    strategies = {"nightly": {"max_attempts": 4}}
    assert check({"RETRY_STRATEGIES": strategies, "DEFAULT_RETRY_STRATEGY": "nightly"}) == []
    # The name counts although the entry itself is invalid (that has its own error).
    found = errors_of(RETRY_STRATEGIES={"nightly": {"jitter": 5}}, DEFAULT_RETRY_STRATEGY="nightly")
    assert_one(found, checks.E_CONTENT, name("RETRY_STRATEGIES") + "['nightly']")


def test_no_relation_error_when_one_side_is_already_wrong() -> None:
    assert_one(errors_of(LEASE_SECONDS="60"), checks.E_TYPE, name("LEASE_SECONDS"))


def test_every_problem_is_reported_at_once() -> None:
    found = errors_of(
        TYPO=1, ALLOWED_BIND_MOUNTS="/data", FINISH_TRIES=0, EXECUTOR="nope.Nope", POLL_INTERVAL=99
    )
    assert sorted(str(m.id) for m in found) == sorted(
        [
            checks.E_UNKNOWN_KEY,
            checks.E_TYPE,
            checks.E_RANGE,
            checks.E_CONTENT,
            checks.E_RELATION,
        ]
    )


# -- manage.py check, the queue command, the worker -------------------------------------


def test_manage_py_check_fails_naming_the_key() -> None:
    with (
        override_settings(CONTAINER_CELERY={"ALLOWED_BIND_MOUNTS": "/data"}),
        pytest.raises(SystemCheckError) as info,
    ):
        call_command("check")
    assert "django_container_celery.E003" in str(info.value)
    assert name("ALLOWED_BIND_MOUNTS") in str(info.value)


def test_the_documented_message_is_the_real_one() -> None:
    (message,) = errors_of(ALLOWED_BIND_MOUNTS="/data")
    assert f"?: ({message.id}) {message.msg}\n\tHINT: {message.hint}\n" in DOC.read_text()


def test_the_queue_command_runs_the_checks() -> None:
    # BaseCommand's default; set to [] or () it would skip the checks.
    assert ProcessCommand.requires_system_checks == "__all__"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=NO_DATABASE,
        DCC_SETTINGS_JSON=json.dumps({"MAX_CONCURRENT_JOBS": 0}),
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-m", "django", "process_container_jobs", "--settings=tests.settings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "SystemCheckError" in done.stderr, done.stderr
    assert name("MAX_CONCURRENT_JOBS") in done.stderr, done.stderr


def test_worker_check_raises_listing_the_errors() -> None:
    with (
        override_settings(CONTAINER_CELERY={"ALLOWED_BIND_MOUNTS": "/data", "FINISH_TRIES": 0}),
        pytest.raises(ImproperlyConfigured) as info,
    ):
        check_settings()
    text = str(info.value)
    assert "2 error(s)" in text
    assert name("ALLOWED_BIND_MOUNTS") in text and name("FINISH_TRIES") in text


def test_worker_check_logs_warnings_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with (
        override_settings(CONTAINER_CELERY={"ALLOWED_BIND_MOUNTS": ["/"]}),
        caplog.at_level(logging.WARNING, logger="django_container_celery.worker"),
    ):
        check_settings()
    assert checks.W_WHOLE_HOST in caplog.text


def test_worker_check_leaves_out_silenced_checks() -> None:
    with override_settings(
        CONTAINER_CELERY={"LOG_MAX_BYTES": 100},
        SILENCED_SYSTEM_CHECKS=[checks.E_RANGE],
    ):
        check_settings()


def test_worker_init_receiver_exits_rather_than_raise() -> None:
    # Celery catches any Exception a signal receiver raises and starts the worker anyway.
    with (
        override_settings(CONTAINER_CELERY={"FINISH_TRIES": 0}),
        pytest.raises(SystemExit) as info,
    ):
        refuse_bad_settings()
    assert not isinstance(info.value, Exception)
    assert name("FINISH_TRIES") in str(info.value.code)


class NoDatabaseCluster(CeleryCluster):
    """Workers that need no database: a worker that gets past its checks by mistake fails
    instead of touching a database that other test runs use."""

    def env(self) -> dict[str, str]:
        return {**super().env(), "DATABASE_URL": NO_DATABASE}


def worker_argv(node: str) -> list[str]:
    args = ["worker", "-l", "info", "-P", "solo", "-n", f"{node}@%h"]
    return [*args, "--without-gossip", "--without-mingle"]


@pytest.mark.celery
def test_a_real_worker_with_a_bad_setting_exits_non_zero_naming_it() -> None:
    cluster = NoDatabaseCluster(str(settings.CELERY_BROKER_URL), {"ALLOWED_BIND_MOUNTS": "/data"})
    try:
        proc = cluster.celery("worker-bad-settings", *worker_argv("bad-settings"))
        try:
            code = proc.popen.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit:\n{proc.log_tail()}")
        output = proc.log_path.read_text(errors="replace")
        assert code != 0, output
        assert "django_container_celery.E003" in output, output
        assert name("ALLOWED_BIND_MOUNTS") in output, output
        assert " ready." not in output, output
    finally:
        cluster.stop()


@pytest.mark.celery
def test_a_real_worker_with_good_settings_starts() -> None:
    # The same start as above with valid settings: the refusal is the setting's doing.
    cluster = NoDatabaseCluster(str(settings.CELERY_BROKER_URL), {"WATCHER": False})
    try:
        cluster.worker("good-settings", concurrency=1)
    finally:
        cluster.stop()


# -- bind mounts fail closed ------------------------------------------------------------


@pytest.mark.parametrize("value", ["/data", "/", [b"/data"], ["/data", None], 0])
def test_bind_mount_allowed_fails_closed_on_a_bad_setting(value: Any) -> None:
    with override_settings(CONTAINER_CELERY={"ALLOWED_BIND_MOUNTS": value}):
        assert not bind_mount_allowed("/var/run/docker.sock")
        assert not bind_mount_allowed("/data")
        assert not bind_mount_allowed("/data/inside")


def test_bind_mount_allowed_still_allows_a_listed_root() -> None:
    with override_settings(CONTAINER_CELERY={"ALLOWED_BIND_MOUNTS": ["/data"]}):
        assert bind_mount_allowed("/data/inside")
        assert not bind_mount_allowed("/var/run/docker.sock")
