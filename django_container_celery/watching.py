"""Where running jobs are watched: the watcher follows each Docker daemon's events and
finishes a job the moment its container exits; a reconcile pass catches what events miss.

A run detaches from the process that launched it: once its container runs, the launching
Celery task returns and the job belongs to the watcher that leads the job's host. Every
Celery worker (in its main process) and every ``process_container_jobs`` runs one
:class:`Watcher` thread. For each watch target (an ``ExecutorHost``, or the default Docker
host for jobs that have none) at most one watcher leads at a time:

* on PostgreSQL, leadership is a session-level advisory lock held on the watcher thread's
  own database connection, so it ends with the process (or the connection) and a standby
  watcher takes it within ``LEADER_POLL_SECONDS``;
* on SQLite (one machine, the demo) every watcher leads; their writes are conditional
  anyway, so two leaders cost Docker calls, never a wrong row.

The leader of a target:

1. streams the daemon's ``die``, ``oom`` and ``destroy`` events of job containers and looks
   at the job each one names at once (``following.check``); the stream is reopened from
   the last event seen after any break;
2. every ``RECONCILE_INTERVAL`` seconds runs :func:`reconcile`, which takes the running
   jobs' claims (renewing their leases: "a watcher is alive"), finishes exited containers,
   kills timed-out ones, retries vanished ones, takes over launches whose lease expired,
   and stops containers whose job is final or on another attempt.

:func:`reconcile` is also what ``harvest_finished_jobs()`` runs, and what
``rescue_stale_jobs()`` runs for each target that has no leader (deployments without a
watcher). Nothing here imports Celery: results reach Celery through the ``attempt_ended``
signal.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from django.db import (
    DEFAULT_DB_ALIAS,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.models import Q

from . import claims, following, health, states
from .conf import app_settings
from .exceptions import ExecutorError, InvalidTransition, TransitionConflict
from .executors import executor_for
from .executors.base import ContainerEvent, ContainerInfo, EventStream, Executor
from .finishing import finish, give_up, remove_container
from .installation import installation_id
from .masking import mask_text, masked_exception
from .models import ContainerJob, ExecutorHost, container_name, database_now
from .states import Status

logger = logging.getLogger(__name__)

# How often a watcher looks for targets to lead (and so how soon a standby replaces a
# dead leader, on top of the time PostgreSQL takes to notice the dead connection).
LEADER_POLL_SECONDS = 1.0
# An exit reported while its job is still ``launching`` (the launcher has not written
# ``running`` yet) is looked at again every tick for this long; reconcile covers the rest.
RECHECK_SECONDS = 15.0
# A container that died of SIGKILL may be on its way out (``docker rm -f``): its job is
# looked at again after this pause rather than finished from the event.
KILLED_EXIT_CODE = 137
KILLED_SETTLE_SECONDS = 1.0
# Pause between looks at an exit reported while its job is still launching.
LAUNCHING_RECHECK_EVERY = 0.5
# Containers (by name) whose ``oom`` event a watcher remembers, newest kept: the event
# comes just before the container's ``die``, and some daemons (cgroup v2) do not set
# State.OOMKilled. Names are per attempt, so an old entry never marks a later attempt.
OOM_MEMORY = 1024
# Pause before reopening a broken event stream; doubled up to the maximum while it fails.
STREAM_RETRY_SECONDS = 1.0
STREAM_RETRY_MAX_SECONDS = 30.0
# Key space of the leadership locks (pg_try_advisory_lock(class, target)): "dcw".
WATCH_LOCK_CLASS = 0x646377
# The lock id of the default Docker host; hosts use their primary key (never 0).
DEFAULT_TARGET_KEY = 0

Target = int | None  # an ExecutorHost pk, or None for the default Docker host
ExecutorFactory = Callable[[ExecutorHost | None], Executor]
Remover = Callable[[Executor, str], None]


def target_key(target: Target) -> int:
    return DEFAULT_TARGET_KEY if target is None else int(target)


def watch_targets() -> list[Target]:
    """Targets that may have running jobs: active hosts, hosts that still hold jobs, and
    the default Docker host when there are no hosts or jobs run there."""
    holding = Q(assigned_jobs__status__in=states.ACTIVE) | Q(assigned_jobs__stop_pending=True)
    pks = ExecutorHost.objects.filter(Q(is_active=True) | holding).values_list("pk", flat=True)
    hosts: list[Target] = [int(pk) for pk in sorted(set(pks))]
    use_default = not hosts or (
        ContainerJob.objects.holding_slots().filter(assigned_host__isnull=True).exists()
    )
    return [None, *hosts] if use_default else hosts


def host_of(target: Target) -> ExecutorHost | None:
    return None if target is None else ExecutorHost.objects.filter(pk=target).first()


# -- leadership ------------------------------------------------------------------------------


class Leadership:
    """The advisory locks this thread's database connection holds, one per led target.

    Session-level locks belong to the connection: closing it (or the process dying)
    releases them all, which is how a standby learns that the leader is gone.
    """

    def __init__(self) -> None:
        self.postgres = connection.vendor == "postgresql"
        self._held: set[int] = set()  # without PostgreSQL: what we decided to lead

    def held(self) -> set[int]:
        if not self.postgres:
            return set(self._held)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid() AND granted AND objsubid = 2 "
                "AND classid::bigint = %s",
                [WATCH_LOCK_CLASS],
            )
            return {int(row[0]) for row in cursor.fetchall()}

    def try_acquire(self, key: int) -> bool:
        if not self.postgres:
            self._held.add(key)
            return True
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_try_advisory_lock(%s::int4, %s::int4)", [WATCH_LOCK_CLASS, key]
            )
            return bool(cursor.fetchone()[0])

    def release(self, key: int) -> None:
        self._held.discard(key)
        if self.postgres:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_advisory_unlock(%s::int4, %s::int4)", [WATCH_LOCK_CLASS, key]
                )


@contextlib.contextmanager
def unwatched(target: Target) -> Iterator[bool]:
    """True inside when no watcher leads ``target`` (we hold its lock meanwhile)."""
    locks = Leadership()
    key = target_key(target)
    if not locks.postgres:
        yield True
        return
    acquired = locks.try_acquire(key)
    try:
        yield acquired
    finally:
        if acquired:
            locks.release(key)


# -- the reconcile pass -------------------------------------------------------------------------


@dataclasses.dataclass
class Reconciled:
    finished: int = 0  # attempts ended here (exit, timeout, vanished)
    rescued: int = 0  # jobs taken over because their lease expired
    stopped: int = 0  # containers of final jobs or stale attempts stopped or removed

    def __iadd__(self, other: Reconciled) -> Reconciled:
        self.finished += other.finished
        self.rescued += other.rescued
        self.stopped += other.stopped
        return self


def reconcile(
    target: Target,
    watcher_id: str,
    executor: Executor,
    *,
    lead: bool = False,
    remove: Remover | None = None,
    owner: str | None = None,
    oom_seen: Callable[[str], bool] | None = None,
) -> Reconciled:
    """Bring every active job of one target in line with what its daemon says.

    ``lead``: the caller leads the target, so it takes the running jobs' claims and renews
    their leases. ``owner``: only look at running jobs claimed by this owner.
    ``oom_seen``: whether the caller saw an ``oom`` event for a container (by name), for
    daemons whose inspect does not report ``State.OOMKilled``.
    """
    done = Reconciled()
    for job_id in claims.stale_job_ids(host_id=target):
        if job_id in _launching_here:
            continue  # its launch continues in a thread of this process
        job = claims.take_over(job_id, watcher_id)
        if job is None:
            continue
        done.rescued += 1
        if lead and job.status == Status.LAUNCHING:
            # A launch can take long (a pull, a slow daemon): never block the watcher.
            _adopt_in_background(job, executor)
            continue
        if _isolated(job, following.adopt, job, executor) is following.Progress.FINISHED:
            done.finished += 1
    if lead:
        claims.watch_running(target, watcher_id)
    running = ContainerJob.objects.filter(claims.on_host(target), status=Status.RUNNING)
    if owner is not None:
        running = running.filter(claimed_by=owner)
    jobs = list(running.select_related("assigned_host", "docker_host"))
    # Listed after the jobs were read: a job read as running has its container already.
    try:
        listed = executor.list_job_containers()
    except ExecutorError as exc:
        # The daemon does not answer: its running jobs stay running until it does (they
        # may still run there, so they are never relaunched elsewhere meanwhile).
        logger.info("reconcile: %s does not answer; its jobs stay as they are", executor)
        _mark_reachable(target, exc)
        return done
    _mark_reachable(target, None)
    now = database_now()
    # Liveness goes by name over every listed container, labelled with our installation
    # or not: a job started before containers carried the label is followed like any
    # other, and a name never matches another installation's job.
    alive = {info.name for info in listed if info.running}
    for job in jobs:
        if job.container_name in alive and following.deadline_of(job, now) > 0:
            continue
        oom = oom_seen is not None and oom_seen(job.container_name)
        looked = _isolated(job, following.check, job, executor, remove, now, oom)
        if looked is following.Progress.FINISHED:
            done.finished += 1
    own = installation_id()
    done.stopped = _stop_strays([i for i in listed if i.installation == own], executor, remove)
    done.stopped += _release_stopped(target, executor, remove)
    return done


# Launches taken over by this process that continue in a thread of their own.
_launching_here: set[Any] = set()
_launching_lock = threading.Lock()


def _adopt_in_background(job: ContainerJob, executor: Executor) -> None:
    with _launching_lock:
        if job.pk in _launching_here:
            return
        _launching_here.add(job.pk)

    def run() -> None:
        try:
            _isolated(job, following.adopt, job, executor)
        except Exception:
            logger.exception("job %s: continuing its launch failed", job.pk)
        finally:
            with _launching_lock:
                _launching_here.discard(job.pk)
            connection.close()  # this thread's own connection

    threading.Thread(target=run, name="dcc-watcher-launch", daemon=True).start()


def _mark_reachable(target: Target, error: ExecutorError | None) -> None:
    """Record the listing's result as the host's health (``health.py``): this pass is the
    probe that marks a failing host unhealthy and brings it back once it answers."""
    if target is None:
        return
    if error is not None and not health.daemon_did_not_answer(error):
        # The daemon answered with an error: not a lost host, but not a success either.
        return
    health.record(target, error)


def _release_stopped(target: Target, executor: Executor, remove: Remover | None = None) -> int:
    """Stop the containers of ended jobs that could not be stopped before (the host did
    not answer), and give their slots back once each is seen not running.

    Each one is looked at by name now, not judged from the pass's listing, which is older
    than the rows read here. Returns how many slots were given back.
    """
    released = 0
    pending = ContainerJob.objects.filter(claims.on_host(target), stop_pending=True)
    for pk, attempt, status in pending.values_list("pk", "attempt", "status"):
        name = container_name(pk, attempt)
        try:
            state = executor.inspect(name)
            if state is not None and state.running:
                logger.warning("container %s of ended job %s runs: stopping it", name, pk)
                executor.stop(name, timeout=5)
        except ExecutorError:
            continue  # still unreachable: the slot stays taken
        if status in states.FINAL and not app_settings.KEEP_CONTAINERS:
            (remove or remove_container)(executor, name)
        released += ContainerJob.objects.filter(pk=pk, attempt=attempt, stop_pending=True).update(
            stop_pending=False
        )
    return released


# Failures in a row of one attempt's finishing, by (job id, attempt): after FINISH_TRIES
# the job is failed with the reason rather than left running (and holding its slot).
_failures: dict[tuple[Any, int], int] = {}
_failures_lock = threading.Lock()


def _isolated(job: ContainerJob, step: Callable[..., Any], *args: Any) -> Any:
    """Run one job's step so that a failure of that job never stops the others'.

    A lost database connection still ends the pass. Any other failure is counted: a job
    whose step keeps failing (the database refuses its row, or another error repeats)
    ends failed after ``FINISH_TRIES`` tries.
    """
    key = (job.pk, job.attempt)
    # Inside a caller's transaction, a savepoint keeps one job's database error from
    # aborting the whole transaction (and so every later job of the pass).
    scope = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    try:
        with scope:
            result = step(*args)
    except (OperationalError, InterfaceError):
        raise
    except (TransitionConflict, InvalidTransition):
        with _failures_lock:
            _failures.pop(key, None)
        return None  # someone else moved the job on: nothing failed here
    except Exception as exc:
        with _failures_lock:
            count = _failures[key] = _failures.get(key, 0) + 1
        tries = int(app_settings.FINISH_TRIES)
        if count < tries:
            logger.error(
                "job %s: could not be looked at (%s/%s)",
                job.pk,
                count,
                tries,
                exc_info=masked_exception(exc, job.environment),
            )
            return None
        logger.error(
            "job %s: giving up after %s failed tries: %s",
            job.pk,
            count,
            mask_text(str(exc), job.environment),
        )
        with _failures_lock:
            _failures.pop(key, None)
        return following.Progress.FINISHED if give_up(job, _one_line(exc)) else None
    with _failures_lock:
        _failures.pop(key, None)
    return result


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def _stop_strays(
    listed: list[ContainerInfo], executor: Executor, remove: Remover | None = None
) -> int:
    """Stop (and unless KEEP_CONTAINERS remove) containers no active attempt owns.

    ``listed`` holds only this installation's containers: another installation's, and
    unlabelled ones from before the label existed, are never stopped here. Statuses are
    read after the listing, so a container whose claim was made meanwhile is seen with
    its active row. Containers of jobs this database does not know are left alone too.
    """
    by_job: dict[uuid.UUID, list[ContainerInfo]] = {}
    for info in listed:
        with contextlib.suppress(ValueError):
            by_job.setdefault(uuid.UUID(info.job_id), []).append(info)
    if not by_job:
        return 0
    rows = ContainerJob.objects.filter(pk__in=list(by_job)).values_list("pk", "status", "attempt")
    stopped = 0
    for pk, status, attempt in rows:
        for info in by_job[pk]:
            if status in states.ACTIVE and info.attempt == attempt:
                continue  # the live attempt
            if not info.running and (status not in states.FINAL or app_settings.KEEP_CONTAINERS):
                continue  # exited: its logs may still be read, or cleanup removes it
            with contextlib.suppress(ExecutorError):
                if info.running:
                    logger.warning(
                        "container %s runs but its job is %s (attempt %s): stopping it",
                        info.name,
                        status,
                        attempt,
                    )
                    executor.stop(info.name, timeout=5)
                if not app_settings.KEEP_CONTAINERS:
                    # A removal is slow on some storage drivers: the watcher queues it.
                    (remove or remove_container)(executor, info.name)
                stopped += 1
    return stopped


def reconcile_all(
    watcher_id: str,
    executor_factory: ExecutorFactory = executor_for,
    *,
    only_unwatched: bool = False,
    owner: str | None = None,
) -> Reconciled:
    """One reconcile pass over every target (with ``only_unwatched``, only those that no
    watcher leads: the rescue for deployments without a watcher)."""
    total = Reconciled()
    for target in watch_targets():
        executor = executor_factory(host_of(target))
        if not only_unwatched:
            total += reconcile(target, watcher_id, executor, owner=owner)
            continue
        with unwatched(target) as free:
            if free:
                total += reconcile(target, watcher_id, executor, owner=owner)
    return total


# -- the watcher thread ------------------------------------------------------------------------


@dataclasses.dataclass
class _Lead:
    """What the watcher keeps for one target it leads."""

    target: Target
    executor: Executor
    next_reconcile: float = 0.0
    stream: EventStream | None = None
    stream_thread: threading.Thread | None = None
    next_stream_at: float = 0.0
    stream_backoff: float = STREAM_RETRY_SECONDS
    last_event_time: float | None = None
    dropped: bool = False


_watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
# Watchers inherited across fork(): kept referenced so that their connection objects are
# never finalised in the child (which would talk on the parent's database socket).
_inherited: list[Watcher] = []


class Watcher:
    """A daemon thread that leads targets, follows their events and reconciles them.

    ``start()`` returns at once; ``stop()`` ends the thread, closes its event streams and
    its database connection (which releases its leadership for a standby to take).
    """

    def __init__(
        self,
        watcher_id: str,
        executor_factory: ExecutorFactory | None = None,
        reconcile_interval: float | None = None,
    ) -> None:
        self.watcher_id = watcher_id
        self.executor_factory: ExecutorFactory = executor_factory or executor_for
        self.reconcile_interval = reconcile_interval
        self._stopping = threading.Event()
        self._events: queue.Queue[tuple[Target, ContainerEvent]] = queue.Queue()
        self._leads: dict[Target, _Lead] = {}
        self._rechecks: dict[tuple[str, int], tuple[Target, float, int | None]] = {}
        self._recheck_after: dict[tuple[str, int], float] = {}
        # Names of containers an ``oom`` event was seen for (see OOM_MEMORY).
        self._oom_seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._removals: queue.Queue[tuple[Executor, str] | None] = queue.Queue()
        self._removing: set[str] = set()
        self._removing_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._remover: threading.Thread | None = None
        self._db: Any = None  # the thread's connection wrapper, see _forget_after_fork
        self._next_leader_check = 0.0
        self.forked = False
        _watchers.add(self)

    def __repr__(self) -> str:
        return f"<Watcher {self.watcher_id} leading {sorted(map(target_key, self._leads))}>"

    # -- public -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="dcc-watcher", daemon=True)
        self._remover = threading.Thread(
            target=self._remove_loop, name="dcc-watcher-remover", daemon=True
        )
        self._thread.start()
        self._remover.start()
        logger.info("watcher %s started", self.watcher_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; returns within ``timeout`` seconds."""
        self.request_stop()
        end = time.monotonic() + timeout
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._remover is not None:
            # Removals queued before the stop are done first; later ones are left to the
            # next reconcile pass, which removes exited containers of final jobs.
            self._remover.join(max(0.1, end - time.monotonic()))

    def request_stop(self) -> None:
        """Ask the thread to stop without waiting (safe from a signal handler)."""
        self._stopping.set()
        self._removals.put(None)
        for lead in list(self._leads.values()):
            _close_stream(lead)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def leading(self) -> set[Target]:
        return set(self._leads)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        self._db = connections[DEFAULT_DB_ALIAS]
        locks = Leadership()
        try:
            while not self._stopping.is_set():
                try:
                    self._tick(locks)
                except Exception:
                    # Typically the database went away: give up every lead (the locks went
                    # with the connection) and start again on a fresh connection.
                    logger.exception("watcher %s: error; dropping leadership", self.watcher_id)
                    self._drop_all()
                    self._close_connection()
                    locks = Leadership()
                    self._stopping.wait(LEADER_POLL_SECONDS)
        finally:
            self._drop_all()
            self._close_connection()
            logger.info("watcher %s stopped", self.watcher_id)

    def _tick(self, locks: Leadership) -> None:
        now = time.monotonic()
        if now >= self._next_leader_check:
            self._refresh_leadership(locks)
            self._next_leader_check = now + LEADER_POLL_SECONDS
        for lead in list(self._leads.values()):
            self._keep_streaming(lead, now)
            if now >= lead.next_reconcile:
                self._reconcile(lead)
                lead.next_reconcile = time.monotonic() + self._interval()
        self._handle_events(budget=0.1)
        self._handle_rechecks()

    def _interval(self) -> float:
        if self.reconcile_interval is not None:
            return float(self.reconcile_interval)
        return float(app_settings.RECONCILE_INTERVAL)

    def _refresh_leadership(self, locks: Leadership) -> None:
        wanted = set(watch_targets())
        held = locks.held()
        for target, lead in list(self._leads.items()):
            key = target_key(target)
            if key not in held or target not in wanted:
                self._drop(lead)
                if key in held:
                    locks.release(key)
        for target in sorted(wanted - set(self._leads), key=target_key):
            if locks.try_acquire(target_key(target)):
                executor = self.executor_factory(host_of(target))
                self._leads[target] = _Lead(target, executor)
                logger.info("watcher %s leads %s", self.watcher_id, executor)

    def _reconcile(self, lead: _Lead) -> None:
        executor = self.executor_factory(host_of(lead.target))
        if executor is not lead.executor:
            # The host's connection settings changed: watch the daemon they name now.
            lead.executor = executor
            _close_stream(lead)
        done = reconcile(
            lead.target,
            self.watcher_id,
            lead.executor,
            lead=True,
            remove=self._remove_later,
            oom_seen=self._oom_seen.__contains__,
        )
        if done.finished or done.rescued or done.stopped:
            logger.info(
                "watcher %s reconciled %s: finished=%s rescued=%s stopped=%s",
                self.watcher_id,
                lead.executor,
                done.finished,
                done.rescued,
                done.stopped,
            )

    # -- events ---------------------------------------------------------------------------

    def _keep_streaming(self, lead: _Lead, now: float) -> None:
        thread = lead.stream_thread
        if thread is not None and thread.is_alive():
            return
        if thread is not None:
            # The stream broke: events may have been missed, so reconcile soon.
            lead.stream_thread = None
            lead.next_stream_at = now + lead.stream_backoff
            lead.stream_backoff = min(lead.stream_backoff * 2, STREAM_RETRY_MAX_SECONDS)
            lead.next_reconcile = min(lead.next_reconcile, now)
            return
        if now < lead.next_stream_at:
            return
        lead.stream_thread = threading.Thread(
            target=self._stream, args=(lead,), name="dcc-watcher-events", daemon=True
        )
        lead.stream_thread.start()

    def _stream(self, lead: _Lead) -> None:
        try:
            stream = lead.executor.events(since=lead.last_event_time)
        except ExecutorError as exc:
            logger.info("watcher: no event stream from %s (%s)", lead.executor, exc)
            return
        lead.stream = stream
        if lead.dropped or self._stopping.is_set():
            _close_stream(lead)
            return
        try:
            for event in stream:
                lead.stream_backoff = STREAM_RETRY_SECONDS
                lead.last_event_time = max(lead.last_event_time or 0.0, event.time)
                self._events.put((lead.target, event))
                if lead.dropped:
                    break
        except Exception as exc:  # whatever broke the stream, the loop reopens it
            logger.info("watcher: event stream from %s ended (%s)", lead.executor, exc)
        finally:
            _close_stream(lead)

    def _handle_events(self, budget: float) -> None:
        end = time.monotonic() + budget
        while True:
            left = end - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                return
            try:
                target, event = self._events.get(timeout=left)
            except queue.Empty:
                return
            lead = self._leads.get(target)
            if lead is None:
                continue
            if event.action == "oom":
                self._remember_oom(event.name)
            code = event.exit_code if event.action == "die" else None
            if code == KILLED_EXIT_CODE:
                # ``docker rm -f`` kills before it removes: look again in a moment, when a
                # removed container reads as vanished (retried), not as killed (failed).
                self._rechecks[(event.job_id, event.attempt)] = (
                    target,
                    time.monotonic() + RECHECK_SECONDS,
                    None,
                )
                self._recheck_after[(event.job_id, event.attempt)] = (
                    time.monotonic() + KILLED_SETTLE_SECONDS
                )
                continue
            self._look_at(lead, event.job_id, event.attempt, code)

    def _remember_oom(self, name: str) -> None:
        if not name:
            return
        self._oom_seen[name] = None
        self._oom_seen.move_to_end(name)
        while len(self._oom_seen) > OOM_MEMORY:
            self._oom_seen.popitem(last=False)

    def _look_at(
        self, lead: _Lead, job_id: str, attempt: int, exit_code: int | None = None
    ) -> None:
        """Act on what an event said of one attempt; ``exit_code`` is the one a ``die``
        event carried (no need to ask the daemon again)."""
        try:
            pk = uuid.UUID(job_id)
        except ValueError:
            return
        job = (
            ContainerJob.objects.filter(claims.on_host(lead.target), pk=pk, attempt=attempt)
            .select_related("assigned_host", "docker_host")
            .first()
        )
        if job is None or job.status not in states.ACTIVE:
            self._rechecks.pop((job_id, attempt), None)
            return
        if job.status == Status.LAUNCHING:
            # Its launcher has not recorded it as running yet: look again shortly.
            now = time.monotonic()
            self._rechecks.setdefault(
                (job_id, attempt), (lead.target, now + RECHECK_SECONDS, exit_code)
            )
            self._recheck_after[(job_id, attempt)] = now + LAUNCHING_RECHECK_EVERY
            return
        self._rechecks.pop((job_id, attempt), None)
        oom = job.container_name in self._oom_seen
        with contextlib.suppress(TransitionConflict):  # someone else ended it first
            if exit_code is None:
                check = following.check
                _isolated(job, check, job, lead.executor, self._remove_later, None, oom)
            else:
                _isolated(job, self._finish_exited, job, lead.executor, exit_code, oom)

    def _finish_exited(
        self, job: ContainerJob, executor: Executor, exit_code: int, oom: bool = False
    ) -> bool:
        return finish(job, executor, exit_code, out_of_memory=oom, remove=self._remove_later)

    def _handle_rechecks(self) -> None:
        now = time.monotonic()
        for (job_id, attempt), (target, until, exit_code) in list(self._rechecks.items()):
            lead = self._leads.get(target)
            if lead is None or now > until:
                self._rechecks.pop((job_id, attempt), None)
                self._recheck_after.pop((job_id, attempt), None)
                continue
            if now < self._recheck_after.get((job_id, attempt), 0.0):
                continue
            self._recheck_after.pop((job_id, attempt), None)
            self._look_at(lead, job_id, attempt, exit_code)

    # -- container removal, off the finishing path -----------------------------------------

    def _remove_later(self, executor: Executor, name: str) -> None:
        with self._removing_lock:
            if name in self._removing:
                return  # queued already (by the event path, or an earlier pass)
            self._removing.add(name)
        self._removals.put((executor, name))

    def _remove_loop(self) -> None:
        while True:
            item = self._removals.get()
            if item is None:
                if self._stopping.is_set():
                    return
                continue
            # Exits waiting to be recorded go first: a removal keeps the daemon busy.
            while not self._events.empty() and not self._stopping.is_set():
                time.sleep(0.02)
            remove_container(*item)
            with self._removing_lock:
                self._removing.discard(item[1])

    # -- leaving ----------------------------------------------------------------------------

    def _drop(self, lead: _Lead) -> None:
        lead.dropped = True
        _close_stream(lead)
        self._leads.pop(lead.target, None)
        logger.info("watcher %s no longer leads %s", self.watcher_id, lead.executor)

    def _drop_all(self) -> None:
        for lead in list(self._leads.values()):
            self._drop(lead)

    def _close_connection(self) -> None:
        with contextlib.suppress(Exception):
            connection.close()

    def _forget_after_fork(self) -> None:
        """In a forked child: never use, nor close, the parent's watcher state."""
        self.forked = True
        # A fresh event: the inherited one's lock may have been held by another thread.
        self._stopping = threading.Event()
        self._stopping.set()
        db = self._db
        raw = getattr(db, "connection", None) if db is not None else None
        fileno = getattr(raw, "fileno", None)
        if callable(fileno):
            # Point the child's copy of the socket at /dev/null: if the connection object
            # is ever finalised here, its goodbye goes nowhere instead of ending the
            # parent's session (and with it the parent's leadership).
            with contextlib.suppress(Exception):
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, fileno())
                os.close(devnull)
        _inherited.append(self)


def _close_stream(lead: _Lead) -> None:
    stream = lead.stream
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.close()


def _after_fork_in_child() -> None:
    for watcher in list(_watchers):
        watcher._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
