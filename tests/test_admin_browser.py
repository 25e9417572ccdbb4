"""The admin in a real headless Chromium: log in, filter, schedule a job for later.

Debian's ``chromium`` is driven through Playwright with ``executable_path``; no browser is
ever downloaded. Screenshots go to ``test-output/browser/`` at the repository root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from django_container_celery.models import ContainerJob, ExecutorHost, JobAttempt
from django_container_celery.states import Status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("DCC_CHROMIUM", "/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
            "(apt-get install chromium) or point DCC_CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    # Playwright's sync API runs an event loop in this thread; the ORM calls the test
    # makes alongside it are synchronous and safe.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 950})
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()
            # Inside Playwright's context the ORM sees its own connection, one the test
            # database teardown would otherwise find still open.
            connections.close_all()


def populate() -> ContainerJob:
    """A queue worth looking at; returns the pending job the test will schedule."""
    now = timezone.now()
    hosts = [
        ExecutorHost.objects.create(name="docker-a", max_concurrent_jobs=4),
        ExecutorHost.objects.create(name="docker-b", max_concurrent_jobs=2, weight=50),
    ]
    target = ContainerJob.objects.create(
        name="nightly-report",
        docker_image="busybox:latest",
        command="echo report",
        environment={"REPORT_TOKEN": "t-0123456789", "MODE": "full"},
    )
    ContainerJob.objects.create(name="adhoc-export", docker_image="busybox:latest")
    ContainerJob.objects.create(
        name="thumbnails",
        docker_image="registry.local/thumbs:2",
        status=Status.QUEUED,
        priority=80,
        queued_at=now - timedelta(minutes=42),
    )
    ContainerJob.objects.create(
        name="reindex",
        docker_image="registry.local/search:7",
        status=Status.RETRYING,
        retry_count=1,
        queued_at=now - timedelta(minutes=10),
        scheduled_for=now + timedelta(minutes=3),
    )
    for index, host in enumerate([hosts[0], hosts[0], hosts[0], hosts[1]]):
        ContainerJob.objects.create(
            name=f"render-{index}",
            docker_image="busybox:latest",
            status=Status.RUNNING,
            assigned_host=host,
            attempt=1,
            launched_at=now - timedelta(minutes=index + 1),
            started_at=now - timedelta(minutes=index + 1),
        )
    ContainerJob.objects.create(
        name="import-feed",
        docker_image="busybox:latest",
        status=Status.FAILED,
        priority=20,
        queued_at=now - timedelta(minutes=30),
        completed_at=now - timedelta(minutes=12),
        last_error="image not found",
    )
    ContainerJob.objects.create(
        name="backup",
        docker_image="busybox:latest",
        status=Status.COMPLETED,
        attempt=1,
        exit_code=0,
        launched_at=now - timedelta(hours=2),
        completed_at=now - timedelta(hours=1, minutes=50),
    )
    return target


def test_schedule_a_job_for_later_in_chromium(
    browser_page: Any, live_server: Any, django_user_model: Any
) -> None:
    page = browser_page
    django_user_model.objects.create_superuser("operator", password="s3cret-pass")
    job = populate()

    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_container_celery/containerjob/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")
    assert "t-0123456789" not in page.content()

    page.click('#changelist-filter a[href*="queue_status=not_queued"]')
    page.wait_for_url("**queue_status=not_queued**")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 2
    page.screenshot(path=str(OUTPUT / "changelist-not-queued.png"), full_page=True)

    row = page.locator("#result_list tbody tr", has_text="nightly-report")
    row.locator("input.action-select").check()
    page.select_option("select[name=action]", "schedule_for_later")
    page.click("button[name=index]")
    page.wait_for_selector("#dcc-schedule-form")
    page.fill("input[name=scheduled_for]", "2030-06-01T09:30")
    page.screenshot(path=str(OUTPUT / "schedule-form.png"), full_page=True)
    page.click("#dcc-schedule-form input[type=submit]")

    page.wait_for_selector(".messagelist")
    assert "1 job" in page.locator(".messagelist").inner_text()
    page.click('#changelist-filter a[href*="queue_status=scheduled"]')
    page.wait_for_url("**queue_status=scheduled**")
    scheduled_row = page.locator("#result_list tbody tr", has_text="nightly-report")
    assert scheduled_row.locator(".dcc-qs-scheduled").inner_text() == "Scheduled"
    assert "2030-06-01 09:30" in scheduled_row.inner_text()
    page.screenshot(path=str(OUTPUT / "changelist-scheduled.png"), full_page=True)

    job.refresh_from_db()
    assert job.status == Status.QUEUED
    assert job.scheduled_for == datetime(2030, 6, 1, 9, 30, tzinfo=UTC)
    assert job.queue_status == "scheduled"

    page.click("a.dcc-dashboard-link")
    page.wait_for_selector("#dcc-hosts")
    assert page.inner_text("#dcc-scheduled") == "2"
    assert "3 / 4" in page.inner_text("#dcc-hosts")
    page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)


def log_in(page: Any, live_server: Any, django_user_model: Any, target: str) -> None:
    django_user_model.objects.create_superuser("operator", password="s3cret-pass")
    page.goto(f"{live_server.url}/admin/login/?next={target}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")


def test_the_list_shows_exit_code_and_error_at_1366_pixels(
    browser_page: Any, live_server: Any, django_user_model: Any
) -> None:
    page = browser_page
    page.set_viewport_size({"width": 1366, "height": 768})
    populate()
    ContainerJob.objects.create(
        name="nightly-etl-with-a-rather-long-descriptive-name",
        docker_image="registry.example.com:5000/data-platform/etl-runner:2026.12.01",
        status=Status.FAILED,
        exit_code=137,
        attempt=2,
        retry_count=1,
        queued_at=timezone.now() - timedelta(minutes=20),
        launched_at=timezone.now() - timedelta(minutes=19),
        completed_at=timezone.now() - timedelta(minutes=2),
        last_error="container exited with code 137 after writing 4 GiB to /tmp: " + "x " * 200,
    )
    log_in(page, live_server, django_user_model, "/admin/django_container_celery/containerjob/")
    page.wait_for_selector("#result_list")
    page.screenshot(path=str(OUTPUT / "changelist-1366.png"))

    # Nothing is cut off: neither the page nor the list's own box scrolls sideways, and
    # the last columns end left of the filters.
    widths = page.evaluate(
        """() => {
            const page = document.documentElement, box = document.querySelector('.results');
            return {page: page.scrollWidth, pageView: page.clientWidth,
                    list: box.scrollWidth, listView: box.clientWidth,
                    filters: document.querySelector('#changelist-filter')
                        .getBoundingClientRect().left};
        }"""
    )
    assert widths["page"] <= widths["pageView"], f"the page scrolls sideways: {widths}"
    assert widths["list"] <= widths["listView"], f"the list scrolls sideways: {widths}"
    for header in ("Exit", "Error"):
        box = page.locator("#result_list thead th", has_text=header).bounding_box()
        assert box is not None and box["x"] + box["width"] <= widths["filters"], (header, box)
    row = page.locator("#result_list tbody tr", has_text="nightly-etl")
    assert row.locator(".dcc-exit-bad").inner_text() == "137"
    error = row.locator(".dcc-error")
    assert error.inner_text().startswith("container exited with code 137")
    error_box = error.bounding_box()
    assert error_box is not None and error_box["x"] + error_box["width"] <= widths["filters"]
    # The import-feed job failed without running: its error is in the list too.
    assert (
        "image not found"
        in page.locator("#result_list tbody tr", has_text="import-feed").inner_text()
    )


def test_a_failed_job_page_leads_with_its_error(
    browser_page: Any, live_server: Any, django_user_model: Any
) -> None:
    page = browser_page
    page.set_viewport_size({"width": 1366, "height": 768})
    job = ContainerJob.objects.create(
        name="monthly-invoices",
        docker_image="busybox:latest",
        command="sh -c 'exit 3'",
        description="Renders the invoices of the month.\n" * 8,
        environment={f"SETTING_{n}": f"value-{n}" for n in range(12)},
        status=Status.FAILED,
        exit_code=3,
        attempt=4,
        retry_count=3,
        queued_at=timezone.now() - timedelta(minutes=30),
        launched_at=timezone.now() - timedelta(minutes=5),
        started_at=timezone.now() - timedelta(minutes=5),
        completed_at=timezone.now() - timedelta(minutes=4),
        last_error="container exited with code 3 (no retries left)",
        last_error_at=timezone.now() - timedelta(minutes=4),
    )
    log_in(
        page,
        live_server,
        django_user_model,
        f"/admin/django_container_celery/containerjob/{job.pk}/change/",
    )
    error = page.locator("pre.dcc-error-text")
    error.wait_for()
    page.screenshot(path=str(OUTPUT / "failed-job-1366.png"))
    box = error.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 768, f"error below the fold: {box}"
    assert error.inner_text() == "container exited with code 3 (no retries left)"
    exit_code = page.locator(".field-exit_code_shown .dcc-exit-bad")
    assert exit_code.inner_text() == "3"
    exit_box = exit_code.bounding_box()
    assert exit_box is not None and exit_box["y"] <= 768
    # The outcome comes before the definition; priority is shown, not offered as an input.
    outcome_y = page.locator("fieldset", has_text="Outcome").first.bounding_box()
    definition_y = page.locator("fieldset", has_text="Definition").first.bounding_box()
    assert outcome_y is not None and definition_y is not None
    assert outcome_y["y"] < definition_y["y"]
    assert page.locator("input[name=priority]").count() == 0


def test_a_job_that_recovered_shows_its_old_error_as_history(
    browser_page: Any, live_server: Any, django_user_model: Any
) -> None:
    page = browser_page
    page.set_viewport_size({"width": 1366, "height": 768})
    finished = timezone.now() - timedelta(minutes=4)
    job = ContainerJob.objects.create(
        name="flaky-sync",
        docker_image="busybox:latest",
        status=Status.COMPLETED,
        exit_code=0,
        attempt=2,
        retry_count=1,
        queued_at=timezone.now() - timedelta(minutes=30),
        scheduled_for=timezone.now() - timedelta(minutes=25),
        launched_at=timezone.now() - timedelta(minutes=5),
        started_at=timezone.now() - timedelta(minutes=5),
        completed_at=timezone.now() - timedelta(minutes=4),
        last_error="container exited with code 1 (retry 1 of 3)",
        last_error_at=timezone.now() - timedelta(minutes=20),
    )
    ended = timezone.now() - timedelta(minutes=20)
    JobAttempt.objects.create(
        job=job,
        attempt=1,
        reason=JobAttempt.Reason.EXITED,
        exit_code=1,
        error="container exited with code 1 (retry 1 of 3)",
        started_at=ended - timedelta(seconds=12),
        ended_at=ended,
        retried=True,
    )
    JobAttempt.objects.create(
        job=job,
        attempt=2,
        reason=JobAttempt.Reason.EXITED,
        exit_code=0,
        started_at=finished - timedelta(minutes=1),
        ended_at=finished,
    )
    log_in(
        page,
        live_server,
        django_user_model,
        f"/admin/django_container_celery/containerjob/{job.pk}/change/",
    )
    page.wait_for_selector(".field-status_badge")
    page.screenshot(path=str(OUTPUT / "recovered-job-1366.png"), full_page=True)
    outcome = page.locator("fieldset", has_text="Outcome").first
    assert "code 1" not in outcome.inner_text()
    history = page.locator("fieldset.dcc-history")
    assert "container exited with code 1" in history.inner_text()
    assert page.locator(".field-last_error_at").count() == 0
    assert "Was scheduled for" in history.inner_text()
    attempts = page.locator("table.dcc-attempts tbody tr")
    assert attempts.count() == 2
    assert "Exited (1)" in attempts.nth(0).inner_text()
    assert "retried" in attempts.nth(0).inner_text()
    assert "Exited (0)" in attempts.nth(1).inner_text()
    assert page.locator(".field-scheduled_for").count() == 0
