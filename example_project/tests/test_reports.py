"""Tests of the reports app's container tasks, without Docker.

``eager_containers`` (from django_container_celery.testing) runs each job in the test,
through the real engine, against an in-memory Docker that records what would have run.
"""

from __future__ import annotations

from celery import chain
from reports.tasks import (
    TEMPORARY_FAILURE,
    build_report,
    export_archive,
    greet,
    sync_upstream,
    tidy_up,
)

from django_container_celery.testing import wait_for_job


def test_build_report_runs_its_script_with_the_report_settings(eager_containers):
    eager_containers.program(build_report, stdout="report ready as csv\n")

    result = build_report.delay(pages=2)

    assert result.get()["stdout"] == "report ready as csv\n"
    (container,) = eager_containers.started_for(build_report)
    assert container.command[:2] == ["sh", "-c"]
    assert "seq 2" in container.command[2]
    assert container.environment["REPORT_FORMAT"] == "csv"
    assert container.memory_mb == 64


def test_sync_upstream_is_retried_when_the_upstream_is_busy(eager_containers):
    eager_containers.program(sync_upstream, stdout="upstream answered\n")
    eager_containers.program(sync_upstream, exit_code=TEMPORARY_FAILURE, times=1)

    result = sync_upstream.delay("tok-1")

    assert result.get()["stdout"] == "upstream answered\n"
    job = wait_for_job(result)
    assert (job.attempt, job.retry_count) == (2, 1)


def test_export_archive_is_killed_after_its_timeout(eager_containers):
    eager_containers.program(export_archive, duration=60)

    job = wait_for_job(export_archive.delay(60))

    assert job.status == "failed"
    assert "timed out after 5 seconds" in job.last_error


def test_greeting_then_tidy_up_in_a_chain(eager_containers):
    eager_containers.program(greet, stdout="Hello, Ada!\n")
    eager_containers.program(tidy_up, stdout="nothing left to tidy\n")

    result = chain(greet.si("Ada"), tidy_up.si()).apply_async()

    assert result.get()["stdout"] == "nothing left to tidy\n"
    assert [c.command for c in eager_containers.started_for(greet)] == [["echo", "Hello, Ada!"]]
