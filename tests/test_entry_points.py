"""Every entry point validates the whole definition before anything is saved (SPEC 4.8).

Each test feeds arbitrary bad input to one entry point and expects a ``ValidationError``
whose ``error_dict`` names the field (or the call option), with the number of rows
unchanged. The last test runs a canvas step in a real worker.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import chain
from django.core.exceptions import ValidationError
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_container_celery import container_task
from django_container_celery.api import ContainerTask, create_job_from
from django_container_celery.exceptions import InvalidJobDefinition
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import queue_manager
from django_container_celery.states import Status
from django_container_celery.tasks import create_container_job
from django_container_celery.validators import (
    ENV_KEY_RE,
    IMAGE_REFERENCE_RE,
    MAX_SCHEDULE_SECONDS,
    validate_image_reference,
)

from .celery_support import celery_cluster, wait_for

HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
VALID = {"docker_image": "busybox:latest", "command": "echo hi"}

Case = tuple[str, dict[str, Any]]

# -- strategies --------------------------------------------------------------------------


def _unparsable(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return True
    return False


with_nul = st.tuples(st.text(max_size=8), st.text(max_size=8)).map(lambda p: f"{p[0]}\x00{p[1]}")
bad_images = st.one_of(
    st.text(max_size=40).filter(lambda s: not IMAGE_REFERENCE_RE.fullmatch(s)),
    # A first component without a dot, a port or "localhost" is a path: lowercase only.
    st.from_regex(r"[a-z0-9]*[A-Z][A-Za-z0-9]{0,6}/[a-z0-9]{1,8}(:[a-z0-9]{1,5})?", fullmatch=True),
    st.sampled_from(["ABC/busybox", "Bad Image", "Localhost/x", "host:port/x", "busybox\x00"]),
)
bad_commands = st.one_of(
    st.text(max_size=30).map(lambda s: s + "'").filter(_unparsable),
    with_nul,
)
huge = st.integers(min_value=2**63, max_value=10**400)
huge_either_way = st.one_of(huge, huge.map(lambda n: -n))
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
non_string_values = st.one_of(
    st.integers(), st.none(), st.booleans(), st.floats(), st.lists(st.text(max_size=3), max_size=2)
)
bad_environments = st.one_of(
    st.dictionaries(
        st.text(max_size=10).filter(lambda k: not ENV_KEY_RE.fullmatch(k)),
        st.text(max_size=4),
        min_size=1,
        max_size=3,
    ),
    non_string_values.map(lambda v: {"GOOD_NAME": v}),
    with_nul.map(lambda v: {"GOOD_NAME": v}),
    st.lists(st.text(max_size=3), max_size=2),
)


def _case(field: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Case]:
    return values.map(lambda value: (field, {field: value}))


bad_definitions: st.SearchStrategy[Case] = st.one_of(
    _case("docker_image", bad_images),
    _case("command", bad_commands),
    st.sampled_from(["name", "description", "working_directory"]).flatmap(
        lambda field: _case(field, with_nul)
    ),
    _case("environment", bad_environments),
    _case("bind_mounts", st.one_of(with_nul.map(lambda s: [s]), st.just("/data:/data"))),
    _case(
        "memory_limit",
        st.one_of(st.integers(max_value=3), st.integers(min_value=65537), huge, st.booleans()),
    ),
    _case(
        "cpu_limit",
        st.one_of(
            st.floats(max_value=0.0099, allow_nan=False),
            st.floats(min_value=64.0001),
            non_finite,
            huge_either_way,
            st.booleans(),
        ),
    ),
    _case(
        "timeout_seconds",
        st.one_of(st.integers(max_value=0), st.integers(min_value=7 * 24 * 3600 + 1), huge),
    ),
    _case(
        "priority",
        st.one_of(
            st.integers(max_value=-1),
            st.integers(min_value=101),
            huge_either_way,
            st.booleans(),
            non_finite,
            st.floats(min_value=0.1, max_value=99.9).filter(lambda f: not f.is_integer()),
        ),
    ),
    _case("max_retries", st.one_of(st.integers(max_value=-1), st.integers(min_value=101), huge)),
    _case("retry_exit_codes", st.lists(st.integers(max_value=0), min_size=1, max_size=3)),
    _case("retry_strategy", st.one_of(st.just("sometimes"), with_nul)),
    st.sampled_from(["description", "command", "environment", "bind_mounts"]).flatmap(
        lambda field: _case(field, st.none())
    ),
)
naive_datetimes = st.datetimes()
far_etas = st.datetimes(min_value=datetime(2100, 1, 1), timezones=st.just(UTC))
bad_call_options: st.SearchStrategy[Case] = st.one_of(
    _case("eta", st.one_of(naive_datetimes, far_etas, st.dates(), st.text(max_size=5))),
    _case(
        "countdown",
        st.one_of(
            non_finite,
            st.floats(min_value=MAX_SCHEDULE_SECONDS + 1, allow_infinity=False),
            st.integers(min_value=MAX_SCHEDULE_SECONDS + 1),
            huge_either_way,
            st.booleans(),
            st.text(max_size=3),
        ),
    ),
    _case(
        "priority",
        st.one_of(
            st.integers(max_value=-1), st.integers(min_value=101), huge, st.booleans(), non_finite
        ),
    ),
)


# -- helpers -----------------------------------------------------------------------------


def assert_refused(field: str, call: Callable[[], Any]) -> ValidationError:
    """``call`` raises a ValidationError naming ``field`` and saves no row."""
    before = ContainerJob.objects.count()
    with pytest.raises(ValidationError) as info:
        call()
    error = info.value
    assert hasattr(error, "error_dict"), f"no field named: {error!r}"
    assert field in error.error_dict, error.error_dict
    assert ContainerJob.objects.count() == before
    return error


def definition(overrides: dict[str, Any]) -> dict[str, Any]:
    return {**VALID, **overrides}


def _echo(text: str) -> str:
    return text


# The function's argument becomes the command, so a caller's bad input reaches validation.
echo_raw = container_task(image="busybox:latest", task_name="tests.entry_points.echo_raw")(_echo)


# -- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    ["localhost:5000/x", "registry.example.com/a/b:tag", "myhost:5000/x", "localhost/app"],
)
def test_registry_prefixes_that_docker_reads_as_registries(image: str) -> None:
    validate_image_reference(image)


@pytest.mark.parametrize("image", ["ABC/busybox", "Bad Image", "Localhost/app", "myhost/X"])
def test_refused_image_references(image: str) -> None:
    with pytest.raises(ValidationError):
        validate_image_reference(image)


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_definitions)
def test_full_clean(case: Case) -> None:
    field, overrides = case
    assert_refused(field, lambda: ContainerJob(**definition(overrides)).full_clean())


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_definitions)
def test_create_job(case: Case) -> None:
    field, overrides = case
    assert_refused(field, lambda: ContainerJob.objects.create_job(**definition(overrides)))


# -- job.delay() / job.apply_async() -----------------------------------------------------


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_definitions)
def test_delay_of_a_new_instance(case: Case) -> None:
    field, overrides = case
    assert_refused(field, lambda: ContainerJob(**definition(overrides)).delay())


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_definitions)
def test_delay_of_a_saved_then_changed_instance(case: Case) -> None:
    field, overrides = case
    job = ContainerJob.objects.create_job(**VALID)
    for name, value in overrides.items():
        setattr(job, name, value)
    assert_refused(field, job.delay)
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.docker_image, row.command) == (Status.PENDING, *VALID.values())


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_call_options, st.booleans())
def test_apply_async_options_of_new_and_saved_instances(case: Case, saved: bool) -> None:
    field, options = case
    job = ContainerJob.objects.create_job(**VALID) if saved else ContainerJob(**VALID)
    assert_refused(field, lambda: job.apply_async(**options))
    if saved:
        assert ContainerJob.objects.get(pk=job.pk).status == Status.PENDING


@pytest.mark.django_db
def test_bad_options_and_bad_definition_are_named_together() -> None:
    job = ContainerJob(docker_image="ABC/busybox", command="echo '")
    error = assert_refused("eta", lambda: job.apply_async(eta=datetime(2030, 1, 1), priority=True))
    assert {"eta", "priority", "docker_image", "command"} <= set(error.error_dict)


@pytest.mark.django_db
def test_delay_saves_a_changed_definition_with_the_queueing() -> None:
    job = ContainerJob.objects.create_job(**VALID)
    job.command = "echo changed"
    job.priority = 90
    job.apply_async(countdown=60)
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.command, row.priority, row.status) == ("echo changed", 90, Status.QUEUED)
    assert row.scheduled_for is not None and row.scheduled_for > timezone.now()


@pytest.mark.django_db
def test_negative_countdown_and_past_eta_mean_now() -> None:
    for options in ({"countdown": -5}, {"eta": timezone.now() - timedelta(days=1)}):
        job = ContainerJob(**VALID)
        job.apply_async(**options)
        job.refresh_from_db()
        assert job.status == Status.QUEUED and job.scheduled_for is None


# -- container_task ----------------------------------------------------------------------


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_definitions)
def test_container_task_at_decoration(case: Case) -> None:
    field, overrides = case
    options = definition(overrides)
    image = options.pop("docker_image")
    assert_refused(field, lambda: container_task(image=image, **options))


def test_container_task_names_every_bad_option_at_decoration() -> None:
    with pytest.raises(ValidationError) as info:
        container_task(image="Bad Image", priority=500, docker_host=True)
    assert {"docker_image", "priority", "docker_host"} <= set(info.value.error_dict)


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_commands)
def test_container_task_call_with_arguments_giving_bad_commands(command: str) -> None:
    assert_refused("command", lambda: echo_raw.delay(command))
    assert_refused("command", lambda: echo_raw.apply_async((command,), countdown=5))


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_call_options)
def test_container_task_call_with_bad_options(case: Case) -> None:
    field, options = case
    assert_refused(field, lambda: echo_raw.apply_async(("echo hi",), **options))


@pytest.mark.django_db
def test_container_task_whose_function_returns_no_string() -> None:
    def as_list() -> Any:
        return ["echo", "hi"]

    task = ContainerTask(as_list, {"docker_image": "busybox", "task_name": "tests.no_str"})
    assert_refused("command", task.delay)


@pytest.mark.django_db
def test_container_task_with_an_unknown_host() -> None:
    host = ExecutorHost.objects.create(name="known")
    for index, reference in enumerate(("no-such-host", host.pk + 1000)):
        options = {"docker_host": reference, "task_name": f"tests.entry_points.pinned{index}"}
        task = container_task(image="busybox", **options)(_echo)
        assert_refused("docker_host", lambda task=task: task.delay("echo hi"))
        assert_refused("docker_host", lambda task=task: task.build_job(("echo hi",), {}))


# -- canvas steps ------------------------------------------------------------------------


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_commands)
def test_signature_run_here_gives_a_readable_error(command: str) -> None:
    before = ContainerJob.objects.count()
    result = echo_raw.s(command).apply()
    with pytest.raises(InvalidJobDefinition, match=r"^command: "):
        result.get()
    assert ContainerJob.objects.count() == before


def test_invalid_job_definition_message_survives_json() -> None:
    from celery.backends.base import BaseBackend

    from .celery_app import app

    backend = BaseBackend(app, serializer="json")
    error = ValidationError({"docker_image": "'Bad Image' is not valid.", "priority": "Bad."})
    sent = backend.prepare_exception(InvalidJobDefinition.from_validation_error(error))
    back = backend.exception_to_python(sent)
    assert isinstance(back, InvalidJobDefinition)
    assert str(back) == "docker_image: 'Bad Image' is not valid.; priority: Bad."


# -- create_job_from, create_container_job, queue_job ------------------------------------


@pytest.mark.django_db
@HYPOTHESIS
@given(bad_definitions, st.booleans())
def test_create_job_from_and_create_container_job(case: Case, as_task: bool) -> None:
    field, overrides = case
    create = create_container_job.run if as_task else create_job_from
    assert_refused(field, lambda: create(None, **definition(overrides)))


@pytest.mark.django_db
@HYPOTHESIS
@given(
    st.one_of(
        st.uuids().map(str),
        st.text(max_size=20).filter(lambda s: s != ""),
        st.integers(min_value=1),
    )
)
def test_missing_template_is_named(template: Any) -> None:
    assert_refused("template", lambda: create_container_job.run(template))
    assert_refused("template", lambda: create_job_from(template, command="echo hi"))


@pytest.mark.django_db
@HYPOTHESIS
@given(
    st.one_of(
        st.text(max_size=20).filter(lambda s: s != "known"),
        st.integers(),
        huge,
        st.booleans(),
        st.floats(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_unknown_docker_host_is_named(reference: Any) -> None:
    ExecutorHost.objects.get_or_create(name="known")
    template = ContainerJob.objects.create_job(**VALID)
    assert_refused("docker_host", lambda: create_job_from(None, **VALID, docker_host=reference))
    assert_refused(
        "docker_host", lambda: create_container_job.run(str(template.pk), docker_host=reference)
    )


@pytest.mark.django_db
def test_template_overrides_are_validated_and_good_ones_queue() -> None:
    template = ContainerJob.objects.create_job(**VALID, name="nightly")
    assert_refused("command", lambda: create_container_job.run(str(template.pk), command="'"))
    job_id = create_container_job.run(str(template.pk), command="echo from beat")
    job = ContainerJob.objects.get(pk=job_id)
    assert (job.name, job.command, job.status) == ("nightly", "echo from beat", Status.QUEUED)


@pytest.mark.django_db
@HYPOTHESIS
@given(
    st.one_of(
        st.integers(max_value=-1), st.integers(min_value=101), huge, st.booleans(), non_finite
    )
)
def test_queue_job_priority(priority: Any) -> None:
    job = ContainerJob.objects.create_job(**VALID)
    assert_refused("priority", lambda: queue_manager.queue_job(job, priority=priority))
    assert ContainerJob.objects.get(pk=job.pk).status == Status.PENDING


# -- a canvas step in a real worker ------------------------------------------------------


@pytest.fixture
def worker_log(broker_url: str) -> Iterator[Callable[[], str]]:
    with celery_cluster(broker_url) as cluster:
        proc = cluster.worker("entry", concurrency=1)
        yield lambda: proc.log_path.read_text(errors="replace")


@pytest.mark.celery
@pytest.mark.django_db(transaction=True)
def test_invalid_step_in_a_chain_fails_readably_in_a_real_worker(
    worker_log: Callable[[], str],
) -> None:
    from .container_tasks import shell_line, shout

    result = chain(shell_line.s("echo 'unterminated"), shout.s()).apply_async()
    with pytest.raises(InvalidJobDefinition) as info:
        result.get(timeout=60)
    assert str(info.value) == (
        "command: The command cannot be split into arguments: No closing quotation."
    )
    step = result.parent
    assert step is not None
    logged = f"{step.id}] raised expected: InvalidJobDefinition"
    wait_for(lambda: logged in worker_log(), 10, message=f"not logged as expected: {logged}")
    log = worker_log()
    assert "Traceback" not in log, log
    assert not ContainerJob.objects.exists()
