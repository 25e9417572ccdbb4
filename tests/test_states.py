"""The transition table, through transition_to() and save(), and under racing processes."""

from __future__ import annotations

import itertools

import pytest

from django_container_celery import states
from django_container_celery.exceptions import InvalidTransition, TransitionConflict
from django_container_celery.models import ContainerJob
from django_container_celery.states import Status

from .concurrency import run_in_processes

ALL = [s.value for s in Status]
PAIRS = [(old, new) for old, new in itertools.product(ALL, ALL) if old != new]
EXPECTED_EDGES = {
    ("pending", "queued"),
    ("pending", "cancelled"),
    ("queued", "launching"),
    ("queued", "pending"),
    ("queued", "cancelled"),
    ("retrying", "launching"),
    ("retrying", "pending"),
    ("retrying", "cancelled"),
    ("launching", "running"),
    ("launching", "retrying"),
    ("launching", "failed"),
    ("launching", "queued"),
    ("launching", "cancelled"),
    ("running", "completed"),
    ("running", "failed"),
    ("running", "retrying"),
    ("running", "cancelled"),
    ("failed", "queued"),
    ("queued", "failed"),
    ("retrying", "failed"),
}


def make_job(status: str = "pending", **fields: object) -> ContainerJob:
    return ContainerJob.objects.create(docker_image="busybox:latest", status=status, **fields)


def test_table_is_the_documented_one() -> None:
    edges = {(old, new) for old, targets in states.VALID_TRANSITIONS.items() for new in targets}
    assert edges == EXPECTED_EDGES
    assert ContainerJob.VALID_TRANSITIONS is states.VALID_TRANSITIONS


def test_table_is_consistent() -> None:
    assert set(states.VALID_TRANSITIONS) == set(ALL)
    for status in states.TERMINAL:
        assert states.VALID_TRANSITIONS[status] == frozenset()
    # Every non-final status can be cancelled; a new job can reach every status.
    for status in states.CANCELLABLE:
        assert Status.CANCELLED in states.VALID_TRANSITIONS[status]
    reached, frontier = {Status.PENDING.value}, [Status.PENDING.value]
    while frontier:
        for nxt in states.VALID_TRANSITIONS[frontier.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(ALL)


@pytest.mark.django_db
@pytest.mark.parametrize(("old", "new"), PAIRS)
def test_transition_to_every_pair(old: str, new: str) -> None:
    job = make_job(old)
    assert job.can_transition_to(new) == ((old, new) in EXPECTED_EDGES)
    if (old, new) in EXPECTED_EDGES:
        job.transition_to(new)
        assert job.status == new
        assert ContainerJob.objects.get(pk=job.pk).status == new
    else:
        with pytest.raises(InvalidTransition) as info:
            job.transition_to(new)
        assert f"'{old}'" in str(info.value) and f"'{new}'" in str(info.value)
        assert isinstance(info.value, ValueError)
        assert job.status == old
        assert ContainerJob.objects.get(pk=job.pk).status == old


@pytest.mark.django_db
@pytest.mark.parametrize(("old", "new"), PAIRS)
def test_save_every_pair(old: str, new: str) -> None:
    job = make_job(old)
    job.status = new
    if (old, new) in EXPECTED_EDGES:
        job.save()
        assert ContainerJob.objects.get(pk=job.pk).status == new
    else:
        with pytest.raises(InvalidTransition):
            job.save()
        assert ContainerJob.objects.get(pk=job.pk).status == old


@pytest.mark.django_db
def test_save_judges_against_the_database_not_the_instance() -> None:
    job = make_job("queued")
    stale = ContainerJob.objects.get(pk=job.pk)
    job.transition_to(Status.LAUNCHING)
    job.transition_to(Status.RUNNING)
    stale.status = Status.PENDING  # queued -> pending is legal, running -> pending is not
    with pytest.raises(InvalidTransition):
        stale.save()
    assert ContainerJob.objects.get(pk=job.pk).status == Status.RUNNING


@pytest.mark.django_db
def test_save_without_status_change_is_allowed() -> None:
    job = make_job("completed")
    job.name = "renamed"
    job.save()
    assert ContainerJob.objects.get(pk=job.pk).name == "renamed"


@pytest.mark.django_db
def test_stale_instance_gets_a_conflict_and_writes_nothing() -> None:
    job = make_job("queued")
    stale = ContainerJob.objects.get(pk=job.pk)
    job.transition_to(Status.CANCELLED)
    with pytest.raises(TransitionConflict) as info:
        stale.transition_to(Status.LAUNCHING, claimed_by="w1")
    assert "cancelled" in str(info.value)
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.claimed_by) == (Status.CANCELLED, "")


@pytest.mark.django_db
def test_claimant_write_refused_after_takeover() -> None:
    job = make_job("running", claimed_by="old-worker", attempt=1)
    ContainerJob.objects.filter(pk=job.pk).update(claimed_by="rescuer")
    with pytest.raises(TransitionConflict):
        job.transition_to(Status.COMPLETED, as_claimant=True, exit_code=0)
    assert not job.update_as_claimant(exit_code=0)
    row = ContainerJob.objects.get(pk=job.pk)
    assert (row.status, row.exit_code, row.claimed_by) == (Status.RUNNING, None, "rescuer")


@pytest.mark.django_db
def test_save_false_changes_only_the_instance() -> None:
    job = make_job("pending")
    job.transition_to(Status.QUEUED, save=False)
    assert job.status == Status.QUEUED
    assert ContainerJob.objects.get(pk=job.pk).status == Status.PENDING


def _race_transition(index: int, job_id: str) -> str:
    job = ContainerJob.objects.get(pk=job_id)
    try:
        job.transition_to(Status.LAUNCHING, claimed_by=f"worker-{index}")
    except InvalidTransition:  # a conflict, or the row already moved before we read it
        return "lost"
    return "won"


@pytest.mark.django_db(transaction=True)
def test_racing_processes_exactly_one_wins() -> None:
    for _round in range(3):
        job = make_job("queued")
        outcomes = run_in_processes(_race_transition, 6, str(job.pk))
        assert sorted(outcomes) == ["lost"] * 5 + ["won"]
        row = ContainerJob.objects.get(pk=job.pk)
        assert row.status == Status.LAUNCHING
        assert row.claimed_by == f"worker-{outcomes.index('won')}"
