"""Where an operator sees memory and CPU: the admin's job page, host list, dashboard and
capacity action, the ``container_hosts`` command and ``process_container_jobs --dry-run``.

Real PostgreSQL throughout; the in-memory executor stands in for Docker except where a
daemon's own figures are the point.
"""

from __future__ import annotations

import itertools
from io import StringIO
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_container_celery.exceptions import ExecutorError
from django_container_celery.executors import (
    DaemonInfo,
    clear_executor_cache,
    reset_memory_executor,
)
from django_container_celery.executors.docker import DockerExecutor, daemon_info_from
from django_container_celery.executors.memory import MemoryExecutor
from django_container_celery.hosts import read_capacity
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.states import Status

from .admin_support import staff_client

pytestmark = pytest.mark.django_db

APP = "django_container_celery"
HOSTS_CHANGELIST = f"admin:{APP}_executorhost_changelist"
MEMORY_LINE = "host small: memory: 900 of 1024 MiB in use, the job needs 300 MiB"

_names = itertools.count()


@pytest.fixture(autouse=True)
def memory_docker(settings: Any) -> MemoryExecutor:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "memory"}
    return reset_memory_executor()


@pytest.fixture
def hosts_admin(django_user_model: Any) -> Client:
    """A staff client that may view and change hosts, and nothing else."""
    return staff_client(django_user_model, "view_executorhost", "change_executorhost")


@pytest.fixture
def hosts_viewer(django_user_model: Any) -> Client:
    return staff_client(django_user_model, "view_executorhost")


def make_job(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "true")
    fields.setdefault("name", f"job-{next(_names)}")
    return ContainerJob.objects.create(**fields)


def small_host_with_900_mib_used() -> ExecutorHost:
    """``small``: 1024 MiB, three running jobs of 300 MiB; a fourth does not fit."""
    small = ExecutorHost.objects.create(name="small", memory_capacity_mb=1024)
    for _ in range(3):
        make_job(status=Status.RUNNING, assigned_host=small, memory_limit=300)
    return small


def waiting_job(**fields: Any) -> ContainerJob:
    return make_job(status=Status.QUEUED, queued_at=timezone.now(), **fields)


def texts(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def reload(host: ExecutorHost) -> ExecutorHost:
    return ExecutorHost.objects.get(pk=host.pk)


# -- the job page ---------------------------------------------------------------------------


def test_job_page_says_why_a_job_waits_for_memory(admin_client: Client) -> None:
    small = small_host_with_900_mib_used()
    blocked = waiting_job(memory_limit=300, docker_host=small)
    page = admin_client.get(reverse(f"admin:{APP}_containerjob_change", args=[blocked.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Why is this job waiting?" in html
    assert f"<li>{MEMORY_LINE}</li>" in html

    running = ContainerJob.objects.filter(assigned_host=small).first()
    assert running is not None
    page = admin_client.get(reverse(f"admin:{APP}_containerjob_change", args=[running.pk]))
    assert "Why is this job waiting?" not in page.content.decode()


# -- the host list and the dashboard ----------------------------------------------------------


def test_host_list_shows_memory_and_cpu_used_against_capacity(admin_client: Client) -> None:
    small_host_with_900_mib_used()
    counted = ExecutorHost.objects.create(name="counted", cpu_capacity=4)
    make_job(status=Status.RUNNING, assigned_host=counted, cpu_limit=1.5)
    ExecutorHost.objects.create(name="idle")
    html = admin_client.get(reverse(HOSTS_CHANGELIST)).content.decode()
    assert "900 / 1024 MiB" in html
    # Jobs without a CPU limit count for DEFAULT_JOB_CPUS (1.0) each.
    assert "3 cores (not counted)" in html
    assert "1.5 / 4 cores" in html
    assert "256 MiB (not counted)" in html  # DEFAULT_JOB_MEMORY_MB for the job on "counted"
    assert "0 MiB (not counted)" in html and "0 cores (not counted)" in html


def test_host_list_reads_the_rooms_once_per_page(admin_client: Client) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(reverse(HOSTS_CHANGELIST)).status_code == 200
        return len(captured)

    small_host_with_900_mib_used()
    first = queries()
    for n in range(4):
        host = ExecutorHost.objects.create(name=f"more-{n}", memory_capacity_mb=2048)
        make_job(status=Status.RUNNING, assigned_host=host, memory_limit=100)
    assert queries() == first


def test_host_form_edits_the_capacity(hosts_admin: Client) -> None:
    host = ExecutorHost.objects.create(name="edit-me")
    change = reverse(f"admin:{APP}_executorhost_change", args=[host.pk])
    html = hosts_admin.get(change).content.decode()
    assert 'name="memory_capacity_mb"' in html and 'name="cpu_capacity"' in html
    data = {
        "name": "edit-me",
        "connection_string": host.connection_string,
        "is_active": "on",
        "max_concurrent_jobs": "10",
        "weight": "1",
        "memory_capacity_mb": "2048",
        "cpu_capacity": "1.5",
    }
    assert hosts_admin.post(change, data).status_code == 302
    assert (reload(host).memory_capacity_mb, reload(host).cpu_capacity) == (2048, 1.5)


def test_dashboard_shows_memory_and_cpu_per_host(admin_client: Client) -> None:
    small_host_with_900_mib_used()
    tight = ExecutorHost.objects.create(name="tight", memory_capacity_mb=600, cpu_capacity=2)
    for _ in range(2):
        make_job(status=Status.RUNNING, assigned_host=tight, memory_limit=300, cpu_limit=0.5)
    response = admin_client.get(reverse(f"admin:{APP}_containerjob_dashboard"))
    assert response.status_code == 200
    rows = {row["host"].name: row for row in response.context["hosts"]}
    assert (rows["small"]["memory"], rows["small"]["cpu"]) == (
        "900 / 1024 MiB",
        "3 cores (not counted)",
    )
    assert not rows["small"]["memory_full"]
    assert (rows["tight"]["memory"], rows["tight"]["cpu"]) == ("600 / 600 MiB", "1 / 2 cores")
    assert rows["tight"]["memory_full"] and not rows["tight"]["cpu_full"]
    html = response.content.decode()
    assert "Memory used / capacity" in html
    assert "900 / 1024 MiB" in html and "1 / 2 cores" in html
    assert 'dcc-host-memory dcc-load-full">600 / 600 MiB' in html


# -- reading capacity from the daemon -----------------------------------------------------------


def test_read_capacity_action_sets_capacity_less_the_reserves(
    hosts_admin: Client, hosts_viewer: Client, memory_docker: MemoryExecutor
) -> None:
    first = ExecutorHost.objects.create(name="first")
    second = ExecutorHost.objects.create(name="second", memory_capacity_mb=64)
    data = {
        "action": "read_capacity_from_daemon",
        "_selected_action": [first.pk, second.pk],
        "index": "0",
    }
    assert hosts_viewer.post(reverse(HOSTS_CHANGELIST), data).status_code == 403
    assert reload(first).memory_capacity_mb is None

    response = hosts_admin.post(reverse(HOSTS_CHANGELIST), data)
    assert response.status_code == 302
    # The fake's machine: 8 GiB and 4 cores, less 512 MiB and half a core.
    for host in (first, second):
        assert (reload(host).memory_capacity_mb, reload(host).cpu_capacity) == (7680, 3.5)
    messages = texts(response)
    assert "first: memory capacity set to 7680 MiB, CPU capacity to 3.5." in messages
    assert "second: memory capacity set to 7680 MiB, CPU capacity to 3.5." in messages


def test_read_capacity_action_reports_a_daemon_that_cannot_tell(
    hosts_admin: Client, memory_docker: MemoryExecutor
) -> None:
    host = ExecutorHost.objects.create(name="down", memory_capacity_mb=2048, cpu_capacity=2)
    memory_docker.info_error = ConnectionError("connection refused")
    data = {"action": "read_capacity_from_daemon", "_selected_action": [host.pk], "index": "0"}
    response = hosts_admin.post(reverse(HOSTS_CHANGELIST), data)
    assert response.status_code == 302
    (message,) = texts(response)
    assert message.startswith("down: could not read the capacity from ")
    assert message.endswith("connection refused")
    assert (reload(host).memory_capacity_mb, reload(host).cpu_capacity) == (2048, 2.0)


def test_read_capacity_follows_the_reserve_settings_and_refuses_a_tiny_daemon(
    settings: Any,
) -> None:
    host = ExecutorHost.objects.create(name="tiny")
    fake = MemoryExecutor()
    fake.daemon_info = DaemonInfo(memory_mb=16384, cpus=8.0)
    settings.CONTAINER_CELERY = {
        **settings.CONTAINER_CELERY,
        "HOST_MEMORY_RESERVE_MB": 2048,
        "HOST_CPU_RESERVE": 1.5,
    }
    assert read_capacity(host, fake) == (14336, 6.5)
    fake.daemon_info = DaemonInfo(memory_mb=1000, cpus=1.0)
    with pytest.raises(ExecutorError, match="less than one job without limits counts for"):
        read_capacity(host, fake)  # a 4 MiB capacity would fail every waiting job
    fake.daemon_info = DaemonInfo(memory_mb=16384, cpus=2.0)  # 0.5 CPUs: no default job fits
    with pytest.raises(ExecutorError, match="DEFAULT_JOB_CPUS"):
        read_capacity(host, fake)


def test_container_hosts_lists_capacity_and_use() -> None:
    small_host_with_900_mib_used()
    ExecutorHost.objects.create(name="off", is_active=False, cpu_capacity=2)
    out = StringIO()
    call_command("container_hosts", stdout=out)
    assert out.getvalue().splitlines() == [
        "host small (active): slots 3 / 10, memory 900 / 1024 MiB, CPU 3 cores (not counted)",
        "host off (inactive): slots 0 / 10, memory 0 MiB (not counted), CPU 0 / 2 cores",
    ]


def test_container_hosts_reports_unknown_names_and_daemons_that_fail(
    memory_docker: MemoryExecutor,
) -> None:
    ExecutorHost.objects.create(name="a")
    with pytest.raises(CommandError, match="no executor host named nope"):
        call_command("container_hosts", "--read-capacity", "a", "nope")
    memory_docker.info_error = ConnectionError("no route to host")
    err = StringIO()
    with pytest.raises(CommandError, match="1 host"):
        call_command("container_hosts", "--read-capacity", stdout=StringIO(), stderr=err)
    assert "host a: capacity not read: no route to host" in err.getvalue()


@pytest.mark.docker
def test_container_hosts_reads_capacity_from_the_real_daemon(
    settings: Any, docker_client: Any
) -> None:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "docker"}
    local = ExecutorHost.objects.create(name="local", connection_string=settings.DOCKER_HOST)
    inactive = ExecutorHost.objects.create(
        name="resting", connection_string="tcp://127.0.0.1:1", is_active=False
    )
    info = docker_client.info()
    expected_memory = int(info["MemTotal"]) // (1024 * 1024) - 512
    expected_cpus = float(info["NCPU"]) - 0.5
    out = StringIO()
    try:
        call_command("container_hosts", "--read-capacity", stdout=out)
    finally:
        clear_executor_cache()
    assert out.getvalue() == (
        f"host local: memory_capacity_mb={expected_memory} cpu_capacity={expected_cpus:g}\n"
    )
    local = reload(local)
    assert local.memory_capacity_mb == expected_memory
    assert local.cpu_capacity == pytest.approx(expected_cpus)
    # No name: active hosts only, so the inactive one's unreachable daemon was not asked.
    assert reload(inactive).memory_capacity_mb is None


# -- process_container_jobs --dry-run -----------------------------------------------------------


def test_dry_run_says_why_jobs_would_not_launch() -> None:
    small = small_host_with_900_mib_used()
    roomy = ExecutorHost.objects.create(name="roomy", memory_capacity_mb=4096)
    blocked = waiting_job(memory_limit=300, docker_host=small, priority=90)
    goes = waiting_job(memory_limit=300, priority=50)
    before = list(ContainerJob.objects.order_by("pk").values_list("status", "claimed_by"))

    out = StringIO()
    call_command("process_container_jobs", "--dry-run", "--max-concurrent", "10", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "dry run: 1 job(s) would be launched now"
    assert lines[1] == f"  {goes.pk} priority=50 image=busybox:latest"
    assert lines[2] == f"  {blocked.pk} priority=90 waits: {MEMORY_LINE}"
    assert len(lines) == 4  # then the metrics
    assert list(ContainerJob.objects.order_by("pk").values_list("status", "claimed_by")) == before
    assert not ContainerJob.objects.filter(assigned_host=roomy).exists()


def test_dry_run_names_the_global_limit_for_jobs_that_fit_a_host() -> None:
    ExecutorHost.objects.create(name="roomy", memory_capacity_mb=4096)
    first = waiting_job(priority=90)
    second = waiting_job(priority=50)
    out = StringIO()
    call_command("process_container_jobs", "--dry-run", "--max-concurrent", "1", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[:2] == [
        "dry run: 1 job(s) would be launched now",
        f"  {first.pk} priority=90 image=busybox:latest",
    ]
    assert lines[2] == (
        f"  {second.pk} priority=50 waits: the free slots under the limit of 1 jobs go to the "
        "jobs above"
    )


def test_docker_info_errors_become_executor_errors() -> None:
    assert daemon_info_from({"MemTotal": 3 * 1024**3 + 5, "NCPU": 6}) == DaemonInfo(3072, 6.0)
    with pytest.raises(ExecutorError, match="MemTotal"):
        daemon_info_from({"NCPU": 2})
    nowhere = DockerExecutor("tcp://127.0.0.1:1", timeout=2)
    with pytest.raises(ExecutorError) as caught:
        nowhere.info()
    assert caught.value.original is not None
