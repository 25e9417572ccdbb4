"""A second Docker daemon beside the main one, for tests where hosts matter.

Two kinds:

* ``SecondDaemon`` / ``second_daemon``: one a test starts itself, in temporary folders. It
  has its own socket, data root, exec root and pid file, runs with ``--live-restore`` (so
  its containers survive while it is stopped, as on a production host whose daemon
  restarts), and gets the test image copied from the main daemon (images are per daemon).
  Only the dockerd started here is ever signalled, by its PID.
* The one ``scripts/services.sh docker2`` starts (``make test`` runs it), with the same
  flags, at ``DCC_DOCKER2_HOST``: ``services_second_daemon`` checks it answers, and
  ``stop_second_daemon`` / ``start_second_daemon`` stop and start it through that script,
  which signals only the dockerd its pid file names and that was started with that pid
  file. A test that stops it holds ``second_daemon_exclusive`` throughout, so that two
  suites on one machine never stop it under each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

DOCKERD = "/usr/sbin/dockerd"
ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services.sh"
# The second daemon's socket: services.sh reads the same variable, with the same default.
SECOND_DAEMON_URL = os.environ.get("DCC_DOCKER2_HOST", "unix:///var/run/dcc-docker2.sock")
SECOND_DAEMON_LOG = Path("/tmp/dcc-dockerd2.log")
# Held by a test for as long as it may stop the second daemon.
SECOND_DAEMON_TEST_LOCK = Path("/tmp/dcc-docker2-test.lock")
# A call of the script may wait this long for another run of it (its lock), and is
# given this long in all: the wait stays well inside the call's own time.
SERVICES_LOCK_WAIT = 120
SERVICES_TIMEOUT = 300


class SecondDaemon:
    def __init__(self, image: str) -> None:
        self.image = image
        self.dir = Path(tempfile.mkdtemp(prefix="dcc-d2-"))
        self.socket = self.dir / "docker.sock"
        self.log_path = self.dir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> Any:
        return docker.DockerClient(base_url=self.url, timeout=30)

    def start(self) -> None:
        assert Path(DOCKERD).exists(), f"{DOCKERD} is missing: run bash scripts/services.sh docker"
        argv = [
            DOCKERD,
            "-H",
            self.url,
            f"--data-root={self.dir / 'root'}",
            f"--exec-root={self.dir / 'exec'}",
            f"--pidfile={self.dir / 'docker.pid'}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--live-restore",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"second dockerd exited:\n{self.log_tail()}"
            with contextlib.suppress(Exception):
                if self.client().ping():
                    return
            time.sleep(0.3)
        raise AssertionError(f"second dockerd did not answer within 60 s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, by PID); with live-restore its containers run on."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def load_image(self, main: Any) -> None:
        data = b"".join(main.images.get(self.image).save(named=True))
        self.client().images.load(data)

    def unmount(self) -> None:
        """Undo the mounts the stopped daemon left under its own folder (dockerd mounts its
        data root onto itself and leaves it mounted when it exits)."""
        prefix = str(self.dir) + "/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", point], check=False, capture_output=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def remove_all(self) -> None:
        with contextlib.suppress(Exception):
            client = self.client()
            for container in client.containers.list(all=True):
                container.remove(force=True)


@contextlib.contextmanager
def second_daemon(image: str, main: Any) -> Iterator[SecondDaemon]:
    daemon = SecondDaemon(image)
    daemon.start()
    try:
        daemon.load_image(main)
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            with contextlib.suppress(AssertionError):
                daemon.start()  # to remove what it still runs
        daemon.remove_all()
        daemon.stop()
        daemon.unmount()
        shutil.rmtree(daemon.dir, ignore_errors=True)


# -- the second daemon of scripts/services.sh ------------------------------------------------


def _second_daemon_problem(image: str | None) -> str:
    """Why the services' second daemon is not usable ("" when it is)."""
    try:
        # The client asks the daemon for its API version as it is made.
        client = docker.DockerClient(base_url=SECOND_DAEMON_URL, timeout=10)
        with contextlib.closing(client):
            client.ping()
            if image is not None:
                try:
                    client.images.get(image)
                except docker.errors.ImageNotFound:
                    return f"it answers but has no {image}"
    except Exception as exc:  # any failure means the daemon is not usable
        return f"it does not answer ({exc})"
    return ""


def services_second_daemon(image: str | None = None) -> str:
    """The URL of the second daemon ``bash scripts/services.sh docker2`` starts, once it
    answers (and holds ``image``, if given). The test fails, never skips, otherwise."""
    problem = _second_daemon_problem(image)
    if problem:
        pytest.fail(
            f"The second Docker daemon at {SECOND_DAEMON_URL}: {problem}. "
            "Run `bash scripts/services.sh docker2` (`make test` does).",
            pytrace=False,
        )
    return SECOND_DAEMON_URL


def second_daemon_log_tail(lines: int = 30) -> str:
    try:
        return "\n".join(SECOND_DAEMON_LOG.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def second_daemon_exclusive(timeout: float = 300) -> Iterator[None]:
    """Hold the lock on the services' second daemon (``flock`` on
    ``/tmp/dcc-docker2-test.lock``), waiting up to ``timeout`` seconds for another
    suite's test to let it go. Released when the block ends, or when the process does."""
    with open(SECOND_DAEMON_TEST_LOCK, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pytest.fail(
                        f"{SECOND_DAEMON_TEST_LOCK} is still held by another test after "
                        f"{timeout:.0f} s (another suite stopping the second daemon?)",
                        pytrace=False,
                    )
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _services(step: str) -> str:
    env = dict(
        os.environ,
        DCC_DOCKER2_HOST=SECOND_DAEMON_URL,
        DCC_SERVICES_LOCK_WAIT=str(SERVICES_LOCK_WAIT),
    )
    try:
        done = subprocess.run(
            ["bash", str(SERVICES), step],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SERVICES_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        output = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")
        raise AssertionError(
            f"bash scripts/services.sh {step} did not end within {SERVICES_TIMEOUT} s:\n{output}"
        ) from None
    output = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0:
        raise AssertionError(
            f"bash scripts/services.sh {step} failed (exit {done.returncode}):\n{output}"
        )
    return output


def stop_second_daemon() -> None:
    """Stop the services' second daemon (``bash scripts/services.sh stop-docker2``: SIGTERM
    to the dockerd its pid file names, once its command line shows it is that daemon,
    waiting until it has exited). With live-restore its containers run on."""
    _services("stop-docker2")


def start_second_daemon() -> str:
    """Start the services' second daemon again (``bash scripts/services.sh docker2``, which
    returns once it answers); its URL."""
    _services("docker2")
    return services_second_daemon()
