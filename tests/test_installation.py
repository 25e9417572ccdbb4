"""Installation scope: the id every container is labelled with, and sweeps and cleanup that
touch only their own installation's containers, even when two share one Docker daemon.

The two-installation test creates a second PostgreSQL database next to the test database,
runs the second installation in its own process against it, and drops it at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from django_container_celery import watching
from django_container_celery.executors import ContainerSpec, FakeRun
from django_container_celery.executors.docker import DockerExecutor
from django_container_celery.executors.memory import MemoryExecutor
from django_container_celery.installation import forget, installation_id
from django_container_celery.models import ContainerJob, Installation
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from . import celery_support
from .concurrency import run_in_processes

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
JOB_LABEL = "dcc.job_id"
INSTALLATION_LABEL = "dcc.installation"


def django_env(database_url: str) -> dict[str, str]:
    """The environment of a process of the installation whose database is at this URL."""
    env = dict(os.environ)
    env.update(DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=database_url)
    env.update(PYTHONPATH=str(ROOT))
    env.pop("DCC_TEST_DATABASE", None)
    return env


def run_python(database_url: str, code: str, *args: str) -> str:
    """Run ``code`` after django.setup() in a new process; its standard output."""
    script = f"import django\ndjango.setup()\n{code}"
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=django_env(database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def labelled(client: Any, installation: str) -> list[Any]:
    """Every container (running or exited) labelled with this installation's id."""
    filters = {"label": f"{INSTALLATION_LABEL}={installation}"}
    return list(client.containers.list(all=True, filters=filters))


def remove_labelled(client: Any, installation: str) -> None:
    for container in labelled(client, installation):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True, v=True)


def running_job(command: str, image: str = "busybox:latest", **fields: Any) -> ContainerJob:
    fields.setdefault("timeout_seconds", 120)
    job = ContainerJob.objects.create_job(command=command, docker_image=image, **fields)
    job.mark_as_queued()
    return job


def launch(manager: JobQueueManager, job: ContainerJob) -> ContainerJob:
    assert manager.launch_job(job)["success"]
    job.refresh_from_db()
    assert job.status == Status.RUNNING
    return job


def pretend(job: ContainerJob, status: Status, **fields: Any) -> None:
    """Set the row as a crash would leave it (its container not removed)."""
    fields.setdefault("completed_at", timezone.now())
    ContainerJob.objects.filter(pk=job.pk).update(status=status, claimed_by="", **fields)


def spec(labels: dict[str, str], image: str, command: list[str]) -> ContainerSpec:
    job_id = labels.get(JOB_LABEL, str(uuid.uuid4()))
    return ContainerSpec(
        name=f"dcc-{job_id}-a1",
        image=image,
        command=command,
        environment={},
        labels={JOB_LABEL: job_id, "dcc.attempt": "1", **labels},
        network_mode="none",
    )


def cleanup(*args: str) -> str:
    out = io.StringIO()
    call_command("cleanup_containers", *args, stdout=out)
    return out.getvalue()


# -- the id ------------------------------------------------------------------------------------


READ_ID = (
    "from django_container_celery.installation import installation_id\nprint(installation_id())"
)


def test_the_id_is_stable_and_the_same_in_another_process() -> None:
    first = installation_id()
    assert installation_id() == first
    forget()
    assert installation_id() == first  # read again from the database
    oldest = Installation.objects.order_by("created_at", "id").first()
    assert oldest is not None and str(oldest.pk) == first
    other = run_python(celery_support.test_database_url(), READ_ID).strip()
    print(f"\nid here {first}, id in a second process {other}")
    assert other == first


def _read_id(index: int) -> str:
    forget()  # the cache forked from the parent must not answer
    return installation_id()


def test_processes_creating_the_id_at_once_end_with_the_same_id() -> None:
    Installation.objects.all().delete()
    forget()
    ids = run_in_processes(_read_id, 6)
    print(f"\n6 processes, empty table: ids {sorted(set(ids))}")
    assert len(set(ids)) == 1
    assert [str(pk) for pk in Installation.objects.values_list("pk", flat=True)] == ids[:1]
    assert installation_id() == ids[0]


def test_an_id_created_in_a_rolled_back_transaction_is_not_kept() -> None:
    Installation.objects.all().delete()
    forget()
    with contextlib.suppress(RuntimeError), transaction.atomic():
        lost = installation_id()
        raise RuntimeError("roll back")
    assert not Installation.objects.exists()
    kept = installation_id()
    assert kept != lost
    assert [str(pk) for pk in Installation.objects.values_list("pk", flat=True)] == [kept]


def test_a_flush_puts_the_same_id_back() -> None:
    before = installation_id()
    call_command("flush", interactive=False, verbosity=0)
    assert [str(pk) for pk in Installation.objects.values_list("pk", flat=True)] == [before]
    assert installation_id() == before


# -- the sweeps, with the in-memory executor ------------------------------------------------


def test_the_memory_executor_lists_by_installation() -> None:
    mem = MemoryExecutor()
    mem.start(spec({INSTALLATION_LABEL: "one"}, "img", ["run"]))
    mem.start(spec({INSTALLATION_LABEL: "two"}, "img", ["run"]))
    mem.start(spec({}, "img", ["run"]))
    assert sorted(info.installation for info in mem.list_job_containers()) == ["", "one", "two"]
    [one] = mem.list_job_containers(installation="one")
    assert one.installation == "one"
    assert mem.list_job_containers(installation="three") == []


def test_the_watcher_stops_only_its_own_installations_strays() -> None:
    mem = MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf")))
    manager = JobQueueManager(executor_factory=lambda host: mem, worker_id="launcher")
    own = launch(manager, running_job("run"))
    # Two more jobs of this database whose containers run with another label, or none
    # (started by an older version): the same situation, but not provably ours.
    pretend(own, Status.CANCELLED)
    strangers = []
    for label in ({INSTALLATION_LABEL: "another-installation"}, {}):
        job = running_job("run")
        pretend(job, Status.CANCELLED, attempt=1)
        mem.start(spec({JOB_LABEL: str(job.pk), **label}, "img", ["run"]))
        strangers.append(job)

    done = watching.reconcile(None, "sweeper", mem)
    assert done.stopped == 1
    assert mem.stopped == [own.container_name]
    assert mem.running_names() == sorted(f"dcc-{job.pk}-a1" for job in strangers)


def test_the_watcher_still_finishes_a_job_whose_container_has_no_label() -> None:
    mem = MemoryExecutor(lambda spec: FakeRun(runs_for=float("inf"), stdout="old\n"))
    job = running_job("run")
    # As a worker of the older version left it: running, its container unlabelled.
    ContainerJob.objects.filter(pk=job.pk).update(
        status=Status.RUNNING, attempt=1, claimed_by="old-worker", started_at=timezone.now()
    )
    mem.start(spec({JOB_LABEL: str(job.pk)}, "img", ["run"]))
    assert watching.reconcile(None, "sweeper", mem, lead=True).finished == 0
    assert mem.stopped == []
    mem.finish(f"dcc-{job.pk}-a1", 0)
    assert watching.reconcile(None, "sweeper", mem, lead=True).finished == 1
    job.refresh_from_db()
    assert (job.status, job.stdout_log) == (Status.COMPLETED, "old\n")


def test_leftovers_are_this_installations_only_with_their_reasons() -> None:
    mem = MemoryExecutor()
    manager = JobQueueManager(executor_factory=lambda host: mem, worker_id="launcher")
    own = installation_id()
    done = launch(manager, running_job("run"))
    pretend(done, Status.COMPLETED)
    unknown_exited = mem.start(spec({INSTALLATION_LABEL: own}, "img", ["run"]))
    mem.behaviour = lambda spec: FakeRun(runs_for=float("inf"))
    live = launch(manager, running_job("run"))
    mem.start(spec({INSTALLATION_LABEL: own}, "img", ["run"]))  # running, job unknown
    mem.start(spec({INSTALLATION_LABEL: "another-installation"}, "img", ["run"]))
    mem.behaviour = lambda spec: FakeRun()
    mem.start(spec({INSTALLATION_LABEL: "another-installation"}, "img", ["run"]))
    unlabelled = mem.start(spec({}, "img", ["run"]))

    found = {item.info.container_id: item.reason for item in manager.leftover_containers()}
    names = {item.info.name for item in manager.leftover_containers()}
    assert done.container_name in names and live.container_name not in names
    assert set(found.values()) == {"its job is completed", "its job is not in this database"}
    assert found[unknown_exited] == "its job is not in this database"
    assert len(found) == 2
    with_old = {item.info.container_id for item in manager.leftover_containers(True)}
    assert with_old == {*found, unlabelled}

    assert manager.remove_finished_containers() == 2
    assert manager.leftover_containers() == []
    assert len(mem.names()) == 5  # the live one, the unknown running one, 2 foreign, 1 old


# -- real Docker ---------------------------------------------------------------------------


@pytest.fixture
def own_containers(docker_client: Any) -> Iterator[str]:
    """This installation's id; every container labelled with it is removed afterwards."""
    own = installation_id()
    yield own
    remove_labelled(docker_client, own)


@pytest.mark.docker
def test_every_started_container_carries_the_installation_label(
    docker_client: Any, test_image: str, own_containers: str
) -> None:
    manager = JobQueueManager(worker_id="labeller")
    jobs = [launch(manager, running_job(command, test_image)) for command in ("true", "sleep 30")]
    for job in jobs:
        labels = docker_client.api.inspect_container(job.container_name)["Config"]["Labels"]
        assert labels[INSTALLATION_LABEL] == own_containers
        assert labels[JOB_LABEL] == str(job.pk)
    listed = DockerExecutor(settings.DOCKER_HOST).list_job_containers(own_containers)
    assert {info.name for info in listed} >= {job.container_name for job in jobs}
    assert {info.installation for info in listed} == {own_containers}


B_LAUNCHES = """
import json, sys
from django_container_celery.installation import installation_id
from django_container_celery.models import ContainerJob
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

manager = JobQueueManager(worker_id="installation-b")
jobs = []
for command in ("sleep 60", "true", "true"):
    job = ContainerJob.objects.create_job(
        command=command, docker_image=sys.argv[1], timeout_seconds=120
    )
    job.mark_as_queued()
    assert manager.launch_job(job)["success"], job.last_error
    jobs.append(str(job.pk))
# The last one as a crash leaves it: completed, its exited container not removed.
ContainerJob.objects.filter(pk=jobs[2]).update(status=Status.COMPLETED, claimed_by="")
print(json.dumps({"installation": installation_id(), "jobs": jobs}))
"""


@pytest.fixture
def other_installation(docker_client: Any) -> Iterator[str]:
    """The database URL of a second installation (created, migrated, dropped here)."""
    name = f"{connection.settings_dict['NAME']}_other"
    url = celery_support.test_database_url().rsplit("/", 1)[0] + f"/{name}"
    quoted = connection.ops.quote_name(name)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {quoted}")
    ids: list[str] = []
    try:
        done = subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--settings=tests.settings", "-v", "0"],
            cwd=ROOT,
            env=django_env(url),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        ids.append(run_python(url, READ_ID).strip())
        yield url
    finally:
        for installation in ids:
            remove_labelled(docker_client, installation)
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")


def states_of(containers: list[Any]) -> list[str]:
    return sorted(container.status for container in containers)


@pytest.mark.docker
def test_two_installations_on_one_daemon_clean_up_only_their_own(
    docker_client: Any,
    test_image: str,
    own_containers: str,
    other_installation: str,
) -> None:
    a = own_containers
    # Installation B: three containers started by its own process, from its own database.
    b_run = json.loads(run_python(other_installation, B_LAUNCHES, test_image))
    b = b_run["installation"]
    assert b != a

    # Installation A (this process): a live job, and three containers it should sweep.
    manager = JobQueueManager(worker_id="installation-a")
    live = launch(manager, running_job("sleep 60", test_image))
    stray = launch(manager, running_job("sleep 60", test_image))
    finished = launch(manager, running_job("true", test_image))
    deleted = launch(manager, running_job("true", test_image))
    for name in (finished.container_name, deleted.container_name, *_names(b_run, 1, 2)):
        docker_client.api.wait(name, timeout=30)
    pretend(stray, Status.CANCELLED)  # its stop failed: it still runs
    pretend(finished, Status.COMPLETED)  # crashed before removing its container
    ContainerJob.objects.filter(pk=deleted.pk).delete()

    counts = {"A before": len(labelled(docker_client, a))}
    counts["B before"] = len(labelled(docker_client, b))
    b_before = {c.name: c.status for c in labelled(docker_client, b)}

    swept = watching.reconcile_all("installation-a-watcher")
    counts["A after reconcile"] = len(labelled(docker_client, a))
    counts["B after reconcile"] = len(labelled(docker_client, b))
    out = cleanup()
    counts["A after cleanup"] = len(labelled(docker_client, a))
    counts["B after cleanup"] = len(labelled(docker_client, b))
    b_after = {c.name: c.status for c in labelled(docker_client, b)}

    print(f"\ninstallation A {a}, installation B {b}")
    print(f"reconcile in A: stopped={swept.stopped}; cleanup_containers in A printed:\n{out}")
    print("containers by installation label: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"B's containers before {sorted(b_before.items())}")
    print(f"B's containers after  {sorted(b_after.items())}")

    # The pass stops and removes the cancelled job's container and removes the completed
    # one's; cleanup removes the one whose row is gone. B's are all still there.
    assert swept.stopped == 2
    assert counts == {
        "A before": 4,
        "B before": 3,
        "A after reconcile": 2,
        "B after reconcile": 3,
        "A after cleanup": 1,
        "B after cleanup": 3,
    }
    assert b_after == b_before
    assert states_of(labelled(docker_client, b)) == ["exited", "exited", "running"]
    assert [c.name for c in labelled(docker_client, a)] == [live.container_name]
    assert f"removed container {deleted.container_name}" in out
    assert "its job is not in this database" in out
    assert "removed 1 container(s)" in out
    for job_id in b_run["jobs"]:
        assert job_id not in out


def _names(run: dict[str, Any], *indexes: int) -> list[str]:
    return [f"dcc-{run['jobs'][index]}-a1" for index in indexes]


@pytest.fixture
def unlabelled_container(docker_client: Any, test_image: str) -> Iterator[str]:
    """An exited container as version 1 left it: job labels, no installation label."""
    executor = DockerExecutor(settings.DOCKER_HOST)
    old = spec({}, test_image, ["true"])
    executor.start(old)
    docker_client.api.wait(old.name, timeout=30)
    yield old.name
    executor.remove(old.name)
    executor.close()


@pytest.mark.docker
def test_dry_run_lists_what_would_go_and_removes_nothing(
    docker_client: Any, test_image: str, own_containers: str, unlabelled_container: str
) -> None:
    manager = JobQueueManager(worker_id="dry")
    finished = launch(manager, running_job("true", test_image))
    live = launch(manager, running_job("sleep 60", test_image))
    docker_client.api.wait(finished.container_name, timeout=30)
    pretend(finished, Status.FAILED)
    old = running_job("true", test_image)
    pretend(old, Status.COMPLETED, completed_at=timezone.now() - timedelta(days=40))

    def present() -> set[str]:
        names = {c.name for c in labelled(docker_client, own_containers)}
        if docker_client.containers.list(all=True, filters={"name": unlabelled_container}):
            names.add(unlabelled_container)
        return names

    before = present()
    dry = cleanup("--dry-run")
    dry_all = cleanup("--dry-run", "--include-unlabelled")
    after_dry = present()
    row_kept = ContainerJob.objects.filter(pk=old.pk).exists()
    real = cleanup()
    after = present()
    print(f"\ncleanup_containers --dry-run printed:\n{dry}")
    print(f"with --include-unlabelled, it would also remove:\n{_only_in(dry_all, dry)}")
    print(f"cleanup_containers printed:\n{real}")
    print(f"containers before={len(before)} after dry run={len(after_dry)} after={len(after)}")

    assert after_dry == before
    assert row_kept
    assert f"would remove container {finished.container_name} (job {finished.pk}" in dry
    assert f"{finished.container_name} (job {finished.pk}, attempt 1, exited" in dry
    assert "its job is failed" in dry
    assert f"would delete job {old.pk} (completed" in dry
    assert live.container_name not in dry and unlabelled_container not in dry
    assert "nothing was changed" in dry
    assert f"would remove container {unlabelled_container}" in dry_all

    assert after == before - {finished.container_name}
    assert unlabelled_container in after  # left alone without --include-unlabelled
    assert f"removed container {finished.container_name}" in real
    assert f"deleting job {old.pk}" in real and "deleted 1 job row(s)" in real
    assert not ContainerJob.objects.filter(pk=old.pk).exists()


def _only_in(text: str, other: str) -> str:
    return "\n".join(line for line in text.splitlines() if line not in other.splitlines())
