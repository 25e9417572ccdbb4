"""How an attempt can end, as plain data: what ``finishing.end_attempt`` records and what
``retry.get_retry_decision`` decides on.

Every place that sees an attempt end (an exit, a timeout, a vanished container, a failed
launch, a cancel, a job that cannot be finished) describes it as an :class:`Ending` and
hands it to ``end_attempt``; none of them decides the job's next status itself.
"""

from __future__ import annotations

import dataclasses
import enum


class End(enum.Enum):
    EXITED = "exited"  # the container exited with a code
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
