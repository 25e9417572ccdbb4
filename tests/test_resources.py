"""Resource-aware claims: a job is admitted on a host only where its memory and CPU fit,
with real PostgreSQL (the in-memory executor stands in for Docker where the launch does
not matter)."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError

from django_container_celery import claims, dispatch, placement
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.states import Status

from .concurrency import run_in_processes

pytestmark = pytest.mark.django_db


def host(name: str = "small", **fields: Any) -> ExecutorHost:
    fields.setdefault("max_concurrent_jobs", 10)
    return ExecutorHost.objects.create(name=name, **fields)


def queued(priority: int = 50, **fields: Any) -> ContainerJob:
    job = ContainerJob.objects.create_job(docker_image="busybox", command="true", **fields)
    ContainerJob.objects.filter(pk=job.pk).update(priority=priority)
    job.refresh_from_db()
    job.mark_as_queued()
    return job


def claimed_ids(worker: str = "w", **kwargs: Any) -> list[Any]:
    taken = []
    while (job := claims.claim_next(worker, **kwargs)) is not None:
        taken.append(job.pk)
    return taken


def test_memory_capacity_admits_what_fits() -> None:
    small = host(memory_capacity_mb=1024)
    jobs = [queued(memory_limit=300) for _ in range(5)]
    taken = claimed_ids()
    assert taken == [job.pk for job in jobs[:3]]  # 900 MiB; a fourth would need 1200
    assert ContainerJob.objects.filter(assigned_host=small, status=Status.LAUNCHING).count() == 3


def test_two_cpus_hold_one_and_a_half_plus_a_half() -> None:
    host(cpu_capacity=2.0)
    big = queued(cpu_limit=1.5, priority=90)
    half = queued(cpu_limit=0.5, priority=10)
    assert claimed_ids() == [big.pk, half.pk]


def test_two_cpus_do_not_hold_two_jobs_of_one_and_a_half() -> None:
    host(cpu_capacity=2.0)
    first = queued(cpu_limit=1.5)
    second = queued(cpu_limit=1.5)
    assert claimed_ids() == [first.pk]
    assert ContainerJob.objects.get(pk=second.pk).status == Status.QUEUED


def test_a_job_without_limits_counts_the_defaults(settings: Any) -> None:
    settings.CONTAINER_CELERY = {
        **settings.CONTAINER_CELERY,
        "DEFAULT_JOB_MEMORY_MB": 400,
        "DEFAULT_JOB_CPUS": 0.25,
    }
    host(memory_capacity_mb=1000)
    jobs = [queued() for _ in range(3)]
    assert claimed_ids() == [job.pk for job in jobs[:2]]


def test_unpinned_jobs_go_where_they_fit() -> None:
    host("tiny", memory_capacity_mb=256, weight=1000)
    roomy = host("roomy", memory_capacity_mb=4096, weight=1)
    big = queued(memory_limit=1024)
    job = claims.claim_next("w")
    assert job is not None and job.pk == big.pk and job.assigned_host_id == roomy.pk


def test_a_big_job_reserves_a_host_instead_of_starving() -> None:
    small = host(memory_capacity_mb=1024)
    running = [queued(memory_limit=300) for _ in range(3)]
    assert claimed_ids() == [job.pk for job in running]
    big = queued(memory_limit=1000, priority=80)
    little = queued(memory_limit=100, priority=50)
    # 124 MiB are free: the little job would fit, but the big one comes first and has
    # reserved the host, so nothing starts there by queue order.
    assert claims.claim_next("w") is None
    lines = placement.why_waiting(little)
    assert any("reserved for job" in line and "small" in line for line in lines), lines
    # Another host is not held back by the reservation.
    other = host("other", memory_capacity_mb=512)
    job = claims.claim_next("w")
    assert job is not None and job.pk == little.pk and job.assigned_host_id == other.pk
    # Once the small host's jobs end, the big one starts there.
    ContainerJob.objects.filter(pk__in=[j.pk for j in running]).update(status=Status.COMPLETED)
    job = claims.claim_next("w")
    assert job is not None and job.pk == big.pk and job.assigned_host_id == small.pk


def test_a_job_bigger_than_every_host_is_refused_naming_the_field() -> None:
    host(memory_capacity_mb=2048, cpu_capacity=4)
    with pytest.raises(ValidationError) as memory:
        ContainerJob.objects.create_job(docker_image="busybox", command="true", memory_limit=4096)
    assert "memory_limit" in memory.value.message_dict
    assert "2048 MiB" in memory.value.message_dict["memory_limit"][0]
    with pytest.raises(ValidationError) as cpu:
        ContainerJob.objects.create_job(docker_image="busybox", command="true", cpu_limit=8)
    assert "cpu_limit" in cpu.value.message_dict
    assert not ContainerJob.objects.exists()


def test_a_host_without_capacity_holds_anything() -> None:
    host("counted", memory_capacity_mb=512)
    host("uncounted")
    job = ContainerJob.objects.create_job(docker_image="busybox", command="true", memory_limit=8192)
    assert job.pk is not None


def test_a_job_that_hosts_shrank_under_ends_failed_with_the_reason() -> None:
    small = host(memory_capacity_mb=2048)
    job = queued(memory_limit=1500)
    fits = queued(memory_limit=100)
    # As a job waiting for a retry has: its earlier attempt's exit code.
    ContainerJob.objects.filter(pk=job.pk).update(exit_code=3)
    ExecutorHost.objects.filter(pk=small.pk).update(memory_capacity_mb=1024)
    assert dispatch.refuse_unfittable() == 1
    row = ContainerJob.objects.get(pk=job.pk)
    assert row.status == Status.FAILED
    assert "1500 MiB" in row.last_error and "1024 MiB" in row.last_error
    assert row.exit_code is None
    assert ContainerJob.objects.get(pk=fits.pk).status == Status.QUEUED


def test_a_job_pinned_to_a_switched_off_host_waits_unless_the_host_shrank_under_it() -> None:
    off = host("off", memory_capacity_mb=512)
    job = queued(memory_limit=400, docker_host=off)
    ExecutorHost.objects.filter(pk=off.pk).update(is_active=False)
    assert dispatch.refuse_unfittable() == 0
    assert ContainerJob.objects.get(pk=job.pk).status == Status.QUEUED
    assert any("inactive" in line for line in placement.why_waiting(job))
    ExecutorHost.objects.filter(pk=off.pk).update(memory_capacity_mb=128)
    assert dispatch.refuse_unfittable() == 1
    assert "its host" in ContainerJob.objects.get(pk=job.pk).last_error


def test_why_waiting_names_memory_and_the_host() -> None:
    small = host(memory_capacity_mb=1024)
    for _ in range(3):
        queued(memory_limit=300)
    claimed_ids()
    waiting = queued(memory_limit=300, docker_host=small)
    lines = placement.why_waiting(waiting)
    print("why waiting:", lines)
    assert lines == ["host small: memory: 900 of 1024 MiB in use, the job needs 300 MiB"]


@pytest.mark.django_db(transaction=True)
def test_racing_claimers_never_overfill_memory() -> None:
    host(memory_capacity_mb=1024)
    jobs = [queued(memory_limit=300) for _ in range(20)]

    def claim_all(index: int) -> int:
        return len(claimed_ids(f"racer-{index}"))

    counts = run_in_processes(claim_all, 3)
    print(f"claims per racer: {counts}")
    assert sum(counts) == 3
    assert ContainerJob.objects.filter(status=Status.LAUNCHING).count() == 3
    assert (
        ContainerJob.objects.filter(pk__in=[j.pk for j in jobs], status=Status.QUEUED).count() == 17
    )


def test_a_job_that_no_active_host_can_hold_does_not_block_the_reservation() -> None:
    a = host("a", memory_capacity_mb=1024)
    host("b", memory_capacity_mb=4096, is_active=False)
    running = queued(memory_limit=600)
    assert claimed_ids() == [running.pk]
    queued(memory_limit=100, priority=90, docker_host=ExecutorHost.objects.get(name="b"))
    big = queued(memory_limit=1000, priority=50)
    small = queued(memory_limit=100, priority=10)
    # The first job waits for a switched-off host: the big one behind it reserves a.
    assert claims.claim_next("w") is None
    assert any("reserved for job" in line for line in placement.why_waiting(small))
    ContainerJob.objects.filter(pk=running.pk).update(status=Status.COMPLETED)
    job = claims.claim_next("w")
    assert job is not None and job.pk == big.pk and job.assigned_host_id == a.pk


def test_limits_of_the_wrong_type_are_a_validation_error_not_a_crash() -> None:
    host(memory_capacity_mb=1024)
    for field, value in (("memory_limit", "abc"), ("cpu_limit", "x")):
        with pytest.raises(ValidationError) as error:
            ContainerJob(docker_image="busybox", command="true", **{field: value}).full_clean()
        assert field in error.value.message_dict


def test_a_record_of_a_job_that_ran_is_not_refused_when_hosts_shrink() -> None:
    small = host(memory_capacity_mb=1024)
    job = queued(memory_limit=600)
    assert claimed_ids() == [job.pk]
    ExecutorHost.objects.filter(pk=small.pk).update(memory_capacity_mb=500)
    ContainerJob.objects.get(pk=job.pk).full_clean()  # launching: left alone


def test_switching_the_big_host_off_does_not_fail_the_jobs_only_it_can_hold() -> None:
    big = host("big", memory_capacity_mb=8192)
    host("small", memory_capacity_mb=1024)
    job = queued(memory_limit=4096)
    ExecutorHost.objects.filter(pk=big.pk).update(is_active=False)
    assert dispatch.refuse_unfittable() == 0
    assert ContainerJob.objects.get(pk=job.pk).status == Status.QUEUED
    ExecutorHost.objects.filter(pk=big.pk).update(memory_capacity_mb=2048)
    assert dispatch.refuse_unfittable() == 1
    assert "every host" in ContainerJob.objects.get(pk=job.pk).last_error


def test_dispatch_counts_each_admitted_job_against_the_room_left() -> None:
    host(memory_capacity_mb=1024)
    jobs = [queued(memory_limit=300) for _ in range(6)]
    assert claims.eligible_ready_ids(10) == [job.pk for job in jobs[:3]]


def test_why_waiting_for_a_job_that_fits_names_the_queue_and_unreachable_daemons() -> None:
    from django.utils import timezone

    host(memory_capacity_mb=1024)
    job = queued(memory_limit=300)
    assert placement.why_waiting(job)[0].startswith(placement.FITS_NOW)
    ExecutorHost.objects.update(unreachable_since=timezone.now(), max_concurrent_jobs=1)
    queued(memory_limit=300, priority=90)
    claimed_ids()
    lines = placement.why_waiting(job)
    assert any("has not answered since" in line and "full" in line for line in lines), lines


def test_a_job_waiting_for_a_slot_elsewhere_does_not_take_the_big_jobs_reservation() -> None:
    slots_only = host("a", max_concurrent_jobs=1)
    big = host("big", memory_capacity_mb=4096)
    first = queued(docker_host=slots_only)
    assert claimed_ids() == [first.pk]  # host a is full now
    queued(priority=90, docker_host=slots_only)  # waits for a's slot
    running = queued(memory_limit=1024, docker_host=big)
    assert claims.claim_next("w") is not None  # 1024 of 4096 MiB in use now
    large = queued(memory_limit=4096, priority=50)
    queued(memory_limit=512, priority=10)
    # The large job reserves the big host: the 512 MiB job does not start there.
    assert claims.claim_next("w") is None
    ContainerJob.objects.filter(pk=running.pk).update(status=Status.COMPLETED)
    job = claims.claim_next("w")
    assert job is not None and job.pk == large.pk and job.assigned_host_id == big.pk


def test_dispatch_reads_past_jobs_that_do_not_fit_together() -> None:
    a = host("a", max_concurrent_jobs=1, memory_capacity_mb=1024)
    b = host("b", memory_capacity_mb=1024)
    first = queued(docker_host=a, priority=90)
    queued(docker_host=a, priority=80)
    on_b = queued(docker_host=b, priority=10)
    assert claims.eligible_ready_ids(2) == [first.pk, on_b.pk]


def test_host_rooms_count_only_the_jobs_holding_slots() -> None:
    idle, busy = host("idle", memory_capacity_mb=1024), host("busy", memory_capacity_mb=1024)
    ContainerJob.objects.create(
        docker_image="busybox", assigned_host=busy, status=Status.RUNNING, memory_limit=300
    )
    ContainerJob.objects.create(docker_image="busybox", assigned_host=busy, status=Status.RUNNING)
    for status in (Status.COMPLETED, Status.FAILED):
        ContainerJob.objects.create(
            docker_image="busybox", assigned_host=busy, status=status, memory_limit=500
        )
    ContainerJob.objects.create(
        docker_image="busybox", assigned_host=idle, status=Status.COMPLETED, stop_pending=False
    )
    rooms = {room.name: room for room in placement.host_rooms()}
    assert (rooms["idle"].used_slots, rooms["idle"].used_memory_mb) == (0, 0)
    assert rooms["idle"].used_cpus == 0.0
    # 300 MiB asked, plus the default for the job that asked nothing; ended jobs count not.
    assert (rooms["busy"].used_slots, rooms["busy"].used_memory_mb) == (2, 556)
    assert rooms["busy"].used_cpus == 2.0
