"""Container start events read live from the daemon: how many containers each job had,
and in which order jobs started (the daemon's replay buffer is too short for a whole run)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any

from django_container_celery.models import ContainerJob


class StartEvents:
    """Every ``start`` of a container labelled with a job id, in the daemon's order."""

    def __init__(self, docker_client: Any) -> None:
        self.order: list[str] = []
        self._stream = docker_client.api.events(
            filters={"type": "container", "event": "start", "label": "dcc.job_id"}, decode=True
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # closed under us at the end
            for event in self._stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                self.order.append(str(attributes.get("dcc.job_id", "")))

    @property
    def counts(self) -> collections.Counter[str]:
        return collections.Counter(self.order)

    def close(self) -> None:
        time.sleep(0.5)  # let the last events arrive
        with contextlib.suppress(Exception):
            self._stream.close()

    def per_job(self, jobs: list[ContainerJob]) -> dict[str, int]:
        self.close()
        counts = self.counts
        return {str(job.pk): counts[str(job.pk)] for job in jobs}

    def started(self, jobs: list[ContainerJob]) -> list[str]:
        """Ids of these jobs in the order their containers started."""
        wanted = {str(job.pk) for job in jobs}
        return [job_id for job_id in list(self.order) if job_id in wanted]
