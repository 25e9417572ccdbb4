"""Log capture: a bounded tail of each stream, stored as text PostgreSQL can hold.

The buffer and the decoding rule are tested without a daemon; then the DockerExecutor reads
real containers: NUL and invalid bytes, a job finished with them, and a 100 MB line whose
read is measured for peak memory in a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import docker.errors
import pytest
import urllib3.exceptions
from django.conf import settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_container_celery.exceptions import ExecutorError
from django_container_celery.executors import ContainerSpec, FakeRun, MemoryExecutor
from django_container_celery.executors.base import LogTail, decode_log, truncate_tail
from django_container_celery.executors.docker import DockerExecutor
from django_container_celery.models import ContainerJob
from django_container_celery.queue import JobQueueManager
from django_container_celery.states import Status

from .test_engine_docker import app_settings_with, harvest_until, remove_job_containers

KIB = 1024
MIB = 1024 * KIB


def marker(dropped: int) -> str:
    return f"[... {dropped} bytes truncated ...]\n"


def fed(data: bytes, max_bytes: int, chunk: int) -> str:
    tail = LogTail(max_bytes)
    for start in range(0, len(data), chunk):
        tail.feed(data[start : start + chunk])
    assert tail.seen == len(data)
    return tail.text()


# -- the storage rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (b"plain\n", "plain\n"),
        ("é€😀\n".encode(), "é€😀\n"),
        (b"a\x00b", "a\\x00b"),
        (b"a\xffb\xfe", "a\\xffb\\xfe"),
        (b"cut \xe2\x82", "cut \\xe2\\x82"),  # a character the output ended inside
        (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),  # an encoded surrogate is not valid UTF-8
        (b"\xc0\xaf", "\\xc0\\xaf"),  # nor is an overlong form
    ],
)
def test_decode_rule(raw: bytes, stored: str) -> None:
    assert decode_log(raw) == stored


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_to_text_postgresql_can_store(raw: bytes) -> None:
    stored = decode_log(raw)
    assert "\x00" not in stored
    stored.encode("utf-8")  # strict: no lone surrogate that the driver would refuse
    if b"\\" not in raw:
        # Without backslashes of its own in the output, the stored text gives the bytes back.
        assert _undo_rule(stored) == raw


def _undo_rule(stored: str) -> bytes:
    """The inverse of the rule for output that had no backslash of its own."""
    # unicode_escape reads the UTF-8 bytes as Latin-1 and expands each \xNN: encoding that
    # as Latin-1 gives back the bytes of the valid characters and the escaped ones alike.
    return stored.encode("utf-8").decode("unicode_escape").encode("latin-1")


# -- the bounded buffer -----------------------------------------------------------------------


def test_small_output_is_kept_whole_without_marker() -> None:
    assert truncate_tail(b"hello\n", 6) == "hello\n"
    assert truncate_tail(b"", 10) == ""
    assert fed(b"hello\n", 100, 1) == "hello\n"


def test_one_byte_over_is_marked_exactly() -> None:
    assert truncate_tail(b"0123456789", 9) == marker(1) + "123456789"


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_zero_or_negative_limit_keeps_everything(max_bytes: int) -> None:
    data = b"".join(b"%d\n" % n for n in range(100_000))
    assert fed(data, max_bytes, 16 * KIB) == data.decode()
    assert truncate_tail(b"a\x00b", max_bytes) == "a\\x00b"


@pytest.mark.parametrize("chunk", [1, 3, 1000, 9_999, 10_000, 10_003, 16 * KIB, 10**9])
def test_large_output_keeps_the_exact_tail_whatever_the_chunks(chunk: int) -> None:
    data = b"".join(b"%d\n" % n for n in range(100_000))
    expected = marker(len(data) - 10_000) + data[-10_000:].decode()
    assert fed(data, 10_000, chunk) == expected


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 4096])
def test_characters_split_by_chunks_decode_whole(chunk: int) -> None:
    data = ("é€😀" * 1000).encode()  # 9 bytes a round; chunks of 2, 5, 7 split characters
    assert fed(data, 0, chunk) == "é€😀" * 1000
    assert fed(data, 9 * 10, chunk) == marker(9 * 990) + "é€😀" * 10


@pytest.mark.parametrize(("max_bytes", "skipped"), [(8, 0), (7, 3), (6, 2), (5, 1), (4, 0)])
def test_a_cut_inside_a_character_drops_its_rest_and_counts_it(
    max_bytes: int, skipped: int
) -> None:
    # "😀" is 4 bytes, after 1: a tail of 5, 6 or 7 bytes starts inside it.
    data = "x😀abcd".encode()
    kept = max_bytes - skipped
    stored = truncate_tail(data, max_bytes)
    assert stored == marker(len(data) - kept) + data[-kept:].decode()
    assert "\\x" not in stored


def test_text_is_taken_once() -> None:
    tail = LogTail(10)
    tail.feed(b"abc")
    assert tail.text() == "abc"
    with pytest.raises(RuntimeError):
        tail.text()
    with pytest.raises(RuntimeError):
        tail.feed(b"more")


def test_stray_continuation_bytes_are_kept_under_the_rule() -> None:
    # No character starts before them: they are output, not the half of a character.
    assert truncate_tail(b"ab\x80\x80\x80\x80cd", 5) == marker(3) + "\\x80\\x80\\x80cd"


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=120),
    st.integers(min_value=1, max_value=50),
)
def test_any_chunking_gives_the_one_shot_result_and_an_exact_count(
    data: bytes, max_bytes: int, chunk: int
) -> None:
    stored = fed(data, max_bytes, chunk)
    assert stored == truncate_tail(data, max_bytes)
    if len(data) <= max_bytes:
        assert stored == decode_log(data)
        return
    head, body = stored.split("\n", 1) if stored.startswith("[... ") else ("", stored)
    dropped = int(head.removeprefix("[... ").removesuffix(" bytes truncated ...]"))
    kept = len(data) - dropped
    # At most the 3 bytes of a split character are given up beyond the limit.
    assert max_bytes - 3 <= kept <= max_bytes
    assert body == decode_log(data[dropped:])


def test_buffer_memory_stays_near_twice_the_limit() -> None:
    max_bytes, chunk = 64 * KIB, b"a" * (16 * KIB)
    tail = LogTail(max_bytes)
    tracemalloc.start()
    try:
        for _ in range(2_000):  # 32 MiB through the buffer
            tail.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The buffer never passes 2 * max_bytes + 3 bytes, and bytearray over-allocates by up
    # to an eighth when it grows; 4 KiB more covers the small objects of the loop.
    assert peak <= (2 * max_bytes + 3) * 9 / 8 + 4 * KIB
    assert tail.text() == marker(2_000 * len(chunk) - max_bytes) + "a" * max_bytes


# -- the in-memory executor applies the same rule ---------------------------------------------


def test_memory_executor_stores_by_the_same_rule() -> None:
    executor = MemoryExecutor(lambda spec: FakeRun(stdout=b"a\x00b\xffc", stderr="x\x00\ud800y"))
    spec = ContainerSpec(name="dcc-job-1-a1", image="i", command=None, environment={}, labels={})
    executor.start(spec)
    assert executor.logs(spec.name, 100) == ("a\\x00b\\xffc", "x\\x00\\xed\\xa0\\x80y")
    # The cut falls inside the 3 bytes of the surrogate: they go as a character would.
    assert executor.logs(spec.name, 3) == (marker(2) + "b\\xffc", marker(5) + "y")


# -- the Docker executor's reads, against a scripted API --------------------------------------


class _Frames:
    """What the SDK's logs(stream=True) returns: a wrapper around a frame generator."""

    def __init__(self, frames: Iterator[bytes]) -> None:
        self._stream = frames
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._stream

    def close(self) -> None:
        self.closed = True


class _ScriptedApi:
    """Serves log entries as 16 KiB frames of the one stream asked for."""

    def __init__(self, entries: list[tuple[str, bytes]], broken_after: int | None = None):
        self.entries = entries
        self.broken_after = broken_after
        self.opened: list[_Frames] = []

    def logs(self, name: str, stdout: bool, stderr: bool, stream: bool, follow: bool) -> _Frames:
        assert stream is True and follow is False and stdout != stderr
        if name == "gone":
            raise docker.errors.NotFound("No such container")
        frames = _Frames(self._frames("stdout" if stdout else "stderr"))
        self.opened.append(frames)
        return frames

    def _frames(self, wanted: str) -> Iterator[bytes]:
        for count, (stream, data) in enumerate(self.entries):
            if self.broken_after is not None and count >= self.broken_after:
                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
            if stream == wanted:
                for start in range(0, len(data), 16 * KIB):
                    yield data[start : start + 16 * KIB]


def _scripted(api: _ScriptedApi) -> DockerExecutor:
    executor = DockerExecutor("unix:///tmp/never-used.sock")
    executor._client = type("Client", (), {"api": api})()
    return executor


def test_a_stream_crowded_out_by_the_other_is_kept() -> None:
    entries = [("stderr", b"the real error\n")]
    entries += [("stdout", b"%d\n" % n) for n in range(300_000)]
    api = _ScriptedApi(entries)
    stdout, stderr = _scripted(api).logs("c", 64 * KIB)
    assert stderr == "the real error\n"
    everything = b"".join(data for stream, data in entries if stream == "stdout")
    assert stdout == marker(len(everything) - 64 * KIB) + everything[-64 * KIB :].decode()
    assert [frames.closed for frames in api.opened] == [True, True]


def test_a_connection_broken_mid_log_is_an_executor_error() -> None:
    entries = [("stdout", b"x" * 100_000), ("stdout", b"never sent")]
    api = _ScriptedApi(entries, broken_after=1)
    with pytest.raises(ExecutorError) as caught:
        _scripted(api).logs("c", 1000)
    assert isinstance(caught.value.original, urllib3.exceptions.ProtocolError)
    assert api.opened[0].closed


def test_a_container_gone_has_no_logs() -> None:
    assert _scripted(_ScriptedApi([])).logs("gone", 1000) == ("", "")


# -- against the daemon -----------------------------------------------------------------------


@pytest.fixture
def run_container(docker_client: Any, test_image: str) -> Iterator[Any]:
    """Runs a command to its end in a fresh container and gives its name; removes it after."""
    names: list[str] = []

    def run(script: str, log_driver: str | None = None) -> str:
        api = docker_client.api
        name = f"dcc-test-logs-{uuid.uuid4().hex[:12]}"
        names.append(name)
        log_config = {"type": log_driver, "config": {}} if log_driver else None
        host_config = api.create_host_config(network_mode="none", log_config=log_config)
        api.create_container(test_image, ["sh", "-c", script], name=name, host_config=host_config)
        api.start(name)
        assert api.wait(name, timeout=240)["StatusCode"] == 0
        return name

    yield run
    for name in names:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(name, force=True, v=True)


@pytest.fixture
def executor(docker_client: Any) -> Iterator[DockerExecutor]:
    executor = DockerExecutor(settings.DOCKER_HOST, timeout=60)
    yield executor
    executor.close()


NUL_AND_INVALID = r"""printf 'a\000b\377c'; printf '\000x\376' >&2"""


@pytest.mark.docker
def test_nul_and_invalid_bytes_are_stored_by_the_rule(
    run_container: Any, executor: DockerExecutor
) -> None:
    # The "local" log driver keeps the bytes as printed (json-file would already have
    # replaced the invalid ones with U+FFFD on the daemon's side).
    name = run_container(NUL_AND_INVALID, log_driver="local")
    assert executor.logs(name, 1000) == ("a\\x00b\\xffc", "\\x00x\\xfe")
    assert executor.logs(name, 2) == (marker(3) + "\\xffc", marker(1) + "x\\xfe")


@pytest.mark.docker
@pytest.mark.django_db
def test_a_job_printing_nul_and_invalid_bytes_completes(
    docker_client: Any, test_image: str
) -> None:
    job = ContainerJob.objects.create_job(
        command=f"sh -c {shlex.quote(NUL_AND_INVALID)}",
        docker_image=test_image,
        timeout_seconds=120,
    )
    job.mark_as_queued()
    manager = JobQueueManager(worker_id="log-capture")
    try:
        with app_settings_with(KEEP_CONTAINERS=True):
            assert manager.launch_job(job)["success"]
            done = harvest_until(manager, job, {Status.COMPLETED, Status.FAILED})
        api = docker_client.api
        printed = (
            api.logs(job.container_name, stdout=True, stderr=False),
            api.logs(job.container_name, stdout=False, stderr=True),
        )
    finally:
        remove_job_containers(docker_client, {str(job.pk)})
    assert done.status == Status.COMPLETED, done.last_error
    assert "\x00" not in done.stdout_log + done.stderr_log
    # What the daemon's log driver handed over, stored by the rule.
    assert (done.stdout_log, done.stderr_log) == tuple(decode_log(raw) for raw in printed)
    assert done.stdout_log.startswith("a\\x00b") and done.stdout_log.endswith("c")
    assert done.stderr_log.startswith("\\x00x")


# A fresh interpreter reads the logs and reports the growth of its peak resident memory
# across the read alone: the imports, the connection and a first small read come before,
# then the kernel's peak counter is reset (clear_refs 5), so nothing earlier hides in it.
RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    from django_container_celery.executors.docker import DockerExecutor

    def status_kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise LookupError(field)

    base_url, warm, name, max_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    executor = DockerExecutor(base_url, timeout=120)
    executor.logs(warm, max_bytes)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = status_kib("VmRSS")
    stdout, stderr = executor.logs(name, max_bytes)
    growth = status_kib("VmHWM") - before
    head, body = stdout.split("\\n", 1)
    print(json.dumps({"growth_kib": growth, "head": head, "body_len": len(body),
                      "body_is_tail": body == "a" * (len(body) - 1) + "\\n",
                      "stderr": stderr}))
    """
)

HUNDRED_MB = 100 * MIB
# At its peak a read holds the tail buffer (2 * max_bytes, and bytearray's eighth of slack
# when it grows) and its decoded text: about 3.25 * max_bytes. Beyond that, the SDK's frame
# of up to 16 KiB and the HTTP reader's buffers, the allocator's fresh arenas and heap
# pages, and page rounding. Measured in all: about 264 KiB at the default limit and 3.2 MiB
# at 1 MiB. 4 MiB leaves room for another libc or Python, while a read that holds the
# 100 MiB line at once (the old one grew by over 150 MiB) still fails by far.
RSS_ALLOWANCE_KIB = 4 * KIB


@pytest.fixture(scope="module")
def hundred_mb_line(docker_client: Any, test_image: str) -> Iterator[tuple[str, str]]:
    """(a container that printed 100 MB as one line on stdout and one line on stderr,
    a container that printed a few bytes on each)."""
    api = docker_client.api
    names = {"big": f"dcc-test-logs-big-{uuid.uuid4().hex[:12]}"}
    names["warm"] = names["big"].replace("big", "warm")
    scripts = {
        "big": f"head -c {HUNDRED_MB} /dev/zero | tr '\\0' a; echo; echo 'the error' >&2",
        "warm": "echo out; echo err >&2",
    }
    try:
        for key, name in names.items():
            host_config = api.create_host_config(network_mode="none")
            api.create_container(
                test_image, ["sh", "-c", scripts[key]], name=name, host_config=host_config
            )
            api.start(name)
            assert api.wait(name, timeout=240)["StatusCode"] == 0
        yield names["big"], names["warm"]
    finally:
        for name in names.values():
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(name, force=True, v=True)


def _probe(big: str, warm: str, max_bytes: int) -> dict[str, Any]:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError as exc:
        pytest.skip(f"this kernel cannot reset the peak RSS counter: {exc}")
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, settings.DOCKER_HOST, warm, big, str(max_bytes)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.docker
@pytest.mark.parametrize("max_bytes", [64 * KIB, 1 * MIB])
def test_a_100_mb_line_keeps_both_streams_with_bounded_memory(
    hundred_mb_line: tuple[str, str], max_bytes: int
) -> None:
    big, warm = hundred_mb_line
    result = _probe(big, warm, max_bytes)
    printed = HUNDRED_MB + 1  # the line and its newline
    assert result["head"] == marker(printed - max_bytes).rstrip("\n")
    assert (result["body_len"], result["body_is_tail"]) == (max_bytes, True)
    assert result["stderr"] == "the error\n"
    limit_kib = 4 * max_bytes // KIB + RSS_ALLOWANCE_KIB
    print(
        f"100 MB line, LOG_MAX_BYTES={max_bytes}: peak RSS growth {result['growth_kib']} KiB "
        f"(limit {limit_kib} KiB)"
    )
    assert result["growth_kib"] < limit_kib, result
