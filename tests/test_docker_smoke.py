"""The local test image really runs in the Docker daemon the suite uses."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.docker


def test_image_runs_and_reports_exit_code(docker_client: Any, test_image: str) -> None:
    container = docker_client.containers.run(
        test_image,
        ["sh", "-c", "echo out; echo err >&2; exit 3"],
        detach=True,
        network_mode="none",
        labels={"dcc.test": "smoke"},
    )
    try:
        assert container.wait(timeout=60)["StatusCode"] == 3
        assert container.logs(stdout=True, stderr=False).decode().strip() == "out"
        assert container.logs(stdout=False, stderr=True).decode().strip() == "err"
    finally:
        container.remove(force=True)
