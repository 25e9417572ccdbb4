"""A running job's live output in the admin: the JSON tail read from the real Docker
daemon, and the change page's panel in a real headless Chromium.

Every job here runs in the real daemon: launched by the real engine, read back through the
admin's live URL, cancelled (and its container removed) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import socketserver
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from django_container_celery.admin.live import (
    EARLIER_OUTPUT,
    LIVE_READ_TIMEOUT,
    LIVE_TAIL_BYTES,
    live_tail,
)
from django_container_celery.masking import MASK
from django_container_celery.models import ContainerJob, ExecutorHost
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from .admin_support import staff_client
from .docker_proxy import DockerProxy
from .test_admin_browser import OUTPUT, browser_page  # noqa: F401 - a fixture here too

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

SECRET = "tok-5f3a9c1e77d2"
# One line of stdout and one of stderr a second for 30 seconds; stdout also quotes the
# secret, which every answer must mask.
COUNTING = (
    "sh -c 'for i in $(seq 1 30); do echo line-$i; echo err-$i >&2; "
    'echo "token=$API_TOKEN"; sleep 1; done\''
)


@pytest.fixture
def start_job(made: list[Any], test_image: str) -> Iterator[Callable[..., ContainerJob]]:
    """Starts a job's container through the engine and returns the running job; each job
    is cancelled at the end (``made`` then removes whatever container is left)."""
    started: list[ContainerJob] = []

    def start(command: str, **fields: Any) -> ContainerJob:
        fields.setdefault("environment", {"API_TOKEN": SECRET, "MODE": "live"})
        job = ContainerJob.objects.create_job(
            command=command, docker_image=test_image, timeout_seconds=120, **fields
        )
        made.append(job)
        started.append(job)
        job.mark_as_queued()
        outcome = JobQueueManager(worker_id="live-test").launch_job(job)
        assert outcome["success"], outcome
        job.refresh_from_db()
        assert job.status == Status.RUNNING
        return job

    yield start
    for job in started:
        job.refresh_from_db()
        if job.status not in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
            job.cancel()


def live_url(job: ContainerJob) -> str:
    return reverse("admin:django_container_celery_containerjob_live", args=[job.pk])


def read_live(client: Client, job: ContainerJob) -> dict[str, Any]:
    response = client.get(live_url(job))
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    assert SECRET.encode() not in response.content
    answer: dict[str, Any] = response.json()
    return answer


def numbered(text: str, prefix: str) -> list[int]:
    return [int(n) for n in re.findall(rf"^{prefix}-(\d+)$", text, re.MULTILINE)]


def read_until(
    client: Client, job: ContainerJob, done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = read_live(client, job)
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"no such answer in {timeout}s; last: {answer}"
        time.sleep(0.3)


def test_the_tail_grows_while_the_job_runs_and_stops_when_it_ends(
    start_job: Callable[..., ContainerJob], django_user_model: Any
) -> None:
    job = start_job(COUNTING)
    viewer = staff_client(django_user_model, "view_containerjob")

    first = read_until(viewer, job, lambda a: len(numbered(a["stdout"], "line")) >= 2, 15)
    time.sleep(3)
    second = read_live(viewer, job)

    for answer in (first, second):
        assert (answer["status"], answer["running"], answer["source"]) == (
            "running",
            True,
            "daemon",
        )
        assert answer["error"] == ""
        assert answer["truncated"] == {"stdout": False, "stderr": False}
        assert answer["max_bytes"] == LIVE_TAIL_BYTES
        assert f"token={MASK}" in answer["stdout"]
        # Both streams, each in its own box: no stderr line in stdout and the reverse.
        assert "err-" not in answer["stdout"] and "line-" not in answer["stderr"]
    before, after = numbered(first["stdout"], "line"), numbered(second["stdout"], "line")
    assert before == list(range(1, len(before) + 1))
    assert after[: len(before)] == before
    assert len(after) >= len(before) + 2, (before, after)
    assert numbered(second["stderr"], "err")[:2] == [1, 2]

    assert job.cancel() is True
    ended = read_live(viewer, job)
    assert (ended["status"], ended["running"], ended["source"]) == ("cancelled", False, "stored")


def test_only_viewers_may_read_and_only_with_get(
    start_job: Callable[..., ContainerJob], django_user_model: Any
) -> None:
    job = start_job("sh -c 'echo hello; sleep 60'")

    outsider = staff_client(django_user_model)  # staff, without the view permission
    assert outsider.get(live_url(job)).status_code == 403
    anonymous = Client().get(live_url(job))
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]

    viewer = staff_client(django_user_model, "view_containerjob")
    for method in (viewer.post, viewer.put, viewer.delete):
        response = method(live_url(job))
        assert response.status_code == 405
        assert response["Allow"] == "GET"
    assert read_until(viewer, job, lambda a: a["stdout"] == "hello\n", 10)["running"]


def test_a_job_printing_more_than_the_bound_gets_its_last_bytes_only(
    start_job: Callable[..., ContainerJob], django_user_model: Any
) -> None:
    # 3000 lines of about 100 bytes on each stream (about 290 KiB each), then it waits.
    pad = "x" * 90
    job = start_job(
        f'sh -c \'for i in $(seq 1 3000); do echo "out-$i {pad}"; echo "err-$i {pad}" >&2;'
        " done; sleep 60'"
    )
    viewer = staff_client(django_user_model, "view_containerjob")

    answer = read_until(viewer, job, lambda a: f"err-3000 {pad}" in a["stderr"], 20)
    assert answer["truncated"] == {"stdout": True, "stderr": True}
    for stream, prefix in (("stdout", "out"), ("stderr", "err")):
        text = answer[stream]
        assert text.startswith(EARLIER_OUTPUT)
        body = text[len(EARLIER_OUTPUT) :]
        assert len(body.encode()) <= LIVE_TAIL_BYTES
        assert body.endswith(f"{prefix}-3000 {pad}\n")
        # The recent end of the stream, nothing left out in it: the whole lines after the
        # cut one run without a gap up to the last. (How many there are depends on how the
        # daemon's entries of the two streams interleave, which nothing promises.)
        lines = [int(n) for n in re.findall(rf"^{prefix}-(\d+) {pad}$", body, re.MULTILINE)]
        assert lines == list(range(3001 - len(lines), 3001))
        assert f"{prefix}-1 {pad}\n" not in body


@pytest.mark.parametrize(
    ("pad", "read_whole"),
    [
        # The whole log is smaller than the bound: read whole, nothing is marked as cut.
        ("", True),
        # About 500 KB of stdout after the stderr line: stdout fills its bound long before
        # the window reaches that line, and stderr is then read alone.
        ("x" * 90, False),
    ],
    ids=["short-lines", "long-stdout"],
)
def test_a_stream_that_printed_long_before_the_other_is_not_starved(
    start_job: Callable[..., ContainerJob], django_user_model: Any, pad: str, read_whole: bool
) -> None:
    job = start_job(
        'sh -c \'echo "FATAL: something broke" >&2;'
        f' for i in $(seq 1 5000); do echo "out-$i {pad}"; done; sleep 60\''
    )
    viewer = staff_client(django_user_model, "view_containerjob")

    answer = read_until(viewer, job, lambda a: f"out-5000 {pad}\n" in a["stdout"], 20)
    assert answer["error"] == ""
    assert answer["stdout"].endswith(f"out-5000 {pad}\n")
    if read_whole:
        assert answer["truncated"] == {"stdout": False, "stderr": False}
        assert answer["stderr"] == "FATAL: something broke\n"
        assert answer["stdout"].startswith(f"out-1 {pad}\n")
    else:
        # What came before the window read for stderr alone is unknown, so it is marked.
        assert answer["truncated"] == {"stdout": True, "stderr": True}
        assert answer["stderr"] == EARLIER_OUTPUT + "FATAL: something broke\n"
        assert len(answer["stdout"][len(EARLIER_OUTPUT) :].encode()) <= LIVE_TAIL_BYTES


class CountingProxy(DockerProxy):
    """The test proxy, also counting the bytes the daemon sends back."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0
        self._count_lock = threading.Lock()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        if requests:
            super()._pump(source, target, requests)
            return
        try:
            while data := source.recv(65536):
                with self._count_lock:
                    self.received += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


def test_very_long_lines_cost_a_read_a_few_times_the_bound_not_the_whole_log(
    start_job: Callable[..., ContainerJob], django_user_model: Any
) -> None:
    # 300 lines of 30 KB (9 MB; the daemon keeps each as two entries), then a short one.
    long = "y" * 30_000
    proxy = CountingProxy()
    with proxy:
        host = ExecutorHost.objects.create(name="long-lines", connection_string=proxy.url)
        job = start_job(
            'sh -c \'l=$(head -c 30000 /dev/zero | tr "\\0" y);'
            ' for i in $(seq 1 300); do echo "$i $l"; done; echo last-line; sleep 60\'',
            docker_host=host,
        )
        viewer = staff_client(django_user_model, "view_containerjob")
        read_until(viewer, job, lambda a: a["stdout"].endswith("last-line\n"), 30)

        before = proxy.received
        answer = read_live(viewer, job)
        received = proxy.received - before
        job.cancel()

    assert answer["error"] == "" and answer["truncated"]["stdout"] is True
    body = answer["stdout"][len(EARLIER_OUTPUT) :]
    assert answer["stdout"].startswith(EARLIER_OUTPUT)
    assert len(body.encode()) <= LIVE_TAIL_BYTES
    assert body.endswith(f"\n300 {long}\nlast-line\n")
    # Nothing was printed on stderr; how far back the read went for it is not known.
    assert answer["stderr"] in ("", EARLIER_OUTPUT)
    # A few times the bound (the read's budget is 8 times it), not the 9 MB printed.
    assert received < 10 * LIVE_TAIL_BYTES, received


def test_a_daemon_that_does_not_answer_gives_an_error_not_a_hung_request(
    start_job: Callable[..., ContainerJob], django_user_model: Any, test_image: str
) -> None:
    # The daemon seen through a proxy that holds every logs request back: a daemon that
    # accepts the connection and then says nothing.
    with DockerProxy(delay=20.0, delay_pattern=r"/logs\?") as proxy:
        host = ExecutorHost.objects.create(name="silent-logs", connection_string=proxy.url)
        job = start_job("sh -c 'echo hello; sleep 60'", docker_host=host)
        viewer = staff_client(django_user_model, "view_containerjob")

        began = time.monotonic()
        answer = read_live(viewer, job)
        elapsed = time.monotonic() - began
        assert proxy.delayed, "the logs request did not go through the proxy"
        assert elapsed < LIVE_READ_TIMEOUT + 2, f"the read took {elapsed:.1f}s"
        assert answer["running"] is True and answer["status"] == "running"
        assert answer["error"] and "logs of" in answer["error"]
        assert (answer["stdout"], answer["stderr"]) == ("", "")
        job.cancel()


class StallingDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A fake daemon on a Unix socket: it answers the client's version question, then
    answers a logs request with its headers and one entry, and says nothing more."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.stalled = threading.Event()
        self.release = threading.Event()
        super().__init__(path, _StallingHandler)


class _StallingHandler(socketserver.StreamRequestHandler):
    server: StallingDaemon

    def handle(self) -> None:
        while True:  # one connection may carry several requests
            request_line = self.rfile.readline()
            if not request_line:
                return
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # the request's headers
            if b"/logs" in request_line:
                entry = b"first entry\n"
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                    b"Connection: close\r\n\r\n" + struct.pack(">BxxxL", 1, len(entry)) + entry
                )
                self.wfile.flush()
                self.server.stalled.set()
                self.server.release.wait(30)
                return
            body = json.dumps({"ApiVersion": "1.41", "Version": "20.10.24"}).encode()
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.wfile.flush()


@pytest.fixture
def stalling_daemon() -> Iterator[tuple[StallingDaemon, str]]:
    folder = tempfile.mkdtemp(prefix="dcc-stall-")
    path = os.path.join(folder, "docker.sock")
    server = StallingDaemon(path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, f"unix://{path}"
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        os.unlink(path)
        os.rmdir(folder)


def test_a_daemon_that_stalls_in_mid_answer_gives_an_error_in_time(
    stalling_daemon: tuple[StallingDaemon, str], django_user_model: Any
) -> None:
    server, url = stalling_daemon
    host = ExecutorHost.objects.create(name="stalling", connection_string=url)
    job = ContainerJob.objects.create(
        name="stalled",
        docker_image="busybox:latest",
        status=Status.RUNNING,
        attempt=1,
        docker_host=host,
        assigned_host=host,
    )
    viewer = staff_client(django_user_model, "view_containerjob")

    began = time.monotonic()
    answer = read_live(viewer, job)
    elapsed = time.monotonic() - began
    assert server.stalled.is_set(), "the fake daemon was never asked for the logs"
    assert elapsed < LIVE_READ_TIMEOUT + 2, f"the read took {elapsed:.1f}s"
    assert answer["running"] is True and answer["error"]


def test_a_stored_tail_cut_inside_a_secret_does_not_show_its_end() -> None:
    job = ContainerJob.objects.create(
        name="cut",
        docker_image="busybox:latest",
        environment={"DB_PASSWORD": "correct-horse-battery"},
        status=Status.COMPLETED,
        attempt=1,
        exit_code=0,
        # The stored tail starts in the middle of the secret, as a cut can.
        stdout_log="[... 40 bytes truncated ...]\nhorse-battery\nnext line correct-horse-battery\n",
        stderr_log="nothing secret\n",
    )
    answer = live_tail(job)
    assert answer["running"] is False and answer["source"] == "stored"
    assert answer["stdout"] == f"{EARLIER_OUTPUT}{MASK}\nnext line {MASK}\n"
    assert answer["stderr"] == "nothing secret\n"
    assert answer["truncated"] == {"stdout": True, "stderr": False}


@pytest.mark.browser
def test_the_change_page_shows_the_output_growing_in_chromium(
    browser_page: Any,  # noqa: F811 - the fixture imported above
    live_server: Any,
    django_user_model: Any,
    start_job: Callable[..., ContainerJob],
) -> None:
    page = browser_page
    page.set_viewport_size({"width": 1366, "height": 768})
    django_user_model.objects.create_superuser("watcher", password="watch-pass-1")
    job = start_job(COUNTING, name="counting")

    change = reverse("admin:django_container_celery_containerjob_change", args=[job.pk])
    page.goto(f"{live_server.url}/admin/login/?next={change}")
    page.fill("#id_username", "watcher")
    page.fill("#id_password", "watch-pass-1")
    page.click("input[type=submit]")
    stdout_box = page.locator('.dcc-live-log[data-stream="stdout"]')
    stderr_box = page.locator('.dcc-live-log[data-stream="stderr"]')
    stdout_box.wait_for()
    page.wait_for_function(
        "document.querySelector('.dcc-live-log[data-stream=stdout]').textContent"
        ".split('line-').length > 3"
    )
    first = numbered(stdout_box.text_content() or "", "line")
    assert "Running" in page.inner_text(".dcc-live-state")
    assert "updated" in page.inner_text(".dcc-live-updated")
    page.locator(".dcc-live").scroll_into_view_if_needed()
    page.screenshot(path=str(OUTPUT / "live-log-running-1.png"), full_page=True)

    page.wait_for_timeout(4000)
    second = numbered(stdout_box.text_content() or "", "line")
    assert len(second) >= len(first) + 2, (first, second)
    assert second[: len(first)] == first
    assert "err-1" in (stderr_box.text_content() or "")
    assert f"token={MASK}" in (stdout_box.text_content() or "")
    assert SECRET not in page.content()
    assert page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    ), "the page scrolls sideways"
    page.screenshot(path=str(OUTPUT / "live-log-running-2.png"), full_page=True)

    # Once the box overflows it follows the output, as long as the reader stays at its
    # bottom; a reader who scrolled up is left where they are.
    box = "document.querySelector('.dcc-live-log[data-stream=stdout]')"
    page.wait_for_function(f"{box}.scrollHeight > {box}.clientHeight + 40", timeout=20_000)
    assert page.evaluate(f"{box}.scrollHeight - {box}.scrollTop - {box}.clientHeight < 4")
    page.screenshot(path=str(OUTPUT / "live-log-following.png"), full_page=True)
    page.evaluate(f"{box}.scrollTop = 0")
    shown = len(stdout_box.text_content() or "")
    page.wait_for_function(f"{box}.textContent.length > {shown}")
    assert page.evaluate(f"{box}.scrollTop") == 0

    assert job.cancel() is True
    page.wait_for_function(
        "document.querySelector('.dcc-live-state').textContent.includes('Container ended')",
        timeout=10_000,
    )
    assert page.locator(".dcc-live-state a").inner_text().startswith("reload")
    # The last output read stays in view.
    assert len(numbered(stdout_box.text_content() or "", "line")) >= len(second)
    page.screenshot(path=str(OUTPUT / "live-log-ended.png"), full_page=True)
