"""The admin console through Django's test client, against real PostgreSQL.

Every action and view is run by a user who may and by one who may not; the in-memory
executor stands in for Docker except where the daemon check needs a real one.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from django_container_celery.admin import EstimatedCountPaginator, parse_job_id
from django_container_celery.admin.filters import QUEUE_STATUS_CHOICES, queue_status_q
from django_container_celery.admin.forms import ScheduleForm, parse_environment
from django_container_celery.admin.logs import redact
from django_container_celery.admin.outcome import ERROR_HEAD_CHARS
from django_container_celery.executors import ContainerSpec, reset_memory_executor
from django_container_celery.executors.memory import FakeRun, MemoryExecutor
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.states import Status
from django_container_celery.validators import MASK

from .admin_support import job_form_data, staff_client

pytestmark = pytest.mark.django_db

APP = "django_container_celery"
CHANGELIST = f"admin:{APP}_containerjob_changelist"
HOSTS_CHANGELIST = f"admin:{APP}_executorhost_changelist"
OPERATOR_PERMS = (
    "view_containerjob",
    "change_containerjob",
    "queue_containerjob",
    "cancel_containerjob",
)

_names = itertools.count()


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def memory_docker(settings: Any) -> MemoryExecutor:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "memory"}
    return reset_memory_executor()


ClientFactory = Callable[..., Client]


@pytest.fixture
def client_with(django_user_model: Any) -> ClientFactory:
    """A logged-in staff client holding exactly the given permission codenames."""

    def make(*codenames: str) -> Client:
        return staff_client(django_user_model, *codenames)

    return make


@pytest.fixture
def operator(client_with: ClientFactory) -> Client:
    return client_with(*OPERATOR_PERMS)


@pytest.fixture
def viewer(client_with: ClientFactory) -> Client:
    return client_with("view_containerjob", "view_executorhost")


@pytest.fixture
def editor(client_with: ClientFactory) -> Client:
    """May change jobs but holds neither the queue nor the cancel permission."""
    return client_with("view_containerjob", "change_containerjob")


@pytest.fixture
def stranger(client_with: ClientFactory) -> Client:
    return client_with()


def make_job(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "echo hi")
    fields.setdefault("name", f"job-{next(_names)}")
    return ContainerJob.objects.create(**fields)


def url(name: str, *args: Any) -> str:
    return reverse(f"admin:{APP}_containerjob_{name}", args=args)


def changelist(query: str = "") -> str:
    return reverse(CHANGELIST) + (f"?{query}" if query else "")


def post_action(client: Client, action: str, jobs: list[ContainerJob], **extra: Any) -> Any:
    data = {"action": action, "_selected_action": [str(job.pk) for job in jobs], "index": "0"}
    data.update(extra)
    return client.post(changelist(), data)


def texts(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def shown_ids(response: Any) -> set[uuid.UUID]:
    return {job.pk for job in response.context["cl"].result_list}


def reload(job: ContainerJob) -> ContainerJob:
    return ContainerJob.objects.get(pk=job.pk)


# -- queue status: the filter and the property agree ---------------------------------------


def queue_status_cases() -> dict[str, tuple[ContainerJob, str]]:
    now = timezone.now()
    past, future = now - timedelta(minutes=5), now + timedelta(hours=1)
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "new": ({"status": Status.PENDING}, "not_queued"),
        "dequeued after a retry that ran": (
            {"status": Status.PENDING, "launched_at": past},
            "not_queued",
        ),
        "cancelled before launch": ({"status": Status.CANCELLED}, "not_queued"),
        "queued now": ({"status": Status.QUEUED, "queued_at": past}, "queued"),
        "queued, due": (
            {"status": Status.QUEUED, "queued_at": past, "scheduled_for": past},
            "queued",
        ),
        "queued for later": (
            {"status": Status.QUEUED, "queued_at": past, "scheduled_for": future},
            "scheduled",
        ),
        "retry backing off": (
            {"status": Status.RETRYING, "queued_at": past, "scheduled_for": future},
            "scheduled",
        ),
        "retry due": (
            {"status": Status.RETRYING, "queued_at": past, "scheduled_for": past},
            "queued",
        ),
        "launching": ({"status": Status.LAUNCHING, "queued_at": past}, "queued"),
        "running": ({"status": Status.RUNNING, "launched_at": past}, "launched"),
        "completed": ({"status": Status.COMPLETED, "launched_at": past}, "launched"),
        "failed after running": ({"status": Status.FAILED, "launched_at": past}, "launched"),
        "cancelled while running": (
            {"status": Status.CANCELLED, "launched_at": past},
            "launched",
        ),
        "failed to launch": ({"status": Status.FAILED, "queued_at": past}, "launch_failed"),
    }
    return {name: (make_job(**fields), expected) for name, (fields, expected) in cases.items()}


def test_queue_status_filter_agrees_with_property() -> None:
    cases = queue_status_cases()
    for name, (job, expected) in cases.items():
        assert job.queue_status == expected, name
    seen: set[uuid.UUID] = set()
    for value, _label in QUEUE_STATUS_CHOICES:
        condition = queue_status_q(value)
        assert condition is not None
        filtered = set(ContainerJob.objects.filter(condition).values_list("pk", flat=True))
        by_property = {job.pk for job, _ in cases.values() if job.queue_status == value}
        assert filtered == by_property, value
        assert not filtered & seen, f"{value} overlaps another queue status"
        seen |= filtered
    assert seen == {job.pk for job, _ in cases.values()}, "every job has one queue status"


def test_queue_status_filter_in_changelist(admin_client: Client) -> None:
    cases = queue_status_cases()
    for value, _label in QUEUE_STATUS_CHOICES:
        response = admin_client.get(changelist(f"queue_status={value}"))
        assert response.status_code == 200
        assert shown_ids(response) == {
            job.pk for job, expected in cases.values() if expected == value
        }
    assert not shown_ids(admin_client.get(changelist("queue_status=bogus")))


def test_other_filters(admin_client: Client) -> None:
    host_a = ExecutorHost.objects.create(name="a")
    host_b = ExecutorHost.objects.create(name="b")
    high = make_job(priority=90, assigned_host=host_a, status=Status.RUNNING)
    normal = make_job(priority=50, docker_host=host_b)
    low = make_job(priority=10, status=Status.FAILED, completed_at=timezone.now())
    old = make_job(priority=50)
    ContainerJob.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=400))
    expectations = {
        "priority_band=high": {high.pk},
        "priority_band=normal": {normal.pk, old.pk},
        "priority_band=low": {low.pk},
        f"host={host_a.pk}": {high.pk},
        f"host={host_b.pk}": {normal.pk},
        "host=none": {low.pk, old.pk},
        "status__exact=failed": {low.pk},
        "completed_at__isnull=False": {low.pk},
    }
    for query, expected in expectations.items():
        response = admin_client.get(changelist(query))
        assert response.status_code == 200, query
        assert shown_ids(response) == expected, query
    week = urlencode({"created_at__gte": (timezone.now() - timedelta(days=7)).isoformat()})
    recent = admin_client.get(changelist(week))
    assert shown_ids(recent) == {high.pk, normal.pk, low.pk}


def test_search_by_name_image_command_and_id(admin_client: Client) -> None:
    report = make_job(name="nightly-report", docker_image="registry.local/report:1")
    other = make_job(name="other", command="python manage.py crunch", attempt=2)
    searches = {
        "nightly": {report.pk},
        "report:1": {report.pk},
        "crunch": {other.pk},
        str(other.pk): {other.pk},
        other.container_name: {other.pk},
    }
    for term, expected in searches.items():
        response = admin_client.get(changelist(f"q={term}"))
        assert shown_ids(response) == expected, term
    assert parse_job_id("not-an-id") is None
    assert parse_job_id(f"dcc-{report.pk}-a3") == report.pk


# -- the list: speed and masking --------------------------------------------------------


def changelist_queries(client: Client, query: str = "") -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(changelist(query))
    assert response.status_code == 200
    return [entry["sql"] for entry in captured.captured_queries]


def test_changelist_query_count_does_not_grow_with_rows(
    admin_client: Client, operator: Client
) -> None:
    hosts = [ExecutorHost.objects.create(name=f"h{i}") for i in range(2)]
    statuses = [Status.PENDING, Status.QUEUED, Status.RUNNING, Status.FAILED, Status.COMPLETED]

    def add(count: int) -> None:
        for i in range(count):
            make_job(
                status=statuses[i % len(statuses)],
                assigned_host=hosts[i % 2],
                docker_host=hosts[(i + 1) % 2],
                environment={"API_TOKEN": "abcdef", "MODE": "x"},
            )

    add(5)
    few = {
        "superuser": len(changelist_queries(admin_client)),
        "operator": len(changelist_queries(operator)),
        "filtered": len(changelist_queries(admin_client, "queue_status=queued&q=job")),
    }
    add(25)
    many = {
        "superuser": len(changelist_queries(admin_client)),
        "operator": len(changelist_queries(operator)),
        "filtered": len(changelist_queries(admin_client, "queue_status=queued&q=job")),
    }
    assert few == many
    # session, user, host filter choices, the planner's estimate (too small here, so an
    # exact count follows), rows, the page's error heads; the operator adds two
    # permission queries
    assert many["superuser"] <= 7
    assert many["operator"] <= 9


def test_unfiltered_count_comes_from_planner_estimate(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(30):
        make_job()
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {ContainerJob._meta.db_table}")
    monkeypatch.setattr(EstimatedCountPaginator, "estimate_above", 10)

    sql = changelist_queries(admin_client)
    assert any("reltuples" in statement for statement in sql)
    assert not any("COUNT(*)" in statement.upper() for statement in sql)
    response = admin_client.get(changelist())
    assert response.context["cl"].result_count == 30
    assert "about 30" in response.content.decode()

    filtered = changelist_queries(admin_client, "status__exact=pending")
    assert not any("reltuples" in statement for statement in filtered)
    assert any("COUNT(" in statement.upper() for statement in filtered)


def test_a_filtered_list_is_counted_exactly_up_to_a_cap_then_estimated(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(12):
        make_job(name=f"nightly-{index}" if index < 9 else f"adhoc-{index}")
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {ContainerJob._meta.db_table}")
    monkeypatch.setattr(EstimatedCountPaginator, "exact_up_to", 5)

    many = admin_client.get(changelist("q=nightly"))
    # Counting stopped after the cap: the page says "about" and at least the cap plus one.
    assert many.context["cl"].paginator.count_is_estimate
    assert many.context["cl"].result_count >= 6
    assert "about" in many.content.decode()
    assert len(many.context["cl"].result_list) == 9

    few = admin_client.get(changelist("q=adhoc"))
    assert not few.context["cl"].paginator.count_is_estimate
    assert few.context["cl"].result_count == 3


def test_small_table_is_counted_exactly(admin_client: Client) -> None:
    make_job()
    sql = changelist_queries(admin_client)
    assert any("COUNT(" in statement.upper() for statement in sql)
    assert "about" not in admin_client.get(changelist()).content.decode()


def test_changelist_masks_secrets_and_never_loads_logs(admin_client: Client) -> None:
    make_job(
        environment={"DB_PASSWORD": "hunter22", "MODE": "fast"},
        status=Status.FAILED,
        exit_code=3,
        last_error="login refused for hunter22 " + "y" * 5000,
        stdout_log="x" * 5000,
    )
    sql = changelist_queries(admin_client)
    rows_query = next(s for s in sql if '"docker_image"' in s)
    assert '"stdout_log"' not in rows_query and '"last_error"' not in rows_query
    # Only the head of each error is read, and only for the page's own rows.
    (heads_query,) = [s for s in sql if "SUBSTR" in s.upper()]
    assert " IN (" in heads_query
    content = admin_client.get(changelist()).content.decode()
    assert "hunter22" not in content
    assert f"login refused for {MASK}" in content
    assert "y" * 400 not in content


def test_changelist_shows_exit_code_and_only_current_errors(admin_client: Client) -> None:
    make_job(name="broke", status=Status.FAILED, exit_code=7, last_error="exit seven")
    make_job(
        name="recovered",
        status=Status.COMPLETED,
        exit_code=0,
        retry_count=1,
        last_error="first attempt died",
    )
    make_job(name="waiting", status=Status.RETRYING, exit_code=2, last_error="try again")
    # A cancel writes no error: the one it has is an earlier attempt's.
    make_job(name="stopped", status=Status.CANCELLED, last_error="code 3 earlier")
    content = admin_client.get(changelist()).content.decode()
    assert "code 3 earlier" not in content
    assert 'dcc-exit-bad">7<' in content
    assert 'dcc-exit-ok">0<' in content
    assert "exit seven" in content and "try again" in content
    # A completed job's error belongs to an earlier attempt: history, not its state.
    assert "first attempt died" not in content


def test_an_error_head_cut_inside_a_secret_shows_none_of_it(admin_client: Client) -> None:
    secret = "S3CR3T-abcdefghijklmnopqrstuvwxyz0123456789"
    # The head read for the list ends 20 characters into the secret.
    error = "failed:" + "\n" * (ERROR_HEAD_CHARS - 7 - 20) + secret
    make_job(status=Status.FAILED, environment={"API_TOKEN": secret}, last_error=error)
    content = admin_client.get(changelist()).content.decode()
    assert secret[:8] not in content
    assert MASK in content


def test_changelist_view_permission(viewer: Client, stranger: Client) -> None:
    make_job()
    assert viewer.get(changelist()).status_code == 200
    assert stranger.get(changelist()).status_code == 403


# -- bulk actions -------------------------------------------------------------------------


def test_queue_action(operator: Client, editor: Client, viewer: Client) -> None:
    pending = make_job()
    queued = make_job(status=Status.QUEUED, name="already")
    done = make_job(status=Status.COMPLETED, name="finished")
    for forbidden in (editor, viewer):
        assert post_action(forbidden, "queue_jobs", [pending]).status_code == 403
    assert reload(pending).status == Status.PENDING

    response = post_action(operator, "queue_jobs", [pending, queued, done])
    assert response.status_code == 302
    assert reload(pending).status == Status.QUEUED
    assert reload(pending).queued_at is not None
    messages = texts(response)
    assert "Queued 1 job." in messages
    assert any(
        "Skipped 2 jobs" in m and "already queued (already)" in m and "already completed" in m
        for m in messages
    )


def test_dequeue_action(operator: Client, editor: Client) -> None:
    queued = make_job(status=Status.QUEUED, queued_at=timezone.now())
    running = make_job(status=Status.RUNNING)
    assert post_action(editor, "dequeue_jobs", [queued]).status_code == 403
    response = post_action(operator, "dequeue_jobs", [queued, running])
    job = reload(queued)
    assert (job.status, job.queued_at) == (Status.PENDING, None)
    assert reload(running).status == Status.RUNNING
    assert "Dequeued 1 job." in texts(response)
    assert any("already running" in m for m in texts(response))


def test_cancel_action_stops_running_container(
    operator: Client, client_with: ClientFactory, memory_docker: MemoryExecutor
) -> None:
    running = make_job(status=Status.RUNNING, attempt=1, launched_at=timezone.now())
    memory_docker.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    memory_docker.start(
        ContainerSpec(
            name=running.container_name, image="busybox", command=None, environment={}, labels={}
        )
    )
    pending = make_job()
    done = make_job(status=Status.COMPLETED)
    queuer = client_with("view_containerjob", "change_containerjob", "queue_containerjob")
    assert post_action(queuer, "cancel_jobs", [running]).status_code == 403
    assert reload(running).status == Status.RUNNING

    response = post_action(operator, "cancel_jobs", [running, pending, done])
    assert reload(running).status == Status.CANCELLED
    assert reload(pending).status == Status.CANCELLED
    assert running.container_name in memory_docker.stopped
    assert "Cancelled 2 jobs." in texts(response)
    assert any("already completed" in m for m in texts(response))


@pytest.mark.parametrize(
    ("action", "expected_count"),
    [("retry_failed_jobs", 3), ("retry_failed_jobs_reset_count", 0)],
)
def test_retry_failed_actions(
    operator: Client, editor: Client, action: str, expected_count: int
) -> None:
    failed = make_job(status=Status.FAILED, retry_count=3, completed_at=timezone.now())
    pending = make_job()
    assert post_action(editor, action, [failed]).status_code == 403
    response = post_action(operator, action, [failed, pending])
    job = reload(failed)
    assert (job.status, job.retry_count, job.completed_at) == (
        Status.QUEUED,
        expected_count,
        None,
    )
    assert any(m.startswith("Queued again") and "1 job" in m for m in texts(response))
    assert any("not failed (pending)" in m for m in texts(response))


@pytest.mark.parametrize(
    ("action", "value"),
    [("set_priority_high", 80), ("set_priority_normal", 50), ("set_priority_low", 20)],
)
def test_priority_actions(editor: Client, viewer: Client, action: str, value: int) -> None:
    pending = make_job(priority=35)
    queued = make_job(priority=35, status=Status.QUEUED)
    running = make_job(priority=35, status=Status.RUNNING)
    assert post_action(viewer, action, [pending]).status_code == 403
    response = post_action(editor, action, [pending, queued, running])
    assert reload(pending).priority == value
    assert reload(queued).priority == value
    assert reload(running).priority == 35
    assert f"Set priority {value} on 2 jobs." in texts(response)
    assert any("already running" in m for m in texts(response))


def test_schedule_for_later_through_its_form(operator: Client, editor: Client) -> None:
    pending = make_job(name="later-one")
    earlier = timezone.now() - timedelta(minutes=10)
    queued = make_job(status=Status.QUEUED, queued_at=earlier)
    done = make_job(status=Status.COMPLETED)
    jobs = [pending, queued, done]
    assert post_action(editor, "schedule_for_later", jobs).status_code == 403

    form_page = post_action(operator, "schedule_for_later", jobs)
    assert form_page.status_code == 200
    content = form_page.content.decode()
    assert 'type="datetime-local"' in content and "later-one" in content

    past = post_action(
        operator, "schedule_for_later", jobs, apply="1", scheduled_for="2001-01-01T10:00"
    )
    assert past.status_code == 200
    assert "Choose a time in the future" in past.content.decode()
    assert reload(pending).status == Status.PENDING

    when = (timezone.now() + timedelta(days=2)).replace(second=0, microsecond=0)
    response = post_action(
        operator,
        "schedule_for_later",
        jobs,
        apply="1",
        scheduled_for=timezone.localtime(when).strftime("%Y-%m-%dT%H:%M"),
    )
    assert response.status_code == 302
    first, second = reload(pending), reload(queued)
    assert (first.status, first.scheduled_for, first.queue_status) == (
        Status.QUEUED,
        when,
        "scheduled",
    )
    assert (second.scheduled_for, second.queued_at) == (when, earlier)
    assert reload(done).scheduled_for is None
    assert any("2 jobs" in m for m in texts(response))
    assert any("already completed" in m for m in texts(response))


def test_schedule_form_rejects_the_past() -> None:
    form = ScheduleForm({"scheduled_for": "2001-01-01T10:00"})
    assert not form.is_valid()
    assert ScheduleForm.default_time() > timezone.now()


def test_delete_without_permission_is_refused(operator: Client) -> None:
    job = make_job()
    assert post_action(operator, "delete_selected", [job]).status_code == 403
    assert ContainerJob.objects.filter(pk=job.pk).exists()


# -- per-row buttons ----------------------------------------------------------------------


def test_row_buttons_follow_permissions(operator: Client, viewer: Client, editor: Client) -> None:
    make_job()
    make_job(status=Status.FAILED)
    page = operator.get(changelist()).content.decode()
    assert 'form="dcc-row-action-form"' in page
    assert "/operation/queue/" in page and "/operation/retry/" in page
    assert "/operation/cancel/" in page
    assert 'id="dcc-row-action-form"' in page
    for client in (viewer, editor):
        assert "/operation/" not in client.get(changelist()).content.decode()


def test_row_operation(operator: Client, editor: Client, viewer: Client) -> None:
    job = make_job()
    target = url("operation", job.pk, "queue")
    back = changelist("queue_status=not_queued")
    for forbidden in (editor, viewer):
        assert forbidden.post(target, {"next": back}).status_code == 403
    assert operator.get(target).status_code == 405
    response = operator.post(target, {"next": back})
    assert response.status_code == 302 and response["Location"] == back
    assert reload(job).status == Status.QUEUED
    assert "Queued 1 job." in texts(response)

    again = operator.post(target, {"next": "https://elsewhere.example/"})
    assert again["Location"] == changelist()
    assert any("already queued" in m for m in texts(again))

    cancel = operator.post(url("operation", job.pk, "cancel"))
    assert cancel.status_code == 302 and reload(job).status == Status.CANCELLED
    assert operator.post(url("operation", job.pk, "explode")).status_code == 404
    assert operator.post(url("operation", "not-a-uuid", "queue")).status_code == 404
    assert operator.post(url("operation", uuid.uuid4(), "queue")).status_code == 404


def test_row_operation_needs_csrf_token(django_user_model: Any) -> None:
    job = make_job()
    user = django_user_model.objects.create_superuser("boss", password="pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(url("operation", job.pk, "queue")).status_code == 403
    assert reload(job).status == Status.PENDING


def test_change_page_offers_operations(operator: Client, viewer: Client) -> None:
    job = make_job(status=Status.FAILED)
    page = operator.get(url("change", job.pk)).content.decode()
    assert url("operation", job.pk, "retry") in page
    assert "/operation/" not in viewer.get(url("change", job.pk)).content.decode()


# -- dashboard and logs ---------------------------------------------------------------------


def test_dashboard(admin_client: Client, viewer: Client, stranger: Client) -> None:
    host = ExecutorHost.objects.create(name="docker-1", max_concurrent_jobs=3)
    make_job(status=Status.RUNNING, assigned_host=host)
    make_job(status=Status.LAUNCHING, assigned_host=host)
    make_job(status=Status.RUNNING)  # on the default host
    oldest = make_job(
        name="oldest-waiting",
        status=Status.QUEUED,
        queued_at=timezone.now() - timedelta(hours=2),
    )
    make_job(status=Status.QUEUED, queued_at=timezone.now())
    make_job(
        status=Status.QUEUED,
        queued_at=timezone.now(),
        scheduled_for=timezone.now() + timedelta(hours=1),
    )
    make_job(status=Status.FAILED, completed_at=timezone.now() - timedelta(minutes=5))
    make_job(status=Status.FAILED, completed_at=timezone.now() - timedelta(hours=3))

    response = admin_client.get(url("dashboard"))
    assert response.status_code == 200
    context = response.context
    assert context["stats"]["queue_depth"] == 3
    assert context["stats"]["ready_now"] == 2
    assert context["stats"]["scheduled_future"] == 1
    assert context["failed_last_hour"] == 1
    assert context["oldest"].pk == oldest.pk
    assert context["default_host_running"] == 1
    (row,) = context["hosts"]
    assert (row["running"], row["capacity"]) == (2, 3)
    page = response.content.decode()
    assert "2 / 3" in page and "oldest-waiting" in page

    assert viewer.get(url("dashboard")).status_code == 200
    assert stranger.get(url("dashboard")).status_code == 403
    assert url("dashboard") in admin_client.get(changelist()).content.decode()


def test_dashboard_query_count_is_fixed(admin_client: Client) -> None:
    hosts = [ExecutorHost.objects.create(name=f"h{i}") for i in range(3)]
    for host in hosts:
        make_job(status=Status.RUNNING, assigned_host=host)
    with CaptureQueriesContext(connection) as captured:
        admin_client.get(url("dashboard"))
    first = len(captured)
    for host in hosts:
        make_job(status=Status.RUNNING, assigned_host=host)
    ExecutorHost.objects.create(name="h-extra")
    with CaptureQueriesContext(connection) as captured:
        admin_client.get(url("dashboard"))
    assert len(captured) == first


def test_full_log_view(admin_client: Client, viewer: Client, stranger: Client) -> None:
    log = "start\n" + "line\n" * 1000 + "token is s3cr3t-value\nend\n"
    job = make_job(stdout_log=log, stderr_log="oops\n", environment={"API_TOKEN": "s3cr3t-value"})
    response = viewer.get(url("logs", job.pk, "stdout"))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    body = response.content.decode()
    assert body.startswith("start\n") and body.endswith("end\n")
    assert "s3cr3t-value" not in body and f"token is {MASK}" in body
    assert viewer.get(url("logs", job.pk, "stderr")).content == b"oops\n"
    assert viewer.get(url("logs", job.pk, "env")).status_code == 404
    assert viewer.get(url("logs", uuid.uuid4(), "stdout")).status_code == 404
    assert stranger.get(url("logs", job.pk, "stdout")).status_code == 403

    page = admin_client.get(url("change", job.pk)).content.decode()
    assert url("logs", job.pk, "stdout") in page
    assert "Showing the last 2000 characters." in page
    assert "s3cr3t-value" not in page


def test_redact_leaves_short_values() -> None:
    env = {"PASSWORD": "pw", "SECRET": "longer-secret", "MODE": "longer-secret-mode"}
    assert redact("pw longer-secret", env) == f"pw {MASK}"


# -- the change form ------------------------------------------------------------------------


def form_data(job: ContainerJob, **changes: Any) -> dict[str, Any]:
    shown = "\n".join(f"{k}={MASK if 'PASSWORD' in k else v}" for k, v in job.environment.items())
    return job_form_data(job, changes.pop("environment", shown), **changes)


def test_change_form_masks_and_keeps_secrets(operator: Client) -> None:
    job = make_job(environment={"DB_PASSWORD": "hunter22", "MODE": "fast"})
    page = operator.get(url("change", job.pk)).content.decode()
    assert "hunter22" not in page
    assert f"DB_PASSWORD={MASK}" in page

    response = operator.post(url("change", job.pk), form_data(job, name="renamed"))
    assert response.status_code == 302, response.content.decode()[:2000]
    saved = reload(job)
    assert saved.name == "renamed"
    assert saved.environment == {"DB_PASSWORD": "hunter22", "MODE": "fast"}

    operator.post(
        url("change", job.pk),
        form_data(job, environment=f"DB_PASSWORD=new-one\nMODE=slow\nEXTRA={MASK}x"),
    )
    assert reload(job).environment == {
        "DB_PASSWORD": "new-one",
        "MODE": "slow",
        "EXTRA": f"{MASK}x",
    }


def test_environment_errors_name_the_line(operator: Client) -> None:
    job = make_job()
    response = operator.post(
        url("change", job.pk),
        form_data(job, environment="GOOD=1\nno equals sign\n9BAD=x\nGOOD=2\nNEW_TOKEN=" + MASK),
    )
    assert response.status_code == 200
    content = response.content.decode()
    assert "Line 2: &#x27;no equals sign&#x27; has no &#x27;=&#x27;" in content
    assert "Line 3: &#x27;9BAD&#x27; is not a valid variable name" in content
    assert "Line 4: &#x27;GOOD&#x27; is already set on line 1." in content
    assert reload(job).environment == {}


def test_parse_environment() -> None:
    # Spaces around a name are ignored; the value is kept exactly as typed.
    assert parse_environment("# comment\n\nA=1\n B = two words \nURL=a=b\nEMPTY=") == {
        "A": "1",
        "B": " two words ",
        "URL": "a=b",
        "EMPTY": "",
    }


def test_save_writes_only_changed_definition_fields(operator: Client) -> None:
    job = make_job(status=Status.QUEUED, queued_at=timezone.now())
    data = form_data(job, name="new-name")
    # A worker records an attempt between the form's display and its submission.
    ContainerJob.objects.filter(pk=job.pk).update(retry_count=2, last_error="daemon down")
    with CaptureQueriesContext(connection) as captured:
        response = operator.post(url("change", job.pk), data)
    assert response.status_code == 302
    updates = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("UPDATE")]
    job_updates = [sql for sql in updates if ContainerJob._meta.db_table in sql]
    assert len(job_updates) == 1
    assert '"name"' in job_updates[0] and '"updated_at"' in job_updates[0]
    for column in ("status", "retry_count", "last_error", "queued_at", "environment"):
        assert f'"{column}"' not in job_updates[0].split("WHERE")[0]
    saved = reload(job)
    assert (saved.name, saved.retry_count, saved.last_error) == ("new-name", 2, "daemon down")


def test_definition_locked_once_launched(operator: Client) -> None:
    job = make_job(
        status=Status.RUNNING,
        environment={"API_KEY": "k-123456", "MODE": "fast"},
        launched_at=timezone.now(),
    )
    page = operator.get(url("change", job.pk)).content.decode()
    assert 'name="docker_image"' not in page and 'name="_save"' not in page
    assert "can no longer be edited" in page
    assert "k-123456" not in page and f"API_KEY={MASK}" in page

    response = operator.post(url("change", job.pk), form_data(job, docker_image="evil:latest"))
    assert response.status_code == 302
    assert reload(job).docker_image == "busybox:latest"
    assert any("were not saved" in m for m in texts(response))


def test_job_started_while_form_was_open(operator: Client) -> None:
    job = make_job(status=Status.QUEUED, queued_at=timezone.now())
    data = form_data(job, command="echo changed")
    ContainerJob.objects.filter(pk=job.pk).update(status=Status.LAUNCHING, claimed_by="w1")
    response = operator.post(url("change", job.pk), data)
    assert reload(job).command == "echo hi"
    assert any("were not saved" in m for m in texts(response))


def test_viewer_sees_masked_read_only_job(viewer: Client) -> None:
    job = make_job(environment={"SECRET_X": "abcdefgh"})
    page = viewer.get(url("change", job.pk)).content.decode()
    assert "abcdefgh" not in page and f"SECRET_X={MASK}" in page
    assert viewer.post(url("change", job.pk), form_data(job, name="x")).status_code == 403


def test_add_job(operator: Client, client_with: ClientFactory) -> None:
    adder = client_with("add_containerjob", "view_containerjob")
    data = form_data(
        ContainerJob(name="fresh", docker_image="busybox:latest", command="echo 1"),
        environment="MODE=fast\nAPI_TOKEN=tok-1",
    )
    response = adder.post(url("add"), data)
    assert response.status_code == 302, response.content.decode()[:3000]
    job = ContainerJob.objects.get(name="fresh")
    assert job.status == Status.PENDING
    assert job.environment == {"MODE": "fast", "API_TOKEN": "tok-1"}
    assert job.created_by is not None
    assert operator.post(url("add"), data).status_code == 403

    bad = adder.post(url("add"), {**data, "name": "bad", "docker_image": "Not An Image"})
    assert bad.status_code == 200 and "not a valid Docker image reference" in (bad.content.decode())


# -- executor hosts -------------------------------------------------------------------------


def test_host_list_shows_load_in_one_query(admin_client: Client) -> None:
    hosts = [ExecutorHost.objects.create(name=f"host-{i}", max_concurrent_jobs=5) for i in range(3)]
    make_job(status=Status.RUNNING, assigned_host=hosts[0])
    make_job(status=Status.LAUNCHING, assigned_host=hosts[0])
    make_job(status=Status.COMPLETED, assigned_host=hosts[0])
    make_job(status=Status.RUNNING, assigned_host=hosts[1])
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(HOSTS_CHANGELIST))
    page = response.content.decode()
    assert "2 / 5" in page and "1 / 5" in page and "0 / 5" in page
    # session, user, two counts, hosts with their load, every host's memory and CPU use
    assert len(captured) <= 6


@pytest.fixture
def hosts_admin(client_with: ClientFactory) -> Client:
    return client_with("view_executorhost", "change_executorhost")


@pytest.mark.docker
def test_check_daemon_action(
    hosts_admin: Client, viewer: Client, settings: Any, docker_client: Any
) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "docker"}
    good = ExecutorHost.objects.create(name="local", connection_string=settings.DOCKER_HOST)
    bad = ExecutorHost.objects.create(name="nowhere", connection_string="tcp://127.0.0.1:1")
    data = {"action": "check_daemon", "_selected_action": [good.pk, bad.pk], "index": "0"}
    assert viewer.post(reverse(HOSTS_CHANGELIST), data).status_code == 403
    response = hosts_admin.post(reverse(HOSTS_CHANGELIST), data)
    assert response.status_code == 302
    messages = texts(response)
    assert any(m.startswith("local: the Docker daemon") and "answers" in m for m in messages)
    assert any(m.startswith("nowhere: no answer from tcp://127.0.0.1:1") for m in messages)


def test_host_views_permissions(hosts_admin: Client, stranger: Client) -> None:
    host = ExecutorHost.objects.create(name="h")
    assert hosts_admin.get(reverse(HOSTS_CHANGELIST)).status_code == 200
    change = reverse(f"admin:{APP}_executorhost_change", args=[host.pk])
    assert "0 / 10" in hosts_admin.get(change).content.decode()
    assert stranger.get(reverse(HOSTS_CHANGELIST)).status_code == 403
    assert stranger.get(change).status_code == 403


def test_a_running_retry_says_whose_logs_are_stored(admin_client: Client) -> None:
    job = make_job(status=Status.RUNNING, attempt=2, stdout_log="first attempt said this")
    page = admin_client.get(url("change", job.pk)).content.decode()
    assert "Stored when attempt 1 ended; attempt 2 has not ended yet." in page
    ended = make_job(status=Status.FAILED, attempt=2, stdout_log="second attempt said this")
    assert "has not ended yet" not in admin_client.get(url("change", ended.pk)).content.decode()
