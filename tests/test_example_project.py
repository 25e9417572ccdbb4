"""The example project (example_project/): its settings, `manage.py check`, its container
tasks and, against real Docker, the whole demo that `make demo` runs.

Each test gives the project a temporary data folder (DCC_EXAMPLE_DATA_DIR), so it never
touches the files of a demo run in the checkout, and removes DATABASE_URL and
CELERY_BROKER_URL from the environment, so the project uses its own defaults (SQLite and
kombu's filesystem broker) rather than the test suite's services.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from django_container_celery import conf
from django_container_celery.models import ContainerJob

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example_project"


def example_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
        and not key.startswith(("DJANGO_", "DCC_"))
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(EXAMPLE), str(ROOT)]),
        DCC_EXAMPLE_DATA_DIR=str(data_dir),
        **extra,
    )
    return env


def run_python(code: str, env: dict[str, str]) -> Any:
    """Run ``code`` in a fresh interpreter with the example settings; its last stdout line
    is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


SETTINGS_SUMMARY = """
import json
import demo_site.settings as s
print(json.dumps({
    "db": s.DATABASES["default"],
    "broker": s.CELERY_BROKER_URL,
    "results": s.CELERY_RESULT_BACKEND,
    "transport": s.CELERY_BROKER_TRANSPORT_OPTIONS,
    "container_celery": s.CONTAINER_CELERY,
    "image": s.DEMO_IMAGE,
}, default=str))
"""


def test_settings_default_to_sqlite_and_a_filesystem_broker(tmp_path: Path) -> None:
    summary = run_python(SETTINGS_SUMMARY, example_env(tmp_path))
    assert summary["db"]["ENGINE"] == "django.db.backends.sqlite3"
    assert summary["db"]["NAME"] == str(tmp_path / "db.sqlite3")
    assert summary["db"]["OPTIONS"]["timeout"] >= 20
    assert summary["broker"] == "filesystem://"
    assert summary["results"] == f"file://{tmp_path / 'broker' / 'results'}"
    for folder in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
        assert Path(summary["transport"][folder]).is_dir()
        assert Path(summary["transport"][folder]).is_relative_to(tmp_path)
    assert summary["container_celery"]["NETWORK_MODE"] == "none"
    assert set(summary["container_celery"]) <= set(conf.DEFAULTS)
    assert summary["image"] == "dcc-test-busybox:latest"


def test_settings_follow_the_service_urls(tmp_path: Path) -> None:
    env = example_env(
        tmp_path,
        DATABASE_URL="postgres://app:s%40cret@db.internal:5433/jobs",
        CELERY_BROKER_URL="redis://cache.internal:6379/2",
        DCC_DEMO_IMAGE="registry.internal/tools:1.0",
    )
    summary = run_python(SETTINGS_SUMMARY, env)
    assert summary["db"] == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "jobs",
        "USER": "app",
        "PASSWORD": "s@cret",
        "HOST": "db.internal",
        "PORT": "5433",
    }
    assert summary["broker"] == summary["results"] == "redis://cache.internal:6379/2"
    assert summary["transport"]["priority_steps"] == list(range(10))
    assert summary["image"] == "registry.internal/tools:1.0"


def test_relative_sqlite_url_is_under_the_data_folder(tmp_path: Path) -> None:
    env = example_env(tmp_path, DATABASE_URL="sqlite:///jobs.sqlite3")
    assert run_python(SETTINGS_SUMMARY, env)["db"]["NAME"] == str(tmp_path / "jobs.sqlite3")


def test_manage_py_check_passes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=EXAMPLE,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_the_example_projects_own_tests_pass(tmp_path: Path) -> None:
    # Written as a user of the app would, with the pytest plugin it ships; run the way a
    # user runs them (from the project folder, its pytest.ini, SQLite, no Docker).
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v"],
        cwd=EXAMPLE,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert re.search(r"\b4 passed\b", done.stdout), done.stdout[-2000:]


def test_celery_app_finds_the_tasks_and_the_schedule(tmp_path: Path) -> None:
    code = """
import json
from demo_site.celery import app
app.loader.import_default_modules()
print(json.dumps({
    "tasks": sorted(name for name in app.tasks if not name.startswith("celery.")),
    "schedule": {name: entry["task"] for name, entry in app.conf.beat_schedule.items()},
}))
"""
    found = run_python(code, example_env(tmp_path))
    assert {
        "django_container_celery.run_container_job",
        "django_container_celery.dispatch_ready_jobs",
        "reports.tasks.greet",
        "reports.tasks.sync_upstream",
    } <= set(found["tasks"])
    assert set(found["schedule"].values()) == {
        "django_container_celery.dispatch_ready_jobs",
        "django_container_celery.rescue_stale_jobs",
        "django_container_celery.cleanup_old_jobs",
    }


def test_admin_pages_render(tmp_path: Path) -> None:
    code = """
import json, django
django.setup()
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.test.utils import setup_test_environment

call_command("migrate", verbosity=0)
get_user_model().objects.create_superuser("admin", "", "pw")
setup_test_environment()
client = Client()
assert client.login(username="admin", password="pw")
pages = [
    "/",
    "/admin/",
    "/admin/django_container_celery/containerjob/",
    "/admin/django_container_celery/containerjob/dashboard/",
    "/admin/django_container_celery/executorhost/",
    "/admin/django_celery_beat/periodictask/",
]
print(json.dumps({page: client.get(page).status_code for page in pages}))
"""
    env = example_env(tmp_path, DJANGO_SETTINGS_MODULE="demo_site.settings")
    statuses = run_python(code, env)
    assert statuses.pop("/") == 302  # to the admin
    assert set(statuses.values()) == {200}, statuses


# -- the container tasks, in this process against the test database -------------------


@pytest.fixture(scope="module")
def example_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example")


@pytest.fixture(scope="module")
def example_tasks(example_data_dir: Path) -> Iterator[Any]:
    """reports.tasks imported once, under the example project's own settings values."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DCC_EXAMPLE_DATA_DIR", str(example_data_dir))
        patch.syspath_prepend(str(EXAMPLE))
        example = runpy.run_path(str(EXAMPLE / "demo_site" / "settings.py"))
        with override_settings(
            DEMO_IMAGE=example["DEMO_IMAGE"],
            JOB_STATE_DIR=example["JOB_STATE_DIR"],
            CONTAINER_CELERY=example["CONTAINER_CELERY"],
        ):
            # Imported once: each import registers its Celery tasks again.
            yield importlib.import_module("reports.tasks")


CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("greet", ("Ada Lovelace",)),
    ("build_report", (3,)),
    ("tidy_up", ()),
    ("sync_upstream", ("0123abcd",)),
    ("export_archive", (30,)),
    ("legacy_import", ()),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "args"), CALLS, ids=[name for name, _ in CALLS])
def test_container_tasks_build_valid_jobs(
    example_tasks: Any, name: str, args: tuple[Any, ...]
) -> None:
    task = getattr(example_tasks, name)
    job = task.build_job(args, {})
    job.full_clean()  # already done by build_job; repeated so a failure names the field
    assert job.status == ContainerJob.Status.PENDING
    assert job.name == f"reports.tasks.{name}"
    assert job.command_args, "every example task runs a command"
    assert shlex.split(job.command) == job.command_args


@pytest.mark.django_db
def test_example_tasks_carry_their_story(example_tasks: Any, example_data_dir: Path) -> None:
    greet = example_tasks.greet.build_job(("Ada",), {})
    assert greet.priority == 80 and greet.command_args == ["echo", "Hello, Ada!"]

    flaky = example_tasks.sync_upstream.build_job(("tok",), {})
    assert flaky.retry_exit_codes == [75] and flaky.max_retries == 2
    assert flaky.retry_strategy == "demo"
    assert flaky.bind_mounts == [f"{example_data_dir / 'var' / 'job-state'}:/state"]
    assert flaky.command_args[:2] == ["sh", "-c"] and "exit 75" in flaky.command_args[2]

    slow = example_tasks.export_archive.build_job((30,), {})
    assert slow.timeout_seconds < 30

    missing = example_tasks.legacy_import.build_job((), {})
    assert missing.docker_image == example_tasks.MISSING_IMAGE

    report = example_tasks.build_report.build_job((2,), {})
    assert report.environment["STORAGE_TOKEN"]  # masked in the admin, shown to the job


# -- the demo's display helpers ----------------------------------------------------------


@pytest.fixture
def demo_module(example_tasks: Any) -> Any:
    return importlib.import_module("reports.demo")


def test_summary_table_aligns_columns(demo_module: Any) -> None:
    table = demo_module.format_table(
        ("Job", "Priority", "Status"), [("greet('Ada')", "80", "completed"), ("x", "5", "failed")]
    )
    lines = table.splitlines()
    assert lines[0].startswith("Job") and set(lines[1]) <= {"-", " "}
    assert lines[2] == "greet('Ada')        80  completed"
    assert lines[3] == "x                    5  failed"


def test_progress_without_a_terminal_prints_count_lines(demo_module: Any) -> None:
    now = timezone.now()
    entry = demo_module.DemoJob("greet('Ada')", "shows", "completed", 1, lambda: None)
    jobs = [ContainerJob(status=status, priority=50) for status in ("queued", "running")]
    tracked = [demo_module.Tracked(entry, job) for job in jobs]
    out = io.StringIO()
    display = demo_module.ProgressDisplay(out, tracked, now - timedelta(seconds=3), tty=False)
    display.show(now, force=True)
    display.show(now)  # within the interval: nothing more
    assert out.getvalue() == (
        "[  3.0s] queued 1  launching 0  running 1  retrying 0  completed 0  failed 0\n"
    )
    assert "\x1b[" not in out.getvalue()


# -- the whole demo, against real Docker -------------------------------------------------


@pytest.mark.docker
@pytest.mark.celery
def test_demo_runs_end_to_end(tmp_path: Path, test_image: str) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "run_demo", "--no-superuser", "--timeout", "75"],
        cwd=EXAMPLE,
        env=example_env(tmp_path, DCC_DEMO_IMAGE=test_image),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=200,
    )
    output = done.stdout + done.stderr
    logs = "\n".join(
        path.read_text(errors="replace")[-3000:]
        for path in sorted((tmp_path / "var" / "logs").glob("*.log"))
    )
    assert done.returncode == 0, f"{output}\n--- worker and beat logs ---\n{logs}"
    assert "!!" not in output
    assert "queued lowest priority first, claimed by priority" in output
    for status in ("completed", "failed"):
        assert status in output
    # The only task errors are the jobs that were meant to fail.
    worker_log = (tmp_path / "var" / "logs" / "worker.log").read_text(errors="replace")
    unexpected = [
        line
        for line in worker_log.splitlines()
        if ("raised unexpected:" in line and "ContainerJobFailed" not in line)
        or "outside body" in line
        or "Unrecoverable error" in line
    ]
    assert not unexpected, "\n".join(unexpected)
    # It stopped what it started: the worker and beat it reported are gone.
    pids = re.search(r"worker pid (\d+), beat pid (\d+)", output)
    assert pids is not None, output
    for pid in map(int, pids.groups()):
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} still runs"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
