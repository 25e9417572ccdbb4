"""Run one function in several OS processes at once, against the test database."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

from django.db import connections

_ctx = multiprocessing.get_context("fork")


def _child(func: Callable[..., Any], barrier: Any, results: Any, index: int, args: tuple) -> None:
    try:
        barrier.wait(timeout=30)
        results.put((index, "ok", func(index, *args)))
    except BaseException as exc:  # report every failure to the parent
        results.put((index, "error", f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        connections.close_all()


def run_in_processes(
    func: Callable[..., Any], count: int, *args: Any, timeout: float = 120
) -> list[Any]:
    """Start ``count`` processes that call ``func(index, *args)`` together; return results.

    The parent's connections are closed before forking so that no child shares a socket
    with it; each child opens its own. A child's exception fails the caller.
    """
    connections.close_all()
    barrier = _ctx.Barrier(count)
    results = _ctx.Queue()
    procs = [
        _ctx.Process(target=_child, args=(func, barrier, results, i, args)) for i in range(count)
    ]
    for proc in procs:
        proc.start()
    collected = [results.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout=timeout)
    errors = [detail for _, kind, detail in collected if kind == "error"]
    if errors:
        raise AssertionError("a worker process failed:\n" + "\n".join(errors))
    return [value for _, _, value in sorted(collected, key=lambda item: item[0])]
