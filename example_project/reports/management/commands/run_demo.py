"""Run the demo: a Celery worker and beat, a mixed batch of container jobs, a summary;
then more containers at once than worker processes; then a lane with a limit, paused and
resumed while its jobs wait.

The worker and beat are started here, each in its own session, and stopped here by
process group on every way out (end of the batch, Ctrl-C, SIGTERM, an error), so the
command never leaves a process behind. The database is left as it is, to be browsed in
the admin afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.utils import timezone

from django_container_celery import lanes
from django_container_celery.conf import app_settings
from django_container_celery.models import ContainerJob
from django_container_celery.queue import queue_manager
from django_container_celery.states import FINAL

from ... import demo

BASE_DIR = Path(settings.BASE_DIR)
LOG_DIR = Path(settings.RUN_DIR) / "logs"


class Process:
    """A child process in its own session, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own: Ctrl-C in the terminal reaches only this command, which
        # then stops the worker warmly instead of both receiving SIGINT at once.
        self.popen = subprocess.Popen(
            argv,
            cwd=BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL for whatever is left."""
        if self.alive():
            # The main process only: it stops its pool children itself. Signalling the
            # whole group kills the children under it and stalls its shutdown.
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Pool children of a worker killed hard would outlive it otherwise.
        self._signal_group(signal.SIGKILL)
        if self.alive():
            self.popen.wait(10)
        self._log.close()


class Command(BaseCommand):
    help = (
        "Start a Celery worker and beat, run a mixed batch of container jobs, a detached batch "
        "and a paused and resumed lane, summarize."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout", type=float, default=60, help="Seconds to wait for the batch."
        )
        parser.add_argument(
            "--password",
            default=os.environ.get("DCC_DEMO_PASSWORD", "admin"),
            help="Password of the admin user (default: $DCC_DEMO_PASSWORD or 'admin').",
        )
        parser.add_argument(
            "--no-superuser", action="store_true", help="Do not create the admin user."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.processes: list[Process] = []
        self.tty = self.stdout.isatty()
        started = time.monotonic()
        interrupted = False
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.describe_setup()
            self.check_docker()
            self.step("Migrating the database")
            call_command("migrate", interactive=False, verbosity=0)
            if not options["no_superuser"]:
                self.ensure_superuser(options["password"])
            self.clear_leftovers()
            self.start_processes()
            ok = self.run_batch(options["timeout"])
            ok = self.run_detached(options["timeout"]) and ok
            ok = self.run_lanes(options["timeout"]) and ok
        except KeyboardInterrupt:
            interrupted, ok = True, False
            self.stdout.write("\nInterrupted. Jobs left unfinished are cancelled by the next run.")
        finally:
            self.stop_processes()
            signal.signal(signal.SIGTERM, previous)
        self.step(f"Demo finished in {time.monotonic() - started:.0f}s")
        if not options["no_superuser"]:
            self.admin_instructions(options["password"])
        if interrupted:
            raise SystemExit(130)
        if not ok:
            raise CommandError("the demo did not end as expected (see above)")

    # -- steps ------------------------------------------------------------------------

    def step(self, text: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(f"==> {text}"))

    def describe_setup(self) -> None:
        db = connection.settings_dict
        where = (
            f"SQLite {_relative(db['NAME'])}"
            if connection.vendor == "sqlite"
            else f"{connection.vendor} {db['NAME']} on {db['HOST'] or 'localhost'}"
        )
        broker = str(settings.CELERY_BROKER_URL)
        if broker.startswith("filesystem://"):
            broker = f"filesystem ({_relative(settings.BROKER_DIR)})"
        self.step("Example project settings")
        self.stdout.write(f"    database: {where}")
        self.stdout.write(f"    broker:   {_redact(broker)}")
        self.stdout.write(f"    docker:   {app_settings.DEFAULT_DOCKER_HOST}")
        self.stdout.write(f"    image:    {settings.DEMO_IMAGE}")

    def check_docker(self) -> None:
        if app_settings.EXECUTOR != "docker":
            return
        import docker
        import docker.errors

        try:
            client = docker.DockerClient(base_url=app_settings.DEFAULT_DOCKER_HOST, timeout=30)
            client.ping()
        except Exception as exc:  # any failure means the daemon cannot be used
            raise CommandError(
                f"Docker at {app_settings.DEFAULT_DOCKER_HOST} does not answer ({exc}); "
                "start it with `bash scripts/services.sh docker`."
            ) from exc
        try:
            client.images.get(settings.DEMO_IMAGE)
        except docker.errors.ImageNotFound:
            self.stdout.write(f"    pulling {settings.DEMO_IMAGE}")
            try:
                client.images.pull(settings.DEMO_IMAGE)
            except docker.errors.DockerException as exc:
                raise CommandError(
                    f"Image {settings.DEMO_IMAGE} is missing and cannot be pulled ({exc}); "
                    "build the default one with `bash scripts/services.sh image`."
                ) from exc
        finally:
            client.close()

    def ensure_superuser(self, password: str) -> None:
        users = get_user_model()
        user, created = users.objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True}
        )
        if created or not user.check_password(password) or not user.is_superuser:
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
            self.stdout.write(f"    admin user {'created' if created else 'updated'}")

    def clear_leftovers(self) -> None:
        """Cancel example jobs an interrupted earlier run left unfinished, and drop its
        queued messages, so this run's progress is its own."""
        leftovers = ContainerJob.objects.filter(name__startswith="reports.tasks.").exclude(
            status__in=FINAL
        )
        cancelled = sum(1 for job in leftovers if queue_manager.cancel_job(job))
        if cancelled:
            self.stdout.write(f"    cancelled {cancelled} job(s) left by an earlier run")
        # A fresh beat schedule: every entry then first runs one interval after beat starts,
        # so the hourly cleanup, which removes every labelled container this database does
        # not know, never runs during a short demo on a daemon shared with other projects.
        schedule = Path(settings.CELERY_BEAT_SCHEDULE_FILENAME)
        for stale in schedule.parent.glob(schedule.name + "*"):
            stale.unlink(missing_ok=True)
        if str(settings.CELERY_BROKER_URL).startswith("filesystem://"):
            # Only the demo's own folder: other brokers may be shared with other projects.
            folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])
            for message in folder.glob("*.msg"):
                message.unlink(missing_ok=True)

    def process_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(BASE_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["DJANGO_SETTINGS_MODULE"] = "demo_site.settings"
        env.update(extra)
        return env

    def start_processes(self) -> None:
        env = self.process_env()
        celery = [sys.executable, "-m", "celery", "-A", "demo_site"]
        self.step(
            f"Starting a Celery worker (concurrency {settings.DEMO_WORKER_CONCURRENCY}) and beat"
        )
        worker = self.start_worker(env)
        beat = Process("beat", [*celery, "beat", "-l", "info", "--max-interval", "1"], env)
        self.processes.append(beat)
        time.sleep(1)
        if not beat.alive():
            raise CommandError(f"celery beat exited at start:\n{beat.log_tail()}")
        self.stdout.write(
            f"    worker pid {worker.pid}, beat pid {beat.pid}; logs in {_relative(LOG_DIR)}/"
        )

    def start_worker(self, env: dict[str, str], name: str = "worker") -> Process:
        celery = [sys.executable, "-m", "celery", "-A", "demo_site"]
        concurrency = str(settings.DEMO_WORKER_CONCURRENCY)
        node = f"demo-{uuid.uuid4().hex[:6]}@%h"
        worker = Process(
            name,
            [
                *celery,
                "worker",
                "-l",
                "info",
                "-c",
                concurrency,
                "-n",
                node,
                # Without these the worker exchanges broadcasts with peers at start and
                # every few seconds; there are no peers here, only the wait.
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env,
        )
        self.processes.insert(0, worker)
        self.wait_until_ready(worker)
        return worker

    def wait_until_ready(self, worker: Process, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not worker.alive():
                raise CommandError(f"the Celery worker exited at start:\n{worker.log_tail()}")
            if " ready." in worker.log_text():
                return
            time.sleep(0.2)
        raise CommandError(f"the Celery worker was not ready in {timeout:.0f}s")

    def run_batch(self, timeout: float) -> bool:
        self.step("Queueing a mixed batch of container jobs")
        entries = demo.demo_batch()
        width = max(len(entry.label) for entry in entries)
        for entry in entries:
            self.stdout.write(f"    {entry.label:<{width}}  {entry.shows}")
        tracked = demo.queue_batch(entries)
        queued_at = timezone.now()
        self.step("Running (the worker claims and launches, its watcher finishes; beat dispatches)")
        display = demo.ProgressDisplay(self.stdout._out, tracked, queued_at, self.tty)
        deadline = time.monotonic() + timeout
        look = 0
        while True:
            demo.refresh(tracked, look)
            look += 1
            done = demo.all_final(tracked)
            display.show(timezone.now(), force=done)
            if done:
                break
            if time.monotonic() > deadline:
                self.stdout.write(f"    the batch did not finish within {timeout:.0f}s")
                break
            self.check_processes()
            time.sleep(0.25)
        self.step("Summary")
        text, ok = demo.summary(tracked, queued_at)
        self.stdout.write(text)
        return ok and done

    def run_detached(self, timeout: float) -> bool:
        """The second batch: more containers at once than the worker has processes."""
        limit = demo.FANOUT + 2
        self.step(f"Restarting the worker with room for {limit} jobs at once (warm shutdown)")
        old = self.processes.pop(0)
        began = time.monotonic()
        old.stop()
        self.stdout.write(f"    the old worker stopped in {time.monotonic() - began:.1f}s")
        worker = self.start_worker(
            self.process_env(DCC_DEMO_MAX_CONCURRENT=str(limit)), name="worker-detached"
        )
        self.step(
            f"Queueing {demo.FANOUT} jobs of 4 s on a worker of "
            f"{settings.DEMO_WORKER_CONCURRENCY} processes (pid {worker.pid})"
        )
        tracked = demo.queue_batch(demo.fanout_batch())
        queued_at = timezone.now()
        display = demo.ProgressDisplay(self.stdout._out, tracked, queued_at, self.tty)
        deadline = time.monotonic() + timeout
        while True:
            demo.refresh(tracked)
            done = demo.all_final(tracked)
            display.show(timezone.now(), force=done)
            if done or time.monotonic() > deadline:
                break
            self.check_processes()
            time.sleep(0.25)
        self.step("Summary of the detached runs")
        text, ok = demo.fanout_summary(tracked, queued_at, settings.DEMO_WORKER_CONCURRENCY)
        self.stdout.write(text)
        return ok and done

    def run_lanes(self, timeout: float) -> bool:
        """The third batch, on the same worker: a lane's limit, then its pause and resume."""
        lane = demo.ensure_reports_lane()
        self.step(
            f"Queueing {demo.LANE_REPORTS} monthly reports in lane {lane.name!r} (at most "
            f"{lane.max_concurrent_jobs} at once) and {demo.LANE_OTHERS} jobs of no lane"
        )
        self.stdout.write(
            f"    the lane is paused for {demo.LANE_PAUSE_SECONDS} s once its first reports run, "
            "then resumed"
        )
        tracked = demo.queue_batch(demo.lanes_batch())
        queued_at = timezone.now()
        display = demo.ProgressDisplay(self.stdout._out, tracked, queued_at, self.tty)
        pause = demo.LanePause(lane.name, lane.max_concurrent_jobs or demo.LANE_LIMIT)
        deadline = time.monotonic() + timeout
        try:
            while True:
                demo.refresh(tracked)
                pause.step(tracked, display)
                done = demo.all_final(tracked)
                display.show(timezone.now(), force=done)
                if done or time.monotonic() > deadline:
                    break
                self.check_processes()
                time.sleep(0.25)
        finally:
            # Never leave the lane paused, whatever ended the loop.
            lanes.resume([lane.name])
        self.step(f"Summary of lane {lane.name!r}")
        text, ok = demo.lanes_summary(tracked, queued_at, pause)
        self.stdout.write(text)
        return ok and done

    def check_processes(self) -> None:
        for process in self.processes:
            if not process.alive():
                raise CommandError(f"celery {process.name} exited:\n{process.log_tail()}")

    def stop_processes(self) -> None:
        if not self.processes:
            return
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in self.processes)
        self.step(f"Stopping {names}")
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def admin_instructions(self, password: str) -> None:
        python = _relative(sys.executable)
        env = ""
        for name in ("DATABASE_URL", "CELERY_BROKER_URL", "DCC_EXAMPLE_DATA_DIR"):
            if os.environ.get(name):
                env += f"{name}={_redact(os.environ[name])} "
        self.step("Browse the jobs in the Django admin")
        self.stdout.write(f"    {env}{python} example_project/manage.py runserver 127.0.0.1:8000")
        self.stdout.write(
            "    then open http://127.0.0.1:8000/admin/django_container_celery/containerjob/"
        )
        self.stdout.write(f"    and log in as admin / {password}")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raised in the main loop, so the finally clause stops the worker and beat.
    raise KeyboardInterrupt


def _relative(path: object) -> str:
    """A path relative to the repository when it lies inside it (shorter to read)."""
    try:
        return str(Path(str(path)).relative_to(BASE_DIR.parent))
    except ValueError:
        return str(path)


def _redact(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
