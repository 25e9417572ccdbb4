"""Host health across two real daemons: the second one stops under a stream of unpinned
jobs, the rest run on the first, and the second comes back healthy by itself.

The daemons are the main one and the second that ``scripts/services.sh docker2`` starts
(``--live-restore``: its containers run on while it is stopped). The test stops and
starts it through that script, holding the second daemon's test lock throughout. What ran
where is counted from both daemons' own events, by the job label, not from the app's rows.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import docker
import pytest
from django.conf import settings
from django.db.models import Q

from django_container_celery.executors.base import JOB_LABEL
from django_container_celery.models import (
    AttemptReason,
    ContainerJob,
    ExecutorHost,
    JobAttempt,
    container_name,
    database_now,
)
from django_container_celery.states import Status

from .celery_support import celery_cluster, reload, wait_for
from .conftest import containers_of
from .daemons import (
    second_daemon_exclusive,
    second_daemon_log_tail,
    services_second_daemon,
    start_second_daemon,
    stop_second_daemon,
)

pytestmark = [
    pytest.mark.celery,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

JOBS = 20
# Long enough for a job the stop is aimed at to still run when the daemon goes.
JOB_SECONDS = 4
STOP_AFTER_COMPLETED = 5
# The stop is triggered by a container that started on the second daemon at most this
# long ago and has not died: the stop has the rest of the job's time to catch it running
# (containers of one wave end together, so "still running" alone may be about to end).
FRESH_START_SECONDS = 1.0
SETTINGS = {"RECONCILE_INTERVAL": 1.0, "HOST_FAILURES_BEFORE_UNHEALTHY": 3}
FINAL = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


@dataclass(frozen=True)
class Seen:
    action: str
    container: str
    name: str
    job_id: str
    at: float  # the daemon's time of the event, seconds since the epoch


class DaemonEvents:
    """Starts and deaths of job containers on one daemon, in the daemon's order. The
    stream is opened before the constructor returns, and ends by itself when the daemon
    stops (``ended`` is then set)."""

    def __init__(self, client: Any) -> None:
        self.seen: list[Seen] = []
        self.ended = threading.Event()
        self._stream = client.api.events(
            filters={"type": "container", "event": ["start", "die"], "label": JOB_LABEL},
            decode=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                nanos = event.get("timeNano")
                self.seen.append(
                    Seen(
                        action=str(event.get("Action")),
                        container=str(event.get("id")),
                        name=str(attributes.get("name", "")),
                        job_id=str(attributes.get(JOB_LABEL, "")),
                        at=nanos / 1e9 if nanos else float(event.get("time") or 0),
                    )
                )
        except Exception:  # the daemon stopped, or the stream was closed at the end
            pass
        finally:
            self.ended.set()

    def close(self) -> None:
        time.sleep(0.5)  # the last events are on their way
        with contextlib.suppress(Exception):
            self._stream.close()
        self._thread.join(5)

    def starts(self, job_ids: set[str], since: int = 0) -> list[Seen]:
        return [s for s in self.seen[since:] if s.action == "start" and s.job_id in job_ids]

    def running_since(self, job_ids: set[str]) -> dict[str, float]:
        """Jobs whose container started and has not died, as far as the events go, with
        when it started (the daemon's time)."""
        alive: dict[str, Seen] = {}
        for s in list(self.seen):
            if s.job_id not in job_ids:
                continue
            if s.action == "start":
                alive[s.container] = s
            else:
                alive.pop(s.container, None)
        return {s.job_id: s.at for s in alive.values()}

    def running(self, job_ids: set[str]) -> set[str]:
        """Jobs whose container started and has not died, as far as the events go."""
        return set(self.running_since(job_ids))


def docker_time(value: str) -> datetime:
    """Docker's RFC 3339 timestamp (nanoseconds, Z) as an aware datetime."""
    head, _, rest = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(rest + '000000')[:6]}+00:00")


def describe(rows: list[ContainerJob]) -> str:
    return "; ".join(
        f"{row.name} {row.status} attempt {row.attempt} host {row.assigned_host_id} "
        f"{row.last_error[:120]!r}"
        for row in rows
    )


@pytest.fixture
def second_daemon_held() -> Iterator[None]:
    """The second daemon's test lock, held for the whole test (set up before, released
    after everything else): another suite on this machine never stops it meanwhile."""
    with second_daemon_exclusive():
        yield


def test_jobs_fail_over_to_the_healthy_daemon_and_the_stopped_one_comes_back_healthy(
    second_daemon_held: None,
    broker_url: str,
    test_image: str,
    docker_client: Any,
    made: list[ContainerJob],
) -> None:
    second_url = services_second_daemon(test_image)
    second = docker.DockerClient(base_url=second_url, timeout=30)
    h1 = ExecutorHost.objects.create(
        name="h1", connection_string=str(settings.DOCKER_HOST), max_concurrent_jobs=2
    )
    h2 = ExecutorHost.objects.create(name="h2", connection_string=second_url, max_concurrent_jobs=2)
    made.extend(
        ContainerJob.objects.create_job(
            docker_image=test_image,
            command=f"sh -c 'sleep {JOB_SECONDS}'",
            max_retries=3,
            retry_strategy="fast",
            timeout_seconds=300,
            name=f"failover-{n:02d}",
        )
        for n in range(JOBS)
    )
    pks = [job.pk for job in made]
    ids = {str(pk) for pk in pks}

    def rows() -> list[ContainerJob]:
        return list(ContainerJob.objects.filter(pk__in=pks).order_by("name"))

    def completed() -> int:
        return ContainerJob.objects.filter(pk__in=pks, status=Status.COMPLETED).count()

    def h2_row() -> ExecutorHost:
        return ExecutorHost.objects.get(pk=h2.pk)

    def h2_attempts() -> dict[tuple[str, int], datetime | None]:
        """Every attempt placed on h2 so far, with when it was claimed: the ended ones
        (history) and each job's current one, read in one statement."""
        ended = (
            JobAttempt.objects.filter(job__in=pks, host=h2)
            .order_by()
            .values_list("job_id", "attempt", "claimed_at")
        )
        current = (
            ContainerJob.objects.filter(pk__in=pks, assigned_host=h2)
            .order_by()
            .values_list("pk", "attempt", "claimed_at")
        )
        placed: dict[tuple[str, int], datetime | None] = {}
        for job_id, attempt, claimed_at in ended.union(current, all=True):
            key = (str(job_id), attempt)
            placed[key] = placed.get(key) or claimed_at
        return placed

    events1 = DaemonEvents(docker_client)
    events2 = DaemonEvents(second)
    events2_back: DaemonEvents | None = None
    stopped = False
    try:
        with celery_cluster(broker_url, **SETTINGS) as cluster:
            cluster.worker("fa", concurrency=2)
            cluster.worker("fb", concurrency=2)
            cluster.beat()  # re-dispatches, and dispatches retries after their back-off
            for job in made:
                job.delay()

            # -- the second daemon stops once 5 jobs have run, just after a container
            # started there (by its own events), so that it still runs when the daemon goes
            def ready_to_stop() -> bool:
                if completed() < STOP_AFTER_COMPLETED:
                    return False
                now = time.time()
                started = events2.running_since(ids).values()
                return any(now - at < FRESH_START_SECONDS for at in started)

            wait_for(
                ready_to_stop,
                120,
                interval=0.05,
                message="5 jobs never completed with a container just started on h2",
            )
            running_at_trigger = events2.running(ids)
            done_before_stop = {str(row.pk) for row in rows() if row.status in FINAL}
            split1 = len(events1.seen)
            stop_clock = time.monotonic()
            # Set first: a stop that fails once the daemon is signalled still gets it
            # started again below, for the tests after this one.
            stopped = True
            stop_second_daemon()
            stop_took = time.monotonic() - stop_clock
            down_at = datetime.now(UTC)  # it has exited: nothing can start there now
            assert events2.ended.wait(15), "the second daemon's event stream did not end"
            # Running there at the stop, by the daemon's own events up to its exit:
            # live-restore keeps their containers running.
            held = events2.running(ids)

            # -- h2 turns unhealthy by itself (failed launches, the reconcile probe)
            try:
                unhealthy = wait_for(
                    lambda: (host := h2_row()).unhealthy_since is not None and host,
                    30,
                    interval=0.05,
                )
            except AssertionError:
                host = h2_row()
                raise AssertionError(
                    f"h2 not unhealthy 30 s after its daemon stopped: {host.failures_in_row} "
                    f"failures in a row, {host.health_error!r}"
                ) from None
            unhealthy_after = time.monotonic() - stop_clock
            # What h2 had been given when it was seen unhealthy, and the database's time
            # then: a claim that placed a job on h2 read it healthy, so it read its time
            # before the mark was committed, hence before this.
            seen_unhealthy_at = database_now()
            placed_before = h2_attempts()
            assert unhealthy.health_error, "h2 is unhealthy without an error"
            assert not unhealthy.is_healthy

            # -- every job ends on the first daemon, but those whose attempt is tied to
            # h2: running there, or a launch cut by the stop whose container could not be
            # removed (``stop_pending``: it may have started, so no new attempt until
            # the host answers and the reconcile pass stops it).
            tied = Q(assigned_host=h2) & (Q(status=Status.RUNNING) | Q(stop_pending=True))
            unfinished = ContainerJob.objects.filter(pk__in=pks).exclude(status__in=FINAL)
            try:
                wait_for(lambda: not unfinished.exclude(tied).exists(), 180, interval=0.25)
            except AssertionError:
                pending = list(unfinished.exclude(tied).order_by("name"))
                raise AssertionError(f"jobs still not final: {describe(pending)}") from None
            waiting = {str(row.pk): row for row in unfinished.filter(tied)}
            cut_launches = {pk for pk, row in waiting.items() if row.stop_pending}
            # Left as they are while the daemon does not answer: never relaunched.
            for pk in held:
                row = ContainerJob.objects.get(pk=pk)
                assert row.attempt == 1, describe([row])
                assert row.status in (Status.RUNNING, Status.COMPLETED), describe([row])
            assert set(waiting) - cut_launches <= held, describe(list(waiting.values()))
            assert h2_row().unhealthy_since is not None, "h2 healthy while its daemon is down"
            # No attempt was placed on h2 once it was seen unhealthy: an attempt there
            # that the snapshot lacks is a launch already in flight then, claimed before.
            placed_since = {k: v for k, v in h2_attempts().items() if k not in placed_before}
            late_claims = {
                key: claimed_at
                for key, claimed_at in placed_since.items()
                if claimed_at is None or claimed_at >= seen_unhealthy_at
            }
            assert late_claims == {}, (
                f"placed on h2 after it was seen unhealthy at {seen_unhealthy_at}: {late_claims}"
            )

            # -- the second daemon returns: h2 is healthy again by itself
            back_clock = time.monotonic()
            start_second_daemon()
            stopped = False
            back_at = datetime.now(UTC)
            events2_back = DaemonEvents(second)
            listed_back = second.containers.list(all=True, ignore_removed=True)
            try:
                healthy = wait_for(
                    lambda: (host := h2_row()).unhealthy_since is None and host, 30, interval=0.1
                )
            except AssertionError:
                raise AssertionError(
                    f"h2 not healthy again 30 s after its daemon answered: "
                    f"{h2_row().health_error!r}\n{second_daemon_log_tail()}"
                ) from None
            healthy_after = time.monotonic() - back_clock
            assert healthy.failures_in_row == 0
            assert healthy.is_healthy

            # -- what waited for h2 ends completed too
            try:
                wait_for(lambda: completed() == JOBS, 120, interval=0.25)
            except AssertionError:
                pending = [r for r in rows() if r.status != Status.COMPLETED]
                raise AssertionError(f"not all completed: {describe(pending)}") from None
    finally:
        if stopped:  # the test failed while it was down: later tests need it
            try:
                start_second_daemon()
            except (AssertionError, pytest.fail.Exception) as exc:
                print(f"starting the second daemon again failed: {exc}")
        for events in (events1, events2, events2_back):
            if events is not None:
                events.close()
        with contextlib.suppress(Exception):
            for job in made:
                for container in containers_of(second, job.pk):
                    container.remove(force=True)
        second.close()

    finals = {str(row.pk): row for row in rows()}
    assert events2_back is not None
    starts1, starts2, starts2_back = (e.starts(ids) for e in (events1, events2, events2_back))
    ran_on_h1 = {s.job_id for s in starts1}
    ran_on_h2_before_stop = {s.job_id for s in starts2}
    after_stop_on_h1 = {s.job_id for s in events1.starts(ids, since=split1)}
    after_return_on_h2 = {s.job_id for s in starts2_back}
    launch_failures_on_h2 = JobAttempt.objects.filter(
        job__in=pks, host=h2, reason=AttemptReason.LAUNCH_FAILED
    ).count()
    every_start = [*starts1, *starts2, *starts2_back]
    # Cut launches whose container had started all the same (the answer was lost).
    cut_started = {
        s.job_id
        for s in every_start
        if s.job_id in cut_launches and s.name != container_name(s.job_id, finals[s.job_id].attempt)
    }
    print(
        f"failover: jobs={JOBS} ran_on_h1={len(ran_on_h1)} "
        f"ran_on_h2_before_stop={len(ran_on_h2_before_stop)} "
        f"after_stop_on_h1={len(after_stop_on_h1)} held_on_h2_at_stop={len(held)} "
        f"cut_launches_on_h2={len(cut_launches)} (started anyway: {len(cut_started)}) "
        f"launch_failures_on_h2={launch_failures_on_h2} "
        f"after_return_on_h2={len(after_return_on_h2)} "
        f"h2_unhealthy_after_s={unhealthy_after:.1f} "
        f"h2_healthy_again_after_s={healthy_after:.1f} "
        f"h2_error={unhealthy.health_error[:100]!r}"
    )

    # Nothing started on the second daemon while it was down: what it listed on its
    # return had started before it went down, and what started after its return is only
    # the new attempt of a launch the stop had cut.
    late = [
        (c.name, c.attrs["State"]["StartedAt"])
        for c in listed_back
        if c.labels.get(JOB_LABEL) in ids
        and down_at <= docker_time(c.attrs["State"]["StartedAt"]) <= back_at
    ]
    assert late == [], late
    assert after_return_on_h2 <= cut_launches, starts2_back

    assert {row.status for row in finals.values()} == {Status.COMPLETED}, describe(
        [row for row in finals.values() if row.status != Status.COMPLETED]
    )
    assert all(row.exit_code == 0 for row in finals.values())
    # One container per attempt at most, and the attempt that completed ran exactly one,
    # on the host its history names; earlier attempts are launches that failed.
    per_name = Counter(s.name for s in every_start)
    assert max(per_name.values()) == 1, {n: c for n, c in per_name.items() if c > 1}
    where = {id(s): (h1 if s in starts1 else h2) for s in every_start}
    for pk, row in finals.items():
        name = container_name(row.pk, row.attempt)
        ran = [s for s in every_start if s.name == name]
        assert len(ran) == 1, (pk, row.attempt, [s.name for s in every_start if s.job_id == pk])
        last = JobAttempt.objects.get(job=row, attempt=row.attempt)
        assert (last.reason, last.host_id) == (AttemptReason.EXITED, where[id(ran[0])].pk)
        earlier = JobAttempt.objects.filter(job=row, attempt__lt=row.attempt)
        assert {a.reason for a in earlier} <= {AttemptReason.LAUNCH_FAILED}, list(earlier)
        others = [s.name for s in every_start if s.job_id == pk and s.name != name]
        # Only a launch the stop cut may have started a container of its own.
        assert not others or pk in cut_launches, (pk, others)
    # The jobs the stop caught running on h2 ran there once: live-restore kept them.
    assert held, (
        f"no job was running on h2 at the stop ({stop_took:.1f} s after the trigger, when "
        f"{len(running_at_trigger)} were)"
    )
    assert all(finals[pk].attempt == 1 for pk in held)
    # What was still to run at the stop ran on the first daemon.
    started_on_h1_before = {s.job_id for s in events1.seen[:split1] if s.job_id in ids}
    to_run = ids - done_before_stop - started_on_h1_before - ran_on_h2_before_stop - cut_launches
    assert to_run <= after_stop_on_h1, to_run - after_stop_on_h1
    assert ran_on_h1 | ran_on_h2_before_stop | after_return_on_h2 == ids
    assert reload(h1).is_healthy
