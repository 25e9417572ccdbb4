"""How an attempt can end, as plain data: what ``finishing.end_attempt`` records and what
``retry.get_retry_decision`` decides on.

Every place that sees an attempt end (an exit, a kill for memory, a timeout, a vanished
container, a failed launch, a cancel, a job that cannot be finished) describes it as an
:class:`Ending` and hands it to ``end_attempt``; none of them decides the job's next status
itself.
"""

from __future__ import annotations

import dataclasses
import enum


class End(enum.Enum):
    EXITED = "exited"  # the container exited with a code
    # The container exited because the kernel killed it for memory (Docker's
    # State.OOMKilled, or its ``oom`` event): at its memory limit, or the host's.
    OUT_OF_MEMORY = "out_of_memory"
    TIMED_OUT = "timed_out"  # killed past the job's timeout
    VANISHED = "vanished"  # the container is gone, or was created and never started
    LAUNCH_FAILED = "launch_failed"  # the daemon refused or failed the launch
    CANCELLED = "cancelled"  # an operator or the API cancelled the job
    UNFINISHABLE = "unfinishable"  # finishing kept failing; given up after FINISH_TRIES


@dataclasses.dataclass(frozen=True)
class Ending:
    kind: End
    exit_code: int | None = None
    error: str = ""
    # Only for LAUNCH_FAILED: the exception, classified transient or permanent.
    exception: BaseException | None = None
    # Only for LAUNCH_FAILED: the definition itself cannot run (never retried).
    refused: bool = False

    @property
    def container_exited(self) -> bool:
        """The attempt's container ran and exited (on its own, killed for memory, or killed
        past its timeout): it has an exit code, and logs to store."""
        return self.kind in (End.EXITED, End.OUT_OF_MEMORY, End.TIMED_OUT)

    @property
    def without_outcome(self) -> bool:
        """The attempt ended without telling how the job went: its container vanished
        (removed from outside, or lost with its host's data), or its finishing kept
        failing. Such attempts are bounded by ``MAX_ATTEMPTS_WITHOUT_OUTCOME`` whatever the
        job's max_retries. A launch the daemon did not answer is not one of them: nothing
        ran, and ``max_retries`` with its back-off bounds it (the host's health counts it).
        """
        return self.kind in (End.VANISHED, End.UNFINISHABLE)
