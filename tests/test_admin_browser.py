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

from django_container_celery.models import ContainerJob, ExecutorHost
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
