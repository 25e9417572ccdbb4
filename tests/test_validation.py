"""Bad input gets a ValidationError naming the field, and nothing is saved (SPEC 4.8)."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_container_celery.models import ContainerJob
from django_container_celery.validators import ENV_KEY_RE, IMAGE_REFERENCE_RE, mask_environment

pytestmark = pytest.mark.django_db
HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
VALID = {"docker_image": "busybox:latest", "command": "echo hi"}


def assert_rejected(field: str, **overrides: Any) -> None:
    with pytest.raises(ValidationError) as info:
        ContainerJob.objects.create_job(**{**VALID, **overrides})
    assert field in info.value.message_dict, info.value.message_dict
    assert not ContainerJob.objects.exists()


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "busybox:1.36",
        "library/busybox:latest",
        "registry.example.com:5000/team/app:v1.2-rc_3",
        "localhost/app",
        "app@sha256:" + "a" * 64,
        "ghcr.io/org/app:1@sha256:" + "0" * 64,
        "my_app__x-y.z",
        "app:" + "t" * 128,
    ],
)
def test_valid_image_references(image: str) -> None:
    job = ContainerJob.objects.create_job(docker_image=image)
    assert job.pk is not None


@pytest.mark.parametrize(
    "image",
    [
        "",
        "BusyBox",
        "app:" + "t" * 129,
        "app@sha256:abc",
        "app@md5:" + "a" * 32,
        "-app",
        "app/",
        "app//x",
        "app:tag:again",
        "app name",
        "host:port/app",
        "a" * 256,
    ],
)
def test_invalid_image_references(image: str) -> None:
    assert_rejected("docker_image", docker_image=image)


@HYPOTHESIS
@given(st.text(max_size=60).filter(lambda s: not IMAGE_REFERENCE_RE.fullmatch(s)))
def test_generated_bad_images_are_rejected(image: str) -> None:
    assert_rejected("docker_image", docker_image=image)


def _unparsable(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return True
    return False


@HYPOTHESIS
@given(st.text(max_size=40).map(lambda s: s + "'").filter(_unparsable))
def test_unparsable_commands_are_rejected(command: str) -> None:
    assert_rejected("command", command=command)


@HYPOTHESIS
@given(
    st.dictionaries(
        st.text(max_size=12).filter(lambda k: not ENV_KEY_RE.fullmatch(k)),
        st.text(max_size=5),
        min_size=1,
        max_size=3,
    )
)
def test_bad_environment_keys_are_rejected(env: dict[str, str]) -> None:
    assert_rejected("environment", environment=env)


@HYPOTHESIS
@given(
    st.one_of(
        st.integers(),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.lists(st.text(max_size=3), max_size=2),
    )
)
def test_non_string_environment_values_are_rejected(value: Any) -> None:
    assert_rejected("environment", environment={"GOOD_NAME": value})


def test_environment_must_be_an_object() -> None:
    assert_rejected("environment", environment=["A=1"])


@HYPOTHESIS
@given(
    st.one_of(st.integers(min_value=0, max_value=3), st.integers(min_value=65537, max_value=10**9))
)
def test_memory_out_of_range(memory: int) -> None:
    assert_rejected("memory_limit", memory_limit=memory)


@HYPOTHESIS
@given(
    st.one_of(
        st.floats(max_value=0.0099, allow_nan=False, allow_infinity=False),
        st.floats(min_value=64.0001, allow_nan=False, allow_infinity=False),
    )
)
def test_cpus_out_of_range(cpus: float) -> None:
    assert_rejected("cpu_limit", cpu_limit=cpus)


@HYPOTHESIS
@given(st.one_of(st.just(0), st.integers(min_value=7 * 24 * 3600 + 1, max_value=10**9)))
def test_timeout_out_of_range(timeout: int) -> None:
    assert_rejected("timeout_seconds", timeout_seconds=timeout)


@HYPOTHESIS
@given(st.integers(min_value=101, max_value=30000))
def test_priority_out_of_range(priority: int) -> None:
    assert_rejected("priority", priority=priority)


def test_negative_priority_rejected() -> None:
    assert_rejected("priority", priority=-1)


def test_limits_follow_settings() -> None:
    with override_settings(CONTAINER_CELERY={"MAX_MEMORY_MB": 512, "MAX_CPUS": 2.0}):
        assert_rejected("memory_limit", memory_limit=513)
        assert_rejected("cpu_limit", cpu_limit=2.5)
        assert ContainerJob.objects.create_job(**VALID, memory_limit=512, cpu_limit=2.0).pk


def test_retry_exit_codes_and_strategy() -> None:
    assert_rejected("retry_exit_codes", retry_exit_codes=[0])
    assert_rejected("retry_exit_codes", retry_exit_codes="1,2")
    assert_rejected("retry_strategy", retry_strategy="sometimes")
    job = ContainerJob.objects.create_job(
        **VALID, retry_exit_codes=[3, 75], retry_strategy="aggressive"
    )
    assert job.retry_exit_codes == [3, 75]


def test_bind_mounts_need_the_allow_list(tmp_path: Any) -> None:
    assert_rejected("bind_mounts", bind_mounts=[f"{tmp_path}:/data"])
    assert_rejected("bind_mounts", bind_mounts=["relative:/data"])
    with override_settings(CONTAINER_CELERY={"ALLOWED_BIND_MOUNTS": [str(tmp_path)]}):
        assert_rejected("bind_mounts", bind_mounts=["/etc:/data:ro"])
        job = ContainerJob.objects.create_job(**VALID, bind_mounts=[f"{tmp_path}/sub:/data:ro"])
        assert job.bind_mounts == [f"{tmp_path}/sub:/data:ro"]


def test_several_bad_fields_are_all_named() -> None:
    with pytest.raises(ValidationError) as info:
        ContainerJob.objects.create_job(docker_image="Bad", command="'", priority=500)
    assert {"docker_image", "command", "priority"} <= set(info.value.message_dict)
    assert not ContainerJob.objects.exists()


def test_secret_values_are_masked() -> None:
    masked = mask_environment(
        {"DB_PASSWORD": "p", "API_TOKEN": "t", "aws_secret_key": "s", "HOME": "/"}
    )
    assert masked == {
        "DB_PASSWORD": "********",
        "API_TOKEN": "********",
        "aws_secret_key": "********",
        "HOME": "/",
    }
