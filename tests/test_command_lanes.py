"""``manage.py container_lanes``: list, set, pause and resume, against the test database.

A command that refuses its input must change nothing: every refusal is checked against
the rows afterwards.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from django_container_celery import lanes
from django_container_celery.models import ContainerJob, Lane
from django_container_celery.states import Status

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("container_lanes", *args, stdout=out)
    return out.getvalue()


def state() -> list[tuple[Any, ...]]:
    """Every lane as the command may change it."""
    return list(
        Lane.objects.order_by("name").values_list(
            "name", "max_concurrent_jobs", "description", "is_paused", "paused_by"
        )
    )


def make_job(lane: str, status: str) -> ContainerJob:
    return ContainerJob.objects.create(
        docker_image="busybox:latest", lane=lane, status=status, queued_at=timezone.now()
    )


def test_list_without_lanes() -> None:
    assert run("list") == "no lanes\n"


def test_set_creates_then_updates_a_lane() -> None:
    assert run("set", "batch", "--limit", "4", "--description", "Nightly work") == (
        "lane batch: created (limit 4)\n"
    )
    assert state() == [("batch", 4, "Nightly work", False, "")]
    assert run("set", "batch", "--limit", "6") == "lane batch: updated (limit 6)\n"
    assert state() == [("batch", 6, "Nightly work", False, "")]
    assert run("set", "batch", "--no-limit") == "lane batch: updated (no limit)\n"
    assert run("set", "batch", "--no-limit") == "lane batch: unchanged (no limit)\n"
    assert run("set", "adhoc") == "lane adhoc: created (no limit)\n"
    assert state() == [("adhoc", None, "", False, ""), ("batch", None, "Nightly work", False, "")]


def test_set_leaves_a_pause_alone() -> None:
    run("set", "batch", "--limit", "2")
    lanes.pause(["batch"], by="on-call")
    run("set", "batch", "--limit", "3")
    assert state() == [("batch", 3, "", True, "on-call")]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["set", "batch", "--limit", "0"], "--limit (max_concurrent_jobs)"),
        (["set", "batch", "--limit", "-2"], "--limit (max_concurrent_jobs)"),
        (["set", "no spaces", "--limit", "2"], "NAME"),
        (["set", "-dash-first"], None),
        (["set", "batch", "--limit", "two"], "--limit"),
        (["set", "batch", "--limit", "2", "--no-limit"], "--no-limit"),
    ],
)
def test_set_refuses_invalid_values_and_saves_nothing(args: list[str], named: str | None) -> None:
    run("set", "batch", "--limit", "5", "--description", "kept")
    before = state()
    with pytest.raises(CommandError) as refused:
        run(*args)
    if named is not None:
        assert named in str(refused.value)
    assert state() == before


def test_list_shows_limit_holding_waiting_and_pause() -> None:
    run("set", "batch", "--limit", "2")
    run("set", "adhoc")
    make_job("batch", Status.RUNNING)
    make_job("batch", Status.QUEUED)
    make_job("batch", Status.RETRYING)
    make_job("batch", Status.COMPLETED)
    make_job("adhoc", Status.LAUNCHING)
    run("pause", "adhoc", "--by", "night-shift")
    lines = run("list").splitlines()
    assert lines[1] == "lane batch: limit 2, holding 1, waiting 2, not paused"
    assert lines[0].startswith("lane adhoc: no limit, holding 1, waiting 0, paused since ")
    assert lines[0].endswith(" by night-shift")


def test_pause_and_resume() -> None:
    for name in ("a", "b", "c"):
        run("set", name)
    out = run("pause", "a", "b", "--by", "ops")
    assert out.splitlines()[:2] == ["lane a: paused", "lane b: paused"]
    assert [row[3:] for row in state()] == [(True, "ops"), (True, "ops"), (False, "")]
    assert run("pause", "b", "c", "--by", "ops").splitlines()[:2] == [
        "lane b: already paused",
        "lane c: paused",
    ]
    assert run("resume", "a", "a").splitlines() == ["lane a: resumed"]
    assert run("resume", "a").splitlines() == ["lane a: not paused"]
    assert [row[3] for row in state()] == [False, True, True]


def test_pause_without_by_records_the_system_user() -> None:
    run("set", "batch")
    run("pause", "batch")
    (lane,) = Lane.objects.all()
    assert lane.is_paused and lane.paused_by.endswith("(container_lanes)")


@pytest.mark.parametrize("action", ["pause", "resume"])
def test_unknown_lanes_are_listed_and_nothing_changes(action: str) -> None:
    run("set", "known")
    run("set", "held")
    lanes.pause(["held"], by="ops")
    before = state()
    target = "known" if action == "pause" else "held"
    with pytest.raises(CommandError) as refused:
        run(action, target, "ghost", "phantom")
    assert "no lane named ghost, phantom" in str(refused.value)
    assert state() == before


def test_an_action_is_required() -> None:
    with pytest.raises(CommandError):
        run()
