"""Log capture memory: peak RSS growth while reading the logs of a container that printed
1 GB on stdout, as one line.

Usage, from the repository root, with Docker up::

    python bench/log_capture.py [--bytes 1000000000] [--max-bytes 65536]

One container prints ``--bytes`` bytes of ``a`` and a newline on stdout, then one line on
stderr, and exits; then two readers, each in a fresh interpreter, read its logs:

* ``capture``: ``DockerExecutor.logs(name, max_bytes)``, the product, which keeps the last
  ``--max-bytes`` bytes of each stream (default ``LOG_MAX_BYTES``, 64 KiB).
* ``whole`` (the baseline): ``api.logs(name, stdout=True, stderr=False)`` without
  streaming, which is how the whole log is read with the Docker SDK.

Each reader first imports, connects and reads the logs of a small container, then resets
the kernel's peak RSS counter (``/proc/self/clear_refs``), so ``capture_rss_growth_kib``
and ``whole_rss_growth_mb`` are the growth of the peak across the big read alone
(``capture_rss_growth_per_max_bytes``: the first over ``--max-bytes``). The goal,
``capture_limit_kib``, is 4 times ``--max-bytes`` plus 4 MiB (the allowance justified in
``tests/test_log_capture.py``); ``goal_met`` says whether the capture stayed under it.
``marker_exact`` checks that the truncation line counts exactly the bytes dropped, and
``stderr_kept`` that the stderr line survived. ``produce_s`` is how long the container
took to print (the daemon writes its log to disk as it goes); printing and the two reads
of 1 GB take about 45 s. No database or broker is used.

Environment: ``DOCKER_HOST`` (default ``unix:///var/run/docker.sock``) and
``DCC_TEST_IMAGE`` (default ``dcc-test-busybox:latest``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

MIB = 1024 * 1024
ALLOWANCE = 4 * MIB
STDERR_LINE = "the error\n"


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def probe(mode: str, base_url: str, warm: str, name: str, max_bytes: int) -> dict[str, Any]:
    """Run in the fresh interpreter: one read of ``name`` after a warm-up on ``warm``."""
    from django_container_celery.executors.docker import DockerExecutor

    executor = DockerExecutor(base_url, timeout=600)

    def read(target: str) -> tuple[str, str]:
        if mode == "capture":
            return executor.logs(target, max_bytes)
        whole = executor.api.logs(target, stdout=True, stderr=False)
        return f"[whole: {len(whole)} bytes]\n", ""

    read(warm)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = status_kib("VmRSS")
    began = time.monotonic()
    stdout, stderr = read(name)
    seconds = time.monotonic() - began
    growth = status_kib("VmHWM") - before
    head = stdout.split("\n", 1)[0]
    return {"growth_kib": growth, "read_s": seconds, "head": head, "stderr": stderr}


def measure(mode: str, base_url: str, warm: str, name: str, max_bytes: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--probe", mode, base_url, warm, name, str(max_bytes)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} reader failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_container(client: Any, image: str, label: str, script: str) -> tuple[str, float]:
    api = client.api
    name = f"dccbench-logs-{uuid.uuid4().hex[:8]}"
    host_config = api.create_host_config(network_mode="none")
    api.create_container(
        image, ["sh", "-c", script], name=name, labels={label: "1"}, host_config=host_config
    )
    began = time.monotonic()
    api.start(name)
    code = api.wait(name, timeout=1800)["StatusCode"]
    if code != 0:
        raise RuntimeError(f"container {name} exited {code}")
    return name, time.monotonic() - began


def main(argv: list[str] | None = None) -> int:
    from django_container_celery.conf import DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=1_000_000_000)
    parser.add_argument("--max-bytes", type=int, default=DEFAULTS["LOG_MAX_BYTES"])
    parser.add_argument("--probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        mode, base_url, warm, name, max_bytes = args.probe
        print(json.dumps(probe(mode, base_url, warm, name, int(max_bytes))))
        return 0

    import docker

    from bench.plain_tasks import BENCH_LABEL

    wall = time.monotonic()
    base_url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    image = os.environ.get("DCC_TEST_IMAGE", "dcc-test-busybox:latest")
    client = docker.DockerClient(base_url=base_url, timeout=600)
    common.remove_containers(client, set(), BENCH_LABEL)
    try:
        script = f"head -c {args.bytes} /dev/zero | tr '\\0' a; echo; echo 'the error' >&2"
        big, produce_s = run_container(client, image, BENCH_LABEL, script)
        warm, _ = run_container(client, image, BENCH_LABEL, "echo out; echo err >&2")
        capture = measure("capture", base_url, warm, big, args.max_bytes)
        whole = measure("whole", base_url, warm, big, args.max_bytes)
    finally:
        common.remove_containers(client, set(), BENCH_LABEL)
        left = len(common.bench_containers(client, set(), BENCH_LABEL))
        client.close()

    dropped = args.bytes + 1 - args.max_bytes
    limit = 4 * args.max_bytes + ALLOWANCE
    capture_growth = capture["growth_kib"] * 1024
    common.emit("bytes_printed", args.bytes + 1)
    common.emit("log_max_bytes", args.max_bytes)
    common.emit("produce_s", produce_s)
    common.emit("capture_rss_growth_kib", capture["growth_kib"])
    common.emit("capture_rss_growth_per_max_bytes", f"{capture_growth / args.max_bytes:.2f}")
    common.emit("capture_read_s", capture["read_s"])
    common.emit("whole_rss_growth_mb", whole["growth_kib"] * 1024 / MIB)
    common.emit("whole_read_s", whole["read_s"])
    common.emit("whole_to_capture_rss_ratio", whole["growth_kib"] / max(1, capture["growth_kib"]))
    common.emit("capture_limit_kib", limit // 1024)
    marker = f"[... {dropped} bytes truncated ...]"
    common.emit("marker_exact", "yes" if capture["head"] == marker else "no")
    common.emit("stderr_kept", "yes" if capture["stderr"] == STDERR_LINE else "no")
    common.emit("containers_left", left)
    common.emit("goal_met", "yes" if capture_growth < limit else "no")
    common.emit("wall_s", time.monotonic() - wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
