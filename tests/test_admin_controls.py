"""The operator's controls in the admin, through Django's test client against PostgreSQL:
lanes and their pause switch, host health, jobs that need attention, and the lane of a
job on its form.

Each control is run by a user who may and by one who may not.
"""

from __future__ import annotations

import itertools
import re
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

from django_container_celery import lanes
from django_container_celery.executors import reset_memory_executor
from django_container_celery.executors.memory import MemoryExecutor
from django_container_celery.models import ContainerJob, ExecutorHost, JobAttempt, Lane
from django_container_celery.states import Status

from .admin_support import job_form_data, staff_client

pytestmark = pytest.mark.django_db

APP = "django_container_celery"
LANES = f"admin:{APP}_lane_changelist"
HOSTS = f"admin:{APP}_executorhost_changelist"
JOBS = f"admin:{APP}_containerjob_changelist"
OPERATOR_PERMS = (
    "view_containerjob",
    "change_containerjob",
    "add_containerjob",
    "queue_containerjob",
    "cancel_containerjob",
)

_names = itertools.count()

ClientFactory = Callable[..., Client]


@pytest.fixture(autouse=True)
def memory_docker(settings: Any) -> MemoryExecutor:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "memory"}
    return reset_memory_executor()


@pytest.fixture
def client_with(django_user_model: Any) -> ClientFactory:
    def make(*codenames: str) -> Client:
        return staff_client(django_user_model, *codenames)

    return make


@pytest.fixture
def pauser(client_with: ClientFactory) -> Client:
    """May see lanes and pause them, not change their limits."""
    return client_with("view_lane", "pause_lane")


@pytest.fixture
def lane_editor(client_with: ClientFactory) -> Client:
    """May change lanes but not pause them."""
    return client_with("view_lane", "change_lane")


@pytest.fixture
def operator(client_with: ClientFactory) -> Client:
    return client_with(*OPERATOR_PERMS)


def make_job(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "echo hi")
    fields.setdefault("name", f"job-{next(_names)}")
    return ContainerJob.objects.create(**fields)


def job_url(name: str, *args: Any) -> str:
    return reverse(f"admin:{APP}_containerjob_{name}", args=args)


def texts(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def post_action(client: Client, action: str, rows: list[Any]) -> Any:
    data = {"action": action, "_selected_action": [str(row.pk) for row in rows], "index": "0"}
    return client.post(reverse(LANES), data)


def paused_names() -> set[str]:
    return set(Lane.objects.filter(is_paused=True).values_list("name", flat=True))


# -- the lane list --------------------------------------------------------------------------


def test_lane_list_shows_limits_pauses_and_what_each_lane_holds(admin_client: Client) -> None:
    batch = Lane.objects.create(name="batch", max_concurrent_jobs=2, description="Nightly work")
    Lane.objects.create(name="adhoc")
    lanes.pause(["adhoc"], by="night-shift")
    make_job(lane="batch", status=Status.RUNNING)
    make_job(lane="batch", status=Status.LAUNCHING)
    make_job(lane="batch", status=Status.QUEUED, queued_at=timezone.now())
    make_job(lane="adhoc", status=Status.RETRYING, queued_at=timezone.now())
    make_job(lane="batch", status=Status.COMPLETED)
    page = admin_client.get(reverse(LANES)).content.decode()
    rows = {
        name: row
        for row in re.findall(r"<tr>.*?</tr>", page, re.DOTALL)
        for name in ("batch", "adhoc")
        if f">{name}</a>" in row
    }
    assert "2 / 2" in rows["batch"] and "dcc-load-full" in rows["batch"]
    assert "Nightly work" in rows["batch"]
    assert "no limit" in rows["adhoc"]
    assert "paused" in rows["adhoc"] and "night-shift" in rows["adhoc"]
    # The waiting count links to the lane's jobs.
    assert re.search(r'\?lane=batch"[^>]*>1</a>', rows["batch"])
    assert re.search(r'\?lane=adhoc"[^>]*>1</a>', rows["adhoc"])
    assert batch.holding_count() == 2


def test_lane_list_counts_every_lane_in_one_query(admin_client: Client) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(reverse(LANES)).status_code == 200
        return len(captured)

    Lane.objects.create(name="first", max_concurrent_jobs=3)
    make_job(lane="first", status=Status.RUNNING)
    few = queries()
    for n in range(5):
        Lane.objects.create(name=f"more-{n}", max_concurrent_jobs=1)
        make_job(lane=f"more-{n}", status=Status.QUEUED, queued_at=timezone.now())
    assert queries() == few


# -- pause and resume -----------------------------------------------------------------------


def test_pause_and_resume_with_the_permission(pauser: Client) -> None:
    first, second = Lane.objects.create(name="first"), Lane.objects.create(name="second")
    waiting = make_job(
        lane="first", status=Status.QUEUED, queued_at=timezone.now(), dispatched_at=timezone.now()
    )
    response = post_action(pauser, "pause_lanes", [first, second])
    assert response.status_code == 302
    assert paused_names() == {"first", "second"}
    first.refresh_from_db()
    assert first.paused_at is not None and first.paused_by.startswith("staff")
    assert any(m.startswith("Paused 2 lanes (first, second)") for m in texts(response))

    again = post_action(pauser, "pause_lanes", [first])
    assert any("Already paused" in m and "first" in m for m in texts(again))

    resumed = post_action(pauser, "resume_lanes", [first])
    assert paused_names() == {"second"}
    assert any(m.startswith("Resumed 1 lane (first)") for m in texts(resumed))
    first.refresh_from_db()
    assert (first.paused_at, first.paused_by) == (None, "")
    # Its waiting jobs are offered to the next dispatch at once.
    waiting.refresh_from_db()
    assert waiting.dispatched_at is None


def test_pause_and_resume_are_refused_without_the_permission(
    lane_editor: Client, client_with: ClientFactory
) -> None:
    lane = Lane.objects.create(name="steady")
    held = Lane.objects.create(name="held")
    lanes.pause(["held"], by="someone")
    for client in (lane_editor, client_with("view_lane")):
        assert post_action(client, "pause_lanes", [lane]).status_code == 403
        assert post_action(client, "resume_lanes", [held]).status_code == 403
        page = client.get(reverse(LANES)).content.decode()
        assert "pause_lanes" not in page and "resume_lanes" not in page
    assert paused_names() == {"held"}


def test_the_lane_form_never_writes_the_switch(lane_editor: Client) -> None:
    lane = Lane.objects.create(name="reports", max_concurrent_jobs=1)
    change = reverse(f"admin:{APP}_lane_change", args=[lane.pk])
    page = lane_editor.get(change).content.decode()
    assert 'name="max_concurrent_jobs"' in page
    for field in ("is_paused", "paused_at", "paused_by", "name"):
        assert f'name="{field}"' not in page
    # Paused while the form was open: saving the form must not undo it.
    lanes.pause(["reports"], by="on-call")
    data = {"description": "Monthly reports", "max_concurrent_jobs": "4"}
    assert lane_editor.post(change, data).status_code == 302
    lane.refresh_from_db()
    assert (lane.max_concurrent_jobs, lane.description) == (4, "Monthly reports")
    assert (lane.is_paused, lane.paused_by) == (True, "on-call")

    bad = lane_editor.post(change, {**data, "max_concurrent_jobs": "0"})
    assert bad.status_code == 200
    assert "max_concurrent_jobs" in bad.context["adminform"].form.errors
    lane.refresh_from_db()
    assert lane.max_concurrent_jobs == 4


def test_a_lane_that_waiting_jobs_name_cannot_be_deleted(client_with: ClientFactory) -> None:
    deleter = client_with("view_lane", "delete_lane")
    lane = Lane.objects.create(name="reports", max_concurrent_jobs=1)
    lanes.pause(["reports"], by="on-call")
    make_job(lane="reports", status=Status.QUEUED, queued_at=timezone.now())
    make_job(lane="reports", status=Status.COMPLETED)
    delete = reverse(f"admin:{APP}_lane_delete", args=[lane.pk])
    refused = "lane reports: 1 job not final names it"

    assert refused in deleter.get(delete).content.decode()
    response = deleter.post(delete, {"post": "yes"})
    assert response.status_code == 200
    assert refused in response.content.decode()
    assert Lane.objects.filter(name="reports", is_paused=True).exists()

    # A failed job whose container may still run (stop_pending) is not final either.
    stuck = Lane.objects.create(name="stuck")
    make_job(lane="stuck", status=Status.FAILED, stop_pending=True)
    selected = [str(lane.pk), str(stuck.pk)]
    data = {"action": "delete_selected", "_selected_action": selected, "post": "yes"}
    response = deleter.post(reverse(LANES), data)
    assert response.status_code == 200
    page = response.content.decode()
    assert refused in page and "lane stuck: 1 job not final names it" in page
    assert set(Lane.objects.values_list("name", flat=True)) == {"reports", "stuck"}
    assert Lane.objects.get(name="reports").is_paused


def test_a_lane_no_job_waits_in_can_be_deleted(client_with: ClientFactory) -> None:
    deleter = client_with("view_lane", "delete_lane")
    unused = Lane.objects.create(name="unused")
    done = Lane.objects.create(name="done")
    make_job(lane="done", status=Status.COMPLETED)
    make_job(lane="done", status=Status.CANCELLED)
    delete = reverse(f"admin:{APP}_lane_delete", args=[unused.pk])
    assert deleter.post(delete, {"post": "yes"}).status_code == 302
    data = {"action": "delete_selected", "_selected_action": [str(done.pk)], "post": "yes"}
    assert deleter.post(reverse(LANES), data).status_code == 302
    assert not Lane.objects.filter(name__in=["unused", "done"]).exists()


# -- host health ----------------------------------------------------------------------------


def test_host_list_shows_health_with_the_error_on_hover(admin_client: Client) -> None:
    now = timezone.now()
    ExecutorHost.objects.create(name="fine")
    ExecutorHost.objects.create(
        name="wobbly", failures_in_row=2, health_error="connection refused", unreachable_since=now
    )
    ExecutorHost.objects.create(
        name="gone",
        failures_in_row=5,
        unhealthy_since=now - timedelta(minutes=3),
        unreachable_since=now - timedelta(minutes=5),
        health_error="Read timed out",
    )
    with CaptureQueriesContext(connection) as captured:
        page = admin_client.get(reverse(HOSTS)).content.decode()
    assert 'class="dcc-host-ok">healthy<' in page
    assert re.search(r'title="connection refused">failing: 2 in a row<', page)
    assert re.search(r'title="Read timed out">unhealthy since ', page)
    # session, user, two counts, hosts with their load, every host's memory and CPU use
    assert len(captured) <= 6


@pytest.mark.parametrize(
    ("health", "shown"),
    [("healthy", {"fine"}), ("failing", {"wobbly"}), ("unhealthy", {"gone"})],
)
def test_host_list_filters_by_health(admin_client: Client, health: str, shown: set[str]) -> None:
    ExecutorHost.objects.create(name="fine")
    ExecutorHost.objects.create(name="wobbly", failures_in_row=1, health_error="refused")
    ExecutorHost.objects.create(name="gone", failures_in_row=3, unhealthy_since=timezone.now())
    response = admin_client.get(reverse(HOSTS), {"health": health})
    assert {host.name for host in response.context["cl"].result_list} == shown


def test_a_daemon_check_that_gets_an_answer_makes_the_host_healthy(
    client_with: ClientFactory,
) -> None:
    host = ExecutorHost.objects.create(
        name="back", failures_in_row=3, unhealthy_since=timezone.now(), health_error="refused"
    )
    hosts_admin = client_with("view_executorhost", "change_executorhost")
    data = {"action": "check_daemon", "_selected_action": [host.pk], "index": "0"}
    response = hosts_admin.post(reverse(HOSTS), data)
    assert response.status_code == 302
    assert any(m.endswith("answers; healthy again.") for m in texts(response))
    host.refresh_from_db()
    assert (host.is_healthy, host.failures_in_row, host.health_error) == (True, 0, "")


def test_host_page_shows_the_whole_error(admin_client: Client) -> None:
    error = "Cannot connect to the Docker daemon at tcp://10.0.0.9:2376. " * 3
    host = ExecutorHost.objects.create(
        name="far", failures_in_row=4, unhealthy_since=timezone.now(), health_error=error
    )
    page = admin_client.get(reverse(f"admin:{APP}_executorhost_change", args=[host.pk]))
    html = page.content.decode()
    assert "unhealthy since" in html and error.strip() in html
    assert 'name="health_error"' not in html and 'name="failures_in_row"' not in html


# -- jobs: attention, lanes ---------------------------------------------------------------


def attention_job(**fields: Any) -> ContainerJob:
    return make_job(
        status=Status.FAILED,
        needs_attention=True,
        attempts_without_outcome=3,
        completed_at=timezone.now(),
        last_error="the container vanished (3 attempts without an outcome)",
        **fields,
    )


def test_needs_attention_filter(admin_client: Client) -> None:
    needy = attention_job()
    make_job(status=Status.FAILED, last_error="exit 1")
    make_job(status=Status.QUEUED, queued_at=timezone.now())
    response = admin_client.get(reverse(JOBS), {"needs_attention": "yes"})
    assert [job.pk for job in response.context["cl"].result_list] == [needy.pk]
    page = admin_client.get(reverse(JOBS)).content.decode()
    assert "needs_attention=yes" in page
    # No lane exists: the lane filter is left out rather than offering only "No lane".
    assert "?lane=" not in page


def test_a_job_that_needs_attention_says_why_and_what_to_do(operator: Client) -> None:
    job = attention_job()
    html = operator.get(job_url("change", job.pk)).content.decode()
    note = re.search(r'<p class="errornote dcc-attention">(.*?)</p>', html, re.DOTALL)
    assert note is not None
    assert "Failed after 3 attempts that ended without an outcome" in note.group(1)
    assert "Retry" in note.group(1)
    # Shown, never offered as inputs.
    assert 'name="needs_attention"' not in html and 'name="attempts_without_outcome"' not in html
    assert "dcc-attention" not in operator.get(job_url("change", make_job().pk)).content.decode()


def test_retrying_clears_the_attention_mark(operator: Client) -> None:
    job = attention_job()
    response = operator.post(job_url("operation", job.pk, "retry"))
    assert response.status_code == 302
    job.refresh_from_db()
    assert (job.status, job.needs_attention, job.attempts_without_outcome) == (
        Status.QUEUED,
        False,
        0,
    )


def test_lane_filter_and_the_lane_in_the_list(admin_client: Client) -> None:
    Lane.objects.create(name="batch")
    in_lane = make_job(lane="batch")
    without = make_job()
    by_lane = admin_client.get(reverse(JOBS), {"lane": "batch"})
    assert [job.pk for job in by_lane.context["cl"].result_list] == [in_lane.pk]
    no_lane = admin_client.get(reverse(JOBS), {"lane": "_none"})
    assert [job.pk for job in no_lane.context["cl"].result_list] == [without.pk]
    page = admin_client.get(reverse(JOBS)).content.decode()
    assert '<span class="dcc-muted dcc-lane" title="lane batch">batch</span>' in page
    assert "?lane=batch" in page and "?lane=_none" in page


def test_job_form_rejects_an_unknown_lane_and_saves_nothing(operator: Client) -> None:
    Lane.objects.create(name="batch")
    job = make_job(status=Status.QUEUED, queued_at=timezone.now())
    before = job.name
    page = operator.get(job_url("change", job.pk)).content.decode()
    assert 'name="lane"' in page and 'name="memory_retry_factor"' in page

    data = job_form_data(job, "", name="renamed", lane="nosuch", memory_retry_factor="2")
    response = operator.post(job_url("change", job.pk), data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["lane"]
    assert "Unknown lane nosuch" in errors["lane"][0]
    job.refresh_from_db()
    assert (job.name, job.lane, job.memory_retry_factor) == (before, "", None)

    saved = operator.post(job_url("change", job.pk), {**data, "lane": "batch"})
    assert saved.status_code == 302
    job.refresh_from_db()
    assert (job.name, job.lane, job.memory_retry_factor) == ("renamed", "batch", 2.0)


def test_add_form_rejects_an_unknown_lane(operator: Client) -> None:
    template = ContainerJob(name="fresh", docker_image="busybox:latest", command="echo 1")
    data = job_form_data(template, "", lane="nosuch")
    response = operator.post(job_url("add"), data)
    assert response.status_code == 200
    assert "Unknown lane nosuch" in response.context["adminform"].form.errors["lane"][0]
    assert not ContainerJob.objects.filter(name="fresh").exists()


def test_memory_retry_factor_out_of_range_is_refused(operator: Client) -> None:
    job = make_job()
    data = job_form_data(job, "", memory_retry_factor="1.0")
    response = operator.post(job_url("change", job.pk), data)
    assert response.status_code == 200
    assert "memory_retry_factor" in response.context["adminform"].form.errors
    job.refresh_from_db()
    assert job.memory_retry_factor is None


def test_attempts_table_shows_each_attempts_memory_limit(admin_client: Client) -> None:
    job = make_job(status=Status.COMPLETED, attempt=2, memory_limit=32, memory_retry_factor=2)
    ended = timezone.now() - timedelta(minutes=5)
    JobAttempt.objects.create(
        job=job,
        attempt=1,
        reason=JobAttempt.Reason.OUT_OF_MEMORY,
        exit_code=137,
        memory_limit=16,
        error="out of memory: killed at its 16 MiB memory limit",
        started_at=ended - timedelta(seconds=3),
        ended_at=ended,
        retried=True,
    )
    JobAttempt.objects.create(
        job=job,
        attempt=2,
        reason=JobAttempt.Reason.EXITED,
        exit_code=0,
        memory_limit=32,
        started_at=ended,
        ended_at=ended + timedelta(seconds=2),
    )
    html = admin_client.get(job_url("change", job.pk)).content.decode()
    table = html[html.index('<table class="dcc-attempts">') :]
    table = table[: table.index("</table>")]
    assert "<th>Memory</th>" in table
    assert "<td>16 MiB</td>" in table and "<td>32 MiB</td>" in table
    assert "Out of memory (137)" in table


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_counts_jobs_needing_attention_and_names_paused_lanes(
    admin_client: Client, client_with: ClientFactory
) -> None:
    attention_job()
    attention_job()
    Lane.objects.create(name="quiet")
    Lane.objects.create(name="loud")
    lanes.pause(["loud"], by="ops")
    response = admin_client.get(job_url("dashboard"))
    assert response.status_code == 200
    assert response.context["needs_attention"] == 2
    assert [lane.name for lane in response.context["paused_lanes"]] == ["loud"]
    html = response.content.decode()
    assert re.search(r'href="[^"]*\?needs_attention=yes"', html)
    assert '<span class="dcc-card-value" id="dcc-needs-attention">2</span>' in html
    assert "loud" in html and "quiet" not in html
    assert reverse(LANES) + "?is_paused__exact=1" in html
    # A user who may not see lanes gets their names, not a link to their list.
    viewer = client_with("view_containerjob")
    other = viewer.get(job_url("dashboard")).content.decode()
    assert "loud" in other and reverse(LANES) not in other


def test_dashboard_query_count_stays_fixed_with_controls(admin_client: Client) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(job_url("dashboard")).status_code == 200
        return len(captured)

    first = queries()
    for n in range(4):
        Lane.objects.create(name=f"lane-{n}")
        attention_job()
    lanes.pause([f"lane-{n}" for n in range(4)], by="ops")
    assert queries() == first


def test_a_job_whose_lane_was_deleted_does_not_break_its_page(operator: Client) -> None:
    Lane.objects.create(name="gone")
    running = make_job(lane="gone", status=Status.RUNNING, launched_at=timezone.now())
    Lane.objects.filter(name="gone").delete()
    assert operator.get(job_url("change", running.pk)).status_code == 200
    # A form opened while the job still waited, sent once it runs: refused, not a crash.
    response = operator.post(job_url("change", running.pk), job_form_data(running, ""))
    assert response.status_code == 302
    assert any("were not saved" in m for m in texts(response))
