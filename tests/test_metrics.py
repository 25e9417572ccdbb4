"""The Prometheus endpoint: a known mix of jobs, hosts and attempts in, the scrape's figures
out; who may read it; what it costs. Real PostgreSQL; two jobs run through real Docker
so that attempt rows written by finishing are counted too."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils.module_loading import import_string
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from django_container_celery import metrics
from django_container_celery.metrics import (
    CLAIM_TO_START_BUCKETS,
    RUN_DURATION_BUCKETS,
    ContainerJobCollector,
    MetricsView,
    metrics_view,
    read_snapshot,
)
from django_container_celery.models import ContainerJob, ExecutorHost, JobAttempt, database_now
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from .admin_support import staff_client
from .urls import METRICS_TEST_TOKEN

pytestmark = pytest.mark.django_db

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Client, **headers: str) -> tuple[Samples, dict[str, str]]:
    """The samples of one scrape by (sample name, labels), and each family's HELP."""
    response = client.get("/metrics/", **headers)
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    return parse(response.content.decode())


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    samples: Samples = {}
    helps: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        helps[family.name] = family.documentation
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples, helps


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def family(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (sample, labels), v in samples.items() if sample == name}


# -- the mix ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Mix:
    now: datetime
    waits: list[float]  # claim-to-start seconds expected in the histogram
    runs: list[float]  # run seconds expected in the histogram


def run_real_jobs(made: list[Any], test_image: str) -> tuple[ContainerJob, ContainerJob]:
    """One job that succeeds and one that fails with exit code 3, launched and harvested by
    the engine against real Docker (no host rows yet: the default daemon)."""
    manager = JobQueueManager(worker_id="metrics-test")
    ok = ContainerJob.objects.create_job(docker_image=test_image, command="true")
    bad = ContainerJob.objects.create_job(
        docker_image=test_image, command="sh -c 'exit 3'", max_retries=0
    )
    made.extend([ok, bad])
    for job in (ok, bad):
        job.mark_as_queued()
        assert manager.launch_job(job)["success"]
    deadline = time.monotonic() + 60
    while ContainerJob.objects.filter(pk__in=[ok.pk, bad.pk], status=Status.RUNNING).exists():
        assert time.monotonic() < deadline, "the real jobs did not finish"
        manager.harvest_finished_jobs()
        time.sleep(0.1)
    ok.refresh_from_db()
    bad.refresh_from_db()
    assert (ok.status, bad.status, bad.exit_code) == (Status.COMPLETED, Status.FAILED, 3)
    return ok, bad


def make_job(status: str, priority: int = 50, **fields: Any) -> ContainerJob:
    return ContainerJob.objects.create(
        docker_image="busybox:latest", command="true", status=status, priority=priority, **fields
    )


def ago(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)


def put_mix() -> Mix:
    """Jobs in every open status, band edge and host; finished jobs inside and outside the
    window; attempts ended by every reason. The expected figures are in the test."""
    now = database_now()
    mix = Mix(now, waits=[], runs=[])
    a = ExecutorHost.objects.create(
        name="metrics-a", max_concurrent_jobs=4, memory_capacity_mb=2048, cpu_capacity=4.0
    )
    b = ExecutorHost.objects.create(
        name="metrics-b",
        max_concurrent_jobs=2,
        is_active=False,
        unreachable_since=now,
        unhealthy_since=now,
    )

    def attempt(
        job: ContainerJob,
        number: int,
        reason: str,
        ended_ago: float,
        run: float | None,
        wait: float,
        exit_code: int | None = None,
        retried: bool = False,
        counted: bool = True,
    ) -> None:
        ended = ago(now, ended_ago)
        started = None if run is None else ended - timedelta(seconds=run)
        claimed = (started or ended) - timedelta(seconds=wait)
        JobAttempt.objects.create(
            job=job,
            attempt=number,
            host=job.assigned_host,
            reason=reason,
            exit_code=exit_code,
            error="" if exit_code == 0 else f"ended: {reason}",
            claimed_at=claimed,
            started_at=started,
            ended_at=ended,
            retried=retried,
        )
        if counted and run is not None:
            mix.waits.append(wait)
            mix.runs.append(run)

    def running(
        priority: int, host: ExecutorHost | None, started_ago: float, wait: float, **f: Any
    ) -> ContainerJob:
        started = ago(now, started_ago)
        job = make_job(
            Status.RUNNING,
            priority,
            assigned_host=host,
            claimed_by="w",
            claimed_at=started - timedelta(seconds=wait),
            started_at=started,
            attempt=f.pop("attempt", 1),
            **f,
        )
        if started_ago < 3600:
            mix.waits.append(wait)
        return job

    # Open jobs.
    make_job(Status.PENDING, 50)
    make_job(Status.QUEUED, 100, queued_at=ago(now, 120))
    make_job(Status.QUEUED, 80, queued_at=ago(now, 30))
    make_job(Status.QUEUED, 79, queued_at=ago(now, 600))
    make_job(Status.QUEUED, 0, queued_at=ago(now, 5000), scheduled_for=now + timedelta(hours=1))
    low_retry = make_job(
        Status.RETRYING, 20, queued_at=ago(now, 3600), scheduled_for=ago(now, 90), attempt=1
    )
    attempt(low_retry, 1, "launch_failed", 95, None, 5, retried=True)
    high_retry = make_job(
        Status.RETRYING,
        80,
        queued_at=ago(now, 1000),
        scheduled_for=now + timedelta(minutes=10),
        attempt=1,
    )
    attempt(high_retry, 1, "vanished", 14 * 60, 58, 2, retried=True)
    # A container of its launch is still to be stopped: it holds a slot, it is not ready.
    held = make_job(
        Status.RETRYING,
        21,
        queued_at=ago(now, 50),
        scheduled_for=ago(now, 10),
        stop_pending=True,
        assigned_host=a,
        attempt=1,
    )
    attempt(held, 1, "launch_failed", 12, None, 3, retried=True)
    make_job(
        Status.LAUNCHING,
        50,
        assigned_host=a,
        claimed_by="w",
        claimed_at=ago(now, 1),
        memory_limit=1024,
        cpu_limit=0.5,
        attempt=1,
    )
    running(90, a, 300, 0.3, memory_limit=512, cpu_limit=1.5, takeover_count=2)
    # Requeued by hand after its first attempt timed out: now on its second.
    second_try = running(100, a, 13, 7.0, attempt=2)
    attempt(second_try, 1, "timed_out", 40 * 60, 600 - 20, 0.7, exit_code=137)
    running(50, b, 7200, 3.0)  # started before the window
    running(60, None, 55, 45.0)  # on the default daemon, no host row

    # Finished jobs.
    done = make_job(Status.COMPLETED, 50, completed_at=ago(now, 600), takeover_count=1, attempt=1)
    attempt(done, 1, "exited", 600, 3, 0.2, exit_code=0)
    for run, wait in ((700, 20.0), (40, 2.0)):
        job = make_job(Status.COMPLETED, 50, completed_at=ago(now, 60), attempt=1)
        attempt(job, 1, "exited", 60, run, wait, exit_code=0)
    old = make_job(Status.COMPLETED, 50, completed_at=ago(now, 7200), takeover_count=5, attempt=1)
    attempt(old, 1, "exited", 7200, 10, 1, exit_code=0, counted=False)
    failed_exit = make_job(Status.FAILED, 50, completed_at=ago(now, 310), attempt=2)
    attempt(failed_exit, 1, "exited", 20 * 60, 59, 1.0, exit_code=75, retried=True)
    attempt(failed_exit, 2, "exited", 310, 50, 0.05, exit_code=1)
    given_up = make_job(Status.FAILED, 50, completed_at=ago(now, 180), attempt=1)
    attempt(given_up, 1, "unfinishable", 180, 59, 1.0)
    make_job(Status.FAILED, 50, completed_at=ago(now, 60), last_error="too big")  # no attempt
    old_timeout = make_job(
        Status.FAILED,
        50,
        completed_at=ago(now, 3 * 3600),
        stop_pending=True,
        assigned_host=b,
        attempt=1,
    )
    attempt(old_timeout, 1, "timed_out", 3 * 3600, 3600, 1, exit_code=137, counted=False)
    cancelled = make_job(Status.CANCELLED, 50, completed_at=ago(now, 1800), attempt=1)
    attempt(cancelled, 1, "cancelled", 1800, 60 - 0.5, 0.4)
    return mix


def buckets(values: Iterable[float], bounds: Iterable[float]) -> list[int]:
    values = list(values)
    return [sum(1 for v in values if v <= bound) for bound in bounds]


# -- the scrape ------------------------------------------------------------------------------


@pytest.mark.docker
def test_scrape_reports_the_mix(django_user_model: Any, made: list[Any], test_image: str) -> None:
    ok, bad = run_real_jobs(made, test_image)
    real = list(JobAttempt.objects.filter(job__in=[ok, bad]).order_by("job__exit_code"))
    assert [(a.reason, a.exit_code, a.retried) for a in real] == [
        ("exited", 0, False),
        ("exited", 3, False),
    ]
    mix = put_mix()
    for row in real:
        assert row.claimed_at is not None and row.started_at is not None
        mix.waits.append((row.started_at - row.claimed_at).total_seconds())
        mix.runs.append((row.ended_at - row.started_at).total_seconds())

    client = staff_client(django_user_model, "view_containerjob")
    samples, helps = scrape(client)
    elapsed = (database_now() - mix.now).total_seconds()

    assert all(name.startswith("dcc_") for name in helps)
    assert all(len(text) > 20 for text in helps.values())

    depth = {
        ("pending", "normal"): 1,
        ("queued", "high"): 2,
        ("queued", "normal"): 1,
        ("queued", "low"): 1,
        ("retrying", "high"): 1,
        ("retrying", "normal"): 1,
        ("retrying", "low"): 1,
        ("launching", "normal"): 1,
        ("running", "high"): 2,
        ("running", "normal"): 2,
    }
    for status in ("pending", "queued", "retrying", "launching", "running"):
        for band in ("high", "normal", "low"):
            got = value(samples, "dcc_queue_depth", status=status, priority_band=band, lane="")
            assert got == depth.get((status, band), 0), (status, band)
    assert len(family(samples, "dcc_queue_depth")) == 15

    ready = {"high": 2, "normal": 1, "low": 1}
    for band, count in ready.items():
        assert value(samples, "dcc_ready_jobs", priority_band=band, lane="") == count
    # Ready since queued (high, normal), since its back-off came due (low): not since
    # it was first queued an hour ago.
    for band, seconds in {"high": 120, "normal": 600, "low": 90}.items():
        age = value(samples, "dcc_oldest_ready_job_age_seconds", priority_band=band)
        assert seconds <= age <= seconds + elapsed + 1, (band, age)

    finished = {"completed": 4, "failed": 4, "cancelled": 1}
    for status, count in finished.items():
        assert value(samples, "dcc_jobs_finished", status=status) == count, status
    assert value(samples, "dcc_takeovers") == 3

    # Inside the window only: the job that timed out three hours ago is not counted.
    failed = {"exited": 2, "unfinishable": 1, "none": 1}
    assert {dict(labels)["reason"] for labels in family(samples, "dcc_failed_jobs")} == {
        *failed,
        "timed_out",
        "launch_failed",
        "vanished",
        "out_of_memory",
    }
    for reason in metrics.FAILED_JOB_REASONS:
        assert value(samples, "dcc_failed_jobs", reason=reason) == failed.get(reason, 0), reason

    assert value(samples, "dcc_slots_used") == 7
    assert value(samples, "dcc_slots_limit") == 10
    hosts = {
        "dcc_host_slots_used": {"metrics-a": 4, "metrics-b": 2},
        "dcc_host_slots": {"metrics-a": 4, "metrics-b": 2},
        "dcc_host_memory_used_mb": {"metrics-a": 1024 + 512 + 256 + 256, "metrics-b": 512},
        "dcc_host_memory_capacity_mb": {"metrics-a": 2048},
        "dcc_host_cpus_used": {"metrics-a": 0.5 + 1.5 + 1.0 + 1.0, "metrics-b": 2.0},
        "dcc_host_cpu_capacity": {"metrics-a": 4.0},
        "dcc_host_active": {"metrics-a": 1, "metrics-b": 0},
        "dcc_host_reachable": {"metrics-a": 1, "metrics-b": 0},
        "dcc_host_healthy": {"metrics-a": 1, "metrics-b": 0},
    }
    for name, expected in hosts.items():
        got = {dict(labels)["host"]: v for labels, v in family(samples, name).items()}
        assert got == pytest.approx(expected), name

    assert value(samples, "dcc_attempts_succeeded") == 4
    failures = {
        ("exited", "true"): 1,
        ("exited", "false"): 2,
        ("launch_failed", "true"): 2,
        ("vanished", "true"): 1,
        ("cancelled", "false"): 1,
        ("unfinishable", "false"): 1,
        ("timed_out", "false"): 1,
    }
    for reason in metrics.REASONS:
        for retried in ("true", "false"):
            got = value(samples, "dcc_attempt_failures", reason=reason, retried=retried)
            assert got == failures.get((reason, retried), 0), (reason, retried)
    assert (
        "dcc_attempt_failures",
        frozenset({("reason", "out_of_memory"), ("retried", "false")}),
    ) in samples

    for name, observed, bounds in (
        ("dcc_claim_to_start_seconds", mix.waits, CLAIM_TO_START_BUCKETS),
        ("dcc_run_duration_seconds", mix.runs, RUN_DURATION_BUCKETS),
    ):
        got = [value(samples, f"{name}_bucket", le=str(bound)) for bound in bounds]
        assert got == buckets(observed, bounds), name
        assert value(samples, f"{name}_bucket", le="+Inf") == len(observed)
        assert value(samples, f"{name}_count") == len(observed)
        assert value(samples, f"{name}_sum") == pytest.approx(sum(observed), abs=0.01)
    assert len(mix.waits) == 14 and len(mix.runs) == 11
    assert value(samples, "dcc_metrics_window_seconds") == 3600


def test_an_empty_database_scrapes_zeros(django_user_model: Any) -> None:
    client = staff_client(django_user_model, "view_containerjob")
    samples, _helps = scrape(client)
    assert value(samples, "dcc_queue_depth", status="queued", priority_band="high", lane="") == 0
    assert value(samples, "dcc_oldest_ready_job_age_seconds", priority_band="low") == 0
    assert value(samples, "dcc_failed_jobs", reason="none") == 0
    assert value(samples, "dcc_run_duration_seconds_count") == 0
    assert family(samples, "dcc_host_slots") == {}


def test_the_window_is_the_collectors() -> None:
    now = database_now()
    job = make_job(Status.COMPLETED, completed_at=ago(now, 600), attempt=1)
    JobAttempt.objects.create(
        job=job,
        attempt=1,
        reason="exited",
        exit_code=0,
        claimed_at=ago(now, 700),
        started_at=ago(now, 650),
        ended_at=ago(now, 600),
    )
    wide, _ = parse(_generate(ContainerJobCollector(window_seconds=900)))
    narrow, _ = parse(_generate(ContainerJobCollector(window_seconds=300)))
    assert value(wide, "dcc_attempts_succeeded") == 1
    assert value(wide, "dcc_jobs_finished", status="completed") == 1
    assert value(narrow, "dcc_attempts_succeeded") == 0
    assert value(narrow, "dcc_metrics_window_seconds") == 300
    with pytest.raises(ValueError, match="window_seconds"):
        ContainerJobCollector(window_seconds=0)


def _generate(collector: ContainerJobCollector) -> str:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_the_queries_do_not_grow_with_the_rows() -> None:
    with CaptureQueriesContext(connection) as empty:
        read_snapshot()
    put_mix()
    with CaptureQueriesContext(connection) as full:
        read_snapshot()
    assert len(full.captured_queries) == len(empty.captured_queries) <= 10


def test_registering_reads_nothing(django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(0):
        CollectorRegistry(auto_describe=True).register(ContainerJobCollector())


@pytest.mark.django_db(transaction=True)
def test_prometheus_clients_own_server_thread_closes_its_connection() -> None:
    make_job(Status.QUEUED, 90, queued_at=database_now())
    registry = CollectorRegistry()
    registry.register(ContainerJobCollector())
    results: dict[str, Any] = {}

    def serve_one_scrape() -> None:  # as prometheus_client's server does, in a new thread
        results["text"] = generate_latest(registry).decode()
        results["left_open"] = connection.connection is not None

    thread = threading.Thread(target=serve_one_scrape)
    thread.start()
    thread.join(30)
    samples, _ = parse(results["text"])
    assert value(samples, "dcc_queue_depth", status="queued", priority_band="high", lane="") == 1
    assert results["left_open"] is False


# -- who may read it --------------------------------------------------------------------------


def test_anonymous_and_users_without_the_right_are_refused(django_user_model: Any) -> None:
    assert Client().get("/metrics/").status_code == 403
    assert staff_client(django_user_model).get("/metrics/").status_code == 403  # no permission
    user = django_user_model.objects.create_user("not-staff", password="pw")
    user.user_permissions.add(*Permission.objects.filter(codename="view_containerjob"))
    outsider = Client()
    outsider.force_login(user)
    assert outsider.get("/metrics/").status_code == 403
    boss = django_user_model.objects.create_superuser("metrics-boss", password="pw")
    superuser = Client()
    superuser.force_login(boss)
    assert superuser.get("/metrics/").status_code == 200


def test_a_scraper_with_the_bearer_token_is_served(django_user_model: Any) -> None:
    scraper = Client()
    good = scraper.get("/metrics/scraper/", HTTP_AUTHORIZATION=f"Bearer {METRICS_TEST_TOKEN}")
    assert good.status_code == 200 and b"dcc_queue_depth" in good.content
    assert good["Cache-Control"] == "no-store"
    wrong = scraper.get("/metrics/scraper/", HTTP_AUTHORIZATION="Bearer not-the-token")
    assert wrong.status_code == 403
    assert scraper.get("/metrics/scraper/").status_code == 403
    # The token opens only the view it was given to.
    plain = scraper.get("/metrics/", HTTP_AUTHORIZATION=f"Bearer {METRICS_TEST_TOKEN}")
    assert plain.status_code == 403
    # Staff users still get in without it.
    staff = staff_client(django_user_model, "view_containerjob")
    assert staff.get("/metrics/scraper/").status_code == 200


def test_a_project_that_requires_login_everywhere_still_lets_the_scraper_in(
    settings: Any,
) -> None:
    # Django 5.1+ can require a login for every view; the metrics view decides itself.
    assert getattr(metrics_view, "login_required", True) is False
    middleware = "django.contrib.auth.middleware.LoginRequiredMiddleware"
    try:
        import_string(middleware)
    except ImportError:
        return  # Django before 5.1 has no such middleware: nothing else to hold
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, middleware]
    scraper = Client()
    good = scraper.get("/metrics/scraper/", HTTP_AUTHORIZATION=f"Bearer {METRICS_TEST_TOKEN}")
    assert good.status_code == 200
    assert scraper.get("/metrics/scraper/").status_code == 403


def test_a_short_token_is_refused_when_urls_load() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="at least 24"):
        MetricsView.as_view(bearer_token="short")
    with pytest.raises(ValueError, match="window_seconds"):
        MetricsView.as_view(window_seconds=-1)


def test_without_prometheus_client_the_import_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "django_container_celery.metrics")
    with pytest.raises(ImportError) as info:
        importlib.import_module("django_container_celery.metrics")
    message = str(info.value)
    assert "django-container-celery[prometheus]" in message and "prometheus-client" in message
