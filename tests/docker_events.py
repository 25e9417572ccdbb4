"""Container events read live from the daemon: how many containers each job had, in
which order jobs started, and how many ran at once (the daemon's replay buffer is too
short for a whole run)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any

from django_container_celery.models import ContainerJob


class ContainerEvents:
    """Every start, die and destroy of a container labelled with a job id, in the
    daemon's order, as (action, container id, job id)."""

    def __init__(self, docker_client: Any) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self._stream = docker_client.api.events(
            filters={
                "type": "container",
                "event": ["start", "die", "destroy"],
                "label": "dcc.job_id",
            },
            decode=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # closed under us at the end
            for event in self._stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                job_id = str(attributes.get("dcc.job_id", ""))
                self.seen.append((str(event.get("Action")), str(event.get("id")), job_id))

    def close(self) -> None:
        time.sleep(0.5)  # let the last events arrive
        with contextlib.suppress(Exception):
            self._stream.close()

    def started(self, jobs: list[ContainerJob]) -> list[str]:
        """Ids of these jobs in the order their containers started."""
        wanted = {str(job.pk) for job in jobs}
        return [job for action, _, job in list(self.seen) if action == "start" and job in wanted]

    def per_job(self, jobs: list[ContainerJob]) -> dict[str, int]:
        """Containers started per job, once the stream is closed."""
        self.close()
        counts = collections.Counter(self.started(jobs))
        return {str(job.pk): counts[str(job.pk)] for job in jobs}

    def most_running_at_once(self, jobs: list[ContainerJob]) -> int:
        wanted = {str(job.pk) for job in jobs}
        running: set[str] = set()
        most = 0
        for action, container, job in list(self.seen):
            if job not in wanted:
                continue
            if action == "start":
                running.add(container)
            else:
                running.discard(container)
            most = max(most, len(running))
        return most

    def most_running_at_once_by(self, groups: Mapping[str, list[ContainerJob]]) -> dict[str, int]:
        """For each group of jobs (a lane, say), most of its containers running at once."""
        return {name: self.most_running_at_once(jobs) for name, jobs in groups.items()}
