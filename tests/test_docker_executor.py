"""DockerExecutor against the real Docker daemon."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker.errors
import pytest
from django.conf import settings

from django_container_celery.exceptions import ExecutorError
from django_container_celery.executors import (
    ContainerExists,
    ContainerSpec,
    StartFailed,
    executor_for,
)
from django_container_celery.executors.docker import DockerExecutor, parse_docker_time

pytestmark = pytest.mark.docker

SpecFactory = Callable[..., ContainerSpec]


@pytest.fixture
def executor(docker_client: Any) -> Iterator[DockerExecutor]:
    executor = DockerExecutor(settings.DOCKER_HOST, timeout=30)
    yield executor
    executor.close()


@pytest.fixture
def make_spec(docker_client: Any, test_image: str) -> Iterator[SpecFactory]:
    """Builds specs with unique names and force-removes every such container afterwards."""
    names: list[str] = []

    def factory(command: list[str] | None = None, **overrides: Any) -> ContainerSpec:
        job_id = str(uuid.uuid4())
        values: dict[str, Any] = {
            "name": f"dcc-test-{job_id}-a1",
            "image": test_image,
            "command": command if command is not None else ["true"],
            "environment": {},
            "labels": {"dcc.job_id": job_id, "dcc.attempt": "1"},
            "network_mode": "none",
        }
        values.update(overrides)
        names.append(values["name"])
        return ContainerSpec(**values)

    yield factory
    for name in names:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(name, force=True, v=True)


def containers_named(docker_client: Any, name: str) -> list[Any]:
    # The name filter is a regular expression match; anchor it to avoid prefixes.
    return docker_client.containers.list(all=True, filters={"name": f"^/{name}$"})


def test_run_reports_exit_code_and_both_streams(
    executor: DockerExecutor, make_spec: SpecFactory
) -> None:
    spec = make_spec(
        ["sh", "-c", 'echo "out $GREETING"; echo err >&2; sleep 1; exit 3'],
        environment={"GREETING": "hello"},
        working_dir="/tmp",
    )
    container_id = executor.start(spec)
    state = executor.inspect(spec.name)
    assert state is not None
    assert state.container_id == container_id
    assert state.running is True
    assert state.exit_code is None
    assert state.started_at is not None
    assert state.finished_at is None

    assert executor.wait(spec.name, timeout=30) == 3
    assert executor.logs(spec.name, 10_000) == ("out hello\n", "err\n")
    state = executor.inspect(container_id)
    assert state is not None
    assert state.running is False
    assert state.exit_code == 3
    assert state.started_at is not None and state.finished_at is not None
    assert state.finished_at >= state.started_at


def test_command_none_keeps_image_default(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    spec = make_spec(None)
    spec = ContainerSpec(**{**spec.__dict__, "command": None})
    executor.start(spec)
    image_cmd = docker_client.images.get(spec.image).attrs["Config"]["Cmd"]
    assert docker_client.api.inspect_container(spec.name)["Config"]["Cmd"] == image_cmd


def test_logs_are_truncated_to_their_tail(executor: DockerExecutor, make_spec: SpecFactory) -> None:
    # 200 KB of short lines: more lines than the first tail request asks for.
    spec = make_spec(["sh", "-c", "seq 1 40000; echo END; seq 1 100 >&2"])
    executor.start(spec)
    assert executor.wait(spec.name, timeout=60) == 0
    stdout, stderr = executor.logs(spec.name, 10_000)
    assert stdout.startswith("[... ")
    assert "bytes truncated" in stdout
    assert stdout.endswith("39999\n40000\nEND\n")
    kept = stdout.split("\n", 1)[1]
    assert len(kept.encode()) == 10_000
    assert stderr == "".join(f"{n}\n" for n in range(1, 101))


def test_logs_of_long_lines_keep_the_tail(executor: DockerExecutor, make_spec: SpecFactory) -> None:
    spec = make_spec(["sh", "-c", "yes 0123456789abcdef | head -c 200000; echo; echo LAST"])
    executor.start(spec)
    assert executor.wait(spec.name, timeout=60) == 0
    stdout, _ = executor.logs(spec.name, 4096)
    assert stdout.endswith("\nLAST\n")
    assert len(stdout.split("\n", 1)[1].encode()) == 4096


def test_second_start_of_the_same_name_is_refused(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    spec = make_spec(["sleep", "30"])
    container_id = executor.start(spec)
    with pytest.raises(ContainerExists) as caught:
        executor.start(spec)
    assert caught.value.name == spec.name
    assert caught.value.container_id == container_id
    assert [c.id for c in containers_named(docker_client, spec.name)] == [container_id]


def test_missing_image_is_image_not_found(executor: DockerExecutor, make_spec: SpecFactory) -> None:
    spec = make_spec(image="dcc-test-no-such-image:never")
    with pytest.raises(ExecutorError) as caught:
        executor.start(spec)
    assert isinstance(caught.value.original, docker.errors.ImageNotFound)
    assert executor.inspect(spec.name) is None


def test_auto_pull_tries_the_registry_for_a_missing_image(
    executor: DockerExecutor, make_spec: SpecFactory
) -> None:
    # No registry is reachable here, so the pull itself fails; what matters is that the
    # pull was attempted and its own error is the one handed back.
    spec = make_spec(image="dcc-test-no-such-image:never", auto_pull=True)
    with pytest.raises(ExecutorError) as caught:
        executor.start(spec)
    assert isinstance(caught.value.original, docker.errors.APIError)
    assert "pull" in str(caught.value)
    assert executor.inspect(spec.name) is None


def test_a_start_that_fails_leaves_the_created_container_to_the_caller(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    # Only the caller knows whether its claim still holds, and so whether the container is
    # its own to remove (a launch taken over may have a new owner by now).
    spec = make_spec(["nonexistent-binary"])
    with pytest.raises(StartFailed) as caught:
        executor.start(spec)
    assert isinstance(caught.value.original, docker.errors.APIError)
    assert "nonexistent-binary" in str(caught.value)
    assert caught.value.name == spec.name
    assert [c.status for c in containers_named(docker_client, spec.name)] == ["created"]


def test_a_created_but_never_started_container_is_reported_and_can_be_replaced(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    spec = make_spec(["sh", "-c", "echo ran"])
    stale = docker_client.api.create_container(spec.image, command=["true"], name=spec.name)
    with pytest.raises(ContainerExists) as caught:
        executor.start(spec)
    assert caught.value.unstarted and caught.value.container_id == stale["Id"]
    assert executor.remove_unstarted(spec.name)
    container_id = executor.start(spec)
    assert [c.id for c in containers_named(docker_client, spec.name)] == [container_id]
    assert executor.wait(spec.name, 30) == 0


def test_a_started_container_is_never_removed_as_unstarted(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    spec = make_spec(["sleep", "30"])
    executor.start(spec)
    with pytest.raises(ContainerExists) as caught:
        executor.start(spec)
    assert not caught.value.unstarted
    assert not executor.remove_unstarted(spec.name)
    assert [c.status for c in containers_named(docker_client, spec.name)] == ["running"]


def test_limits_are_applied_and_never_privileged(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    spec = make_spec(["sleep", "30"], memory_mb=64, cpus=0.5)
    executor.start(spec)
    host_config = docker_client.api.inspect_container(spec.name)["HostConfig"]
    assert host_config["Memory"] == 64 * 1024 * 1024
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["Privileged"] is False
    assert host_config["NetworkMode"] == "none"
    assert host_config["AutoRemove"] is False


def test_bind_mounts_are_passed_with_their_mode(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any, tmp_path: Any
) -> None:
    (tmp_path / "in.txt").write_text("mounted\n")
    spec = make_spec(["cat", "/data/in.txt"], bind_mounts=((str(tmp_path), "/data", True),))
    executor.start(spec)
    assert executor.wait(spec.name, timeout=30) == 0
    assert executor.logs(spec.name, 1000) == ("mounted\n", "")
    binds = docker_client.api.inspect_container(spec.name)["HostConfig"]["Binds"]
    assert binds == [f"{tmp_path}:/data:ro"]


def test_stop_kills_a_sleeping_container(executor: DockerExecutor, make_spec: SpecFactory) -> None:
    spec = make_spec(["sleep", "300"])
    executor.start(spec)
    began = time.monotonic()
    executor.stop(spec.name, timeout=1)
    assert time.monotonic() - began < 10
    assert executor.wait(spec.name, timeout=10) in (137, 143)
    executor.stop(spec.name)  # stopping an exited container is a no-op


def test_operations_on_missing_names_are_harmless(executor: DockerExecutor) -> None:
    name = f"dcc-test-missing-{uuid.uuid4()}"
    executor.remove(name)
    executor.stop(name)
    assert executor.inspect(name) is None
    assert executor.logs(name, 100) == ("", "")
    with pytest.raises(ExecutorError):
        executor.wait(name, timeout=1)


def test_remove_deletes_a_running_container(
    executor: DockerExecutor, make_spec: SpecFactory
) -> None:
    spec = make_spec(["sleep", "300"])
    executor.start(spec)
    executor.remove(spec.name)
    assert executor.inspect(spec.name) is None


def test_list_job_containers_reads_the_labels(
    executor: DockerExecutor, make_spec: SpecFactory
) -> None:
    running = make_spec(["sleep", "30"])
    exited = make_spec(["true"])
    exited = ContainerSpec(**{**exited.__dict__, "labels": {**exited.labels, "dcc.attempt": "2"}})
    running_id = executor.start(running)
    exited_id = executor.start(exited)
    assert executor.wait(exited.name, timeout=30) == 0

    found = {info.name: info for info in executor.list_job_containers()}
    assert found[running.name].container_id == running_id
    assert found[running.name].job_id == running.labels["dcc.job_id"]
    assert found[running.name].attempt == 1
    assert found[running.name].running is True
    assert found[exited.name].container_id == exited_id
    assert found[exited.name].attempt == 2
    assert found[exited.name].running is False


def test_wait_times_out_on_a_running_container(
    executor: DockerExecutor, make_spec: SpecFactory
) -> None:
    spec = make_spec(["sleep", "300"])
    executor.start(spec)
    began = time.monotonic()
    assert executor.wait(spec.name, timeout=0.5) is None
    assert time.monotonic() - began < 5
    assert executor.wait(spec.name, timeout=0) is None
    # The client stays usable after a timed-out request.
    state = executor.inspect(spec.name)
    assert state is not None and state.running


def test_created_but_never_started_is_not_a_success(
    executor: DockerExecutor, make_spec: SpecFactory, docker_client: Any
) -> None:
    # What a worker killed between create and start leaves behind.
    spec = make_spec(["true"])
    docker_client.api.create_container(spec.image, command=spec.command, name=spec.name)
    state = executor.inspect(spec.name)
    assert state is not None
    assert state.running is False
    assert state.exit_code is None
    assert state.error
    with pytest.raises(ExecutorError):
        executor.wait(spec.name, timeout=5)


def test_unreachable_daemon_fails_on_use_not_on_construction(make_spec: SpecFactory) -> None:
    executor = DockerExecutor("unix:///tmp/nonexistent.sock", timeout=5)
    with pytest.raises(ExecutorError) as caught:
        executor.ping()
    assert caught.value.original is not None
    assert not isinstance(caught.value.original, ExecutorError)
    with pytest.raises(ExecutorError) as caught:
        executor.start(make_spec())
    assert caught.value.original is not None
    executor.close()


def test_unreachable_daemon_is_classified_transient() -> None:
    from django_container_celery.retry import ErrorClassifier, ErrorType

    executor = DockerExecutor("unix:///tmp/nonexistent.sock", timeout=5)
    with pytest.raises(ExecutorError) as caught:
        executor.inspect("anything")
    assert ErrorClassifier.classify_error(caught.value) == ErrorType.TRANSIENT


def test_ping_of_the_real_daemon(executor: DockerExecutor) -> None:
    executor.ping()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0001-01-01T00:00:00Z", None),
        ("", None),
        ("2024-03-05T06:07:08.123456789Z", "2024-03-05T06:07:08.123456+00:00"),
        ("2024-03-05T06:07:08Z", "2024-03-05T06:07:08+00:00"),
        ("2024-03-05T06:07:08.5+02:00", "2024-03-05T06:07:08.500000+02:00"),
    ],
)
def test_parse_docker_time(text: str, expected: str | None) -> None:
    parsed = parse_docker_time(text)
    assert (parsed.isoformat() if parsed else None) == expected


@pytest.mark.django_db
def test_executor_for_host_is_cached_per_host(settings: Any) -> None:
    from django_container_celery.executors import clear_executor_cache
    from django_container_celery.models import ExecutorHost

    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "docker"}
    host = ExecutorHost.objects.create(
        name=f"h-{uuid.uuid4()}", connection_string=settings.DOCKER_HOST
    )
    try:
        first = executor_for(host)
        assert isinstance(first, DockerExecutor)
        assert first.base_url == settings.DOCKER_HOST
        assert executor_for(host) is first
        assert executor_for(None) is not first
        first.ping()

        host.connection_string = "unix:///tmp/nonexistent.sock"
        moved = executor_for(host)
        assert moved is not first
        with pytest.raises(ExecutorError):
            moved.ping()
    finally:
        clear_executor_cache()


@pytest.mark.django_db
def test_for_host_with_missing_tls_files_fails_on_use() -> None:
    from django_container_celery.models import ExecutorHost

    host = ExecutorHost(
        name="tls",
        connection_string="tcp://127.0.0.1:1",
        tls_enabled=True,
        tls_client_cert="/nonexistent/cert.pem",
        tls_client_key="/nonexistent/key.pem",
    )
    executor = DockerExecutor.for_host(host)
    with pytest.raises(ExecutorError) as caught:
        executor.ping()
    assert isinstance(caught.value.original, docker.errors.DockerException)


def test_forked_child_never_reuses_the_parents_executor(settings: Any) -> None:
    import os

    from django_container_celery.executors import clear_executor_cache

    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "docker"}
    try:
        parent = executor_for(None)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report and leave without running any cleanup
            child = executor_for(None)
            answer = b"fresh" if child is not parent and executor_for(None) is child else b"reused"
            os.write(write_end, answer)
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        assert os.read(read_end, 10) == b"fresh"
        os.close(read_end)
        assert executor_for(None) is parent
    finally:
        clear_executor_cache()
