"""Real Celery worker, beat, Redis and Flower processes for the Celery tests.

Each process is started in its own session so that it and its pool children can be
ended together by process group; only processes started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output" / "celery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_url() -> str:
    """The URL of the database this test run uses (the test database, not the main one)."""
    db = connection.settings_dict
    return (
        f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}"
    )


class Proc:
    """One started process group, with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = OUTPUT / f"{name}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.signal_group(signal.SIGKILL)  # pool children left behind, if any
        if self.alive():
            self.popen.wait(10)
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class CeleryCluster:
    """Start workers, beat and Flower against one broker and the test database."""

    def __init__(self, broker_url: str, overrides: dict[str, Any] | None = None) -> None:
        self.broker_url = broker_url
        self.overrides = overrides or {}
        self.procs: list[Proc] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="tests.settings",
            DATABASE_URL=test_database_url(),
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.broker_url,
            DCC_SETTINGS_JSON=json.dumps(self.overrides),
            PYTHONPATH=str(ROOT),
        )
        env.pop("DCC_TEST_DATABASE", None)
        return env

    def celery(self, name: str, *args: str) -> Proc:
        argv = [sys.executable, "-m", "celery", "-A", "tests.celery_app", *args]
        proc = Proc(name, argv, self.env())
        self.procs.append(proc)
        return proc

    def worker(
        self, name: str = "w1", concurrency: int = 2, queues: str = "", extra: tuple[str, ...] = ()
    ) -> Proc:
        args = ["worker", "-l", "info", "-c", str(concurrency), "-n", f"{name}@%h", "-E"]
        args += ["--without-gossip", "--without-mingle", "-P", "prefork", *extra]
        if queues:
            args += ["-Q", queues]
        proc = self.celery(f"worker-{name}", *args)
        self.wait_ready(proc, f"{name}@{socket.gethostname()}")
        return proc

    def beat(self) -> Proc:
        schedule = OUTPUT / f"beat-schedule-{time.time_ns()}"
        return self.celery("beat", "beat", "-l", "info", "-s", str(schedule), "--max-interval", "1")

    def flower(self, port: int, basic_auth: str = "") -> Proc:
        args = ["flower", f"--port={port}", "--address=127.0.0.1"]
        if basic_auth:
            args.append(f"--basic-auth={basic_auth}")
        return self.celery("flower", *args)

    def wait_ready(self, proc: Proc, node: str, timeout: float = 60) -> None:
        from .celery_app import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited at start:\n{proc.log_tail()}")
            with app.connection_for_write(self.broker_url) as conn:
                replies = app.control.ping(destination=[node], timeout=0.5, connection=conn)
            if replies:
                return
        raise AssertionError(f"{proc.name} did not answer a ping in {timeout}s:\n{proc.log_tail()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


class RedisServer:
    """A private redis-server on a free loopback port, which a test may stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise AssertionError(
                "redis-server is not installed; run `bash scripts/services.sh redis`"
            )
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = Proc(f"redis-{self.port}", argv, dict(os.environ))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"private redis did not start:\n{self.proc.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@contextmanager
def celery_cluster(broker_url: str, **overrides: Any) -> Iterator[CeleryCluster]:
    """Point the in-process Celery app at ``broker_url`` and clean up every process."""
    from .celery_app import app

    # Celery prefers CELERY_BROKER_URL / CELERY_RESULT_BACKEND from the environment to its
    # configuration: switch them too, or this process stays on the old broker.
    env_keys = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    saved_env = {key: os.environ.get(key) for key in env_keys}
    previous = (app.conf.broker_url, app.conf.result_backend)
    switched = previous != (broker_url, broker_url)
    if switched:
        os.environ.update(dict.fromkeys(env_keys, broker_url))
        app.conf.broker_url = broker_url
        app.conf.result_backend = broker_url
        _reset_app_connections(app)
    cluster = CeleryCluster(broker_url, overrides)
    try:
        with app.connection_for_write() as conn:
            app.control.purge(connection=conn)
        yield cluster
    finally:
        cluster.stop()
        if switched:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            app.conf.broker_url, app.conf.result_backend = previous
            _reset_app_connections(app)


def _reset_app_connections(app: Any) -> None:
    # Producer pools and the result backend are cached per app; rebuild them for the URL.
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(message or f"condition not met within {timeout}s")


def reload(job: Any) -> Any:
    """A fresh copy of the job's row."""
    return type(job).objects.get(pk=job.pk)


def wait_running(job: Any, timeout: float = 60) -> Any:
    """The job's row once it is ``running``; fails at once if it ends before that."""

    def running() -> Any:
        row = reload(job)
        assert not row.is_final, f"job ended before it ran: {row.status} {row.last_error}"
        return row if row.status == "running" else None

    return wait_for(running, timeout, interval=0.05, message="job never reached running")
