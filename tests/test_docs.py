"""The documentation under docs/ is tested: its code runs and its reference tables match
the code.

Code blocks. Every ```python block in docs/ carries a marker in an HTML comment on the
line just before its opening fence (invisible once the Markdown is rendered):

    <!-- test: run -->                 executed, with the in-memory executor
    <!-- test: run docker -->          executed against the real Docker daemon; such blocks
                                       use the image dcc-test-busybox:latest
    <!-- test: run celery -->          executed with a Celery worker running in this
                                       process (kombu's in-memory broker), so .delay()
                                       and result.get() work; combine with "docker"
    <!-- test: pytest -->              a test module: written to a folder of its own and run
                                       by pytest in a subprocess, with the app's pytest
                                       plugin and its own test database; every test in it
                                       must pass ("pytest docker": it needs the daemon)
    <!-- test: skip (reason) -->       not executed (settings excerpts, a second Celery
                                       app, code for another package)

The runnable blocks of one page run in order in one namespace, like a reader typing them
into `manage.py shell`, against the test database. Every page uses a private in-memory
broker, so nothing reaches the shared Redis.

Reference tables checked against the code: every key and default of the settings
reference (conf.DEFAULTS), the transition table (states.VALID_TRANSITIONS), the retry
strategies table (retry.RETRY_STRATEGIES), and every name and signature in the API
reference. Relative links and their anchors must resolve, and index.md must link every
page.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connections
from django.test import override_settings

from django_container_celery import conf, states
from django_container_celery.executors import clear_executor_cache, reset_memory_executor
from django_container_celery.retry import RETRY_STRATEGIES

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

FENCE_RE = re.compile(r"^```(\S*)\s*$")
MARKER_RE = re.compile(r"^<!--\s*test:\s*(?P<words>.*?)\s*-->\s*$")
RUN_OPTIONS = {"docker", "celery"}


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the first code line, 1-based
    language: str
    marker: str | None  # "run ..." or "skip ...", None when there is no marker
    code: str

    @property
    def runs(self) -> bool:
        return self.marker is not None and self.marker.split()[0] == "run"

    @property
    def options(self) -> set[str]:
        return set(self.marker.split()[1:]) if self.runs and self.marker else set()

    def where(self) -> str:
        return f"{self.page.relative_to(DOCS.parent)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE_RE.match(lines[index])
        if not opening:
            index += 1
            continue
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER_RE.match(previous.strip())
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        found.append(
            Block(
                page=page,
                line=index + 2,
                language=opening.group(1),
                marker=marker.group("words") if marker else None,
                code="\n".join(lines[index + 1 : end]) + "\n",
            )
        )
        index = end + 1
    return found


def prose_of(page: Path) -> str:
    """The page without its fenced code blocks."""
    kept, inside = [], False
    for line in page.read_text().splitlines():
        if FENCE_RE.match(line) or (inside and line.strip() == "```"):
            inside = not inside
            continue
        if not inside:
            kept.append(line)
    return "\n".join(kept)


def page_id(page: Path) -> str:
    return str(page.relative_to(DOCS).with_suffix(""))


RUNNABLE_PAGES = [page for page in PAGES if any(block.runs for block in blocks_of(page))]


def _page_param(page: Path) -> Any:
    options = set().union(*(block.options for block in blocks_of(page)))
    marks = [getattr(pytest.mark, option) for option in sorted(options)]
    return pytest.param(page, id=page_id(page), marks=marks)


# -- every python block is marked -------------------------------------------------------


def test_docs_exist() -> None:
    assert (DOCS / "index.md").exists()
    assert len(PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_block_is_marked(page: Path) -> None:
    problems = []
    for block in blocks_of(page):
        if block.language not in ("python", "py"):
            if block.marker is not None and block.runs:
                problems.append(f"{block.where()}: only python blocks can run")
            continue
        if block.marker is None:
            problems.append(f"{block.where()}: python block without a <!-- test: ... --> marker")
        elif block.marker.split()[0] not in ("run", "skip", "pytest"):
            problems.append(f"{block.where()}: marker must start with run, pytest or skip")
        elif block.runs and not block.options <= RUN_OPTIONS:
            problems.append(f"{block.where()}: unknown options {block.options - RUN_OPTIONS}")
        elif block.marker.split()[0] == "pytest" and not set(block.marker.split()[1:]) <= {
            "docker"
        }:
            problems.append(f"{block.where()}: a pytest block takes only the option docker")
        else:
            compile(block.code, block.where(), "exec")  # skipped blocks must parse too
    assert not problems, "\n".join(problems)


# -- running the blocks ------------------------------------------------------------------


def _reset_celery_connections(app: Any) -> None:
    # Producer pools and the result backend are cached per app; rebuild them for new URLs.
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


@contextlib.contextmanager
def private_broker() -> Iterator[Any]:
    """Point the current Celery app at kombu's in-memory broker and result store."""
    from celery import current_app

    app = current_app._get_current_object()
    saved = (app.conf.broker_url, app.conf.result_backend)
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"
    _reset_celery_connections(app)
    try:
        yield app
    finally:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            app.control.purge(connection=conn)
        app.conf.broker_url, app.conf.result_backend = saved
        _reset_celery_connections(app)


class _LateTaskStrategies(dict[str, Any]):
    """The worker's table of known tasks, looked up again for a task it has not seen:
    a page defines its container tasks after the worker started."""

    def __init__(self, consumer: Any) -> None:
        super().__init__()
        self.consumer = consumer

    def __missing__(self, name: str) -> Any:
        self.consumer.update_strategies()
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        raise KeyError(name)


def _late_task_consumer() -> type:
    from celery.worker.consumer import Consumer

    class LateTaskConsumer(Consumer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.strategies = _LateTaskStrategies(self)

    return LateTaskConsumer


@contextlib.contextmanager
def in_process_worker(app: Any) -> Iterator[None]:
    from celery.contrib.testing.worker import start_worker

    from django_container_celery.watching import Watcher

    # One pool thread: tasks run one at a time in the worker's thread, whose database
    # connection Celery's Django fixup closes after every task. Celery's test worker sends
    # no worker_ready signal, so the watcher a real worker starts is started here.
    watcher = Watcher("docs-watcher", reconcile_interval=0.5)
    watcher.start()
    try:
        with start_worker(
            app,
            pool="solo",
            concurrency=1,
            perform_ping_check=False,
            consumer_cls=_late_task_consumer(),
        ):
            yield
    finally:
        watcher.stop()


def executor_settings(block: Block) -> Any:
    if "docker" in block.options:
        return contextlib.nullcontext()
    return override_settings(CONTAINER_CELERY={**settings.CONTAINER_CELERY, "EXECUTOR": "memory"})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("page", [_page_param(page) for page in RUNNABLE_PAGES])
def test_page_code_runs(page: Path, request: pytest.FixtureRequest) -> None:
    blocks = [block for block in blocks_of(page) if block.runs]
    options = set().union(*(block.options for block in blocks))
    if "docker" in options:
        request.getfixturevalue("test_image")
    reset_memory_executor()
    clear_executor_cache()
    namespace: dict[str, Any] = {"__name__": f"docs_{page_id(page).replace('/', '_')}"}
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(private_broker())
        if "celery" in options:
            stack.enter_context(in_process_worker(app))
        for block in blocks:
            code = compile(block.code, block.where(), "exec")
            with executor_settings(block):
                exec(code, namespace)
    clear_executor_cache()
    connections.close_all()


# -- test modules shown in the docs -----------------------------------------------------

PYTEST_BLOCKS = [
    block
    for page in PAGES
    for block in blocks_of(page)
    if (block.marker or "").startswith("pytest")
]


def _pytest_param(block: Block) -> Any:
    marks = [pytest.mark.docker] if "docker" in (block.marker or "").split() else []
    return pytest.param(block, id=block.where(), marks=marks)


@pytest.mark.parametrize("block", [_pytest_param(b) for b in PYTEST_BLOCKS])
def test_pytest_block_passes(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import os
    import subprocess
    import sys

    if "docker" in (block.marker or "").split():
        request.getfixturevalue("test_image")  # fails clearly when the daemon is missing

    module = tmp_path / f"test_doc_{block.line}.py"
    module.write_text(block.code)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(root),
        DJANGO_SETTINGS_MODULE="tests.settings",
        # Its own test database: the suite's may be in use by this very run.
        DCC_TEST_DATABASE=f"test_dcc_doc_{os.getpid()}",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.celery_app",
            "-p",
            "django_container_celery.testing",
            str(module),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout[-2000:])
    assert done.returncode == 0, f"{block.where()}:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    assert re.search(r"\b\d+ passed\b", done.stdout) and "skipped" not in done.stdout


# -- reference tables --------------------------------------------------------------------


def _section(page: Path, heading: str) -> str:
    """The prose under ``heading`` up to the next heading of the same or a higher level."""
    text = prose_of(page)
    level = heading.split()[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)
    return rest[: stop.start()] if stop else rest


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line.replace("|", "").strip()) <= {"-", " "}:
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append(cells)
    return rows[1:]  # without the header row


def _codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_settings_reference_lists_every_key_with_its_default() -> None:
    page = DOCS / "reference" / "settings.md"
    text = prose_of(page)
    documented = re.findall(r"^### `([A-Z_]+)`\n\nDefault: `([^`]*)`", text, re.MULTILINE)
    keys = [key for key, _default in documented]
    assert len(keys) == len(set(keys)), "a setting is documented twice"
    assert set(keys) == set(conf.DEFAULTS), (
        f"missing: {sorted(set(conf.DEFAULTS) - set(keys))}, "
        f"unknown: {sorted(set(keys) - set(conf.DEFAULTS))}"
    )
    headings = re.findall(r"^### `([^`]+)`", text, re.MULTILINE)
    assert sorted(headings) == sorted(keys), "every setting heading needs a Default: line"
    for key, default in documented:
        assert ast.literal_eval(default) == conf.DEFAULTS[key], key


def test_transition_table_matches_the_code() -> None:
    section = _section(DOCS / "concepts.md", "### The transition table")
    documented = {}
    for cells in _table_rows(section):
        (source,) = _codes(cells[0])
        documented[source] = set(_codes(cells[1]))
    assert documented == {old: set(new) for old, new in states.VALID_TRANSITIONS.items()}


def test_retry_strategies_table_matches_the_code() -> None:
    section = _section(DOCS / "guides" / "retries.md", "## Back-off strategies")
    documented = {}
    for cells in _table_rows(section):
        (name,) = _codes(cells[0])
        documented[name] = tuple(float(value) for value in cells[1:6])
    assert documented == {
        name: (
            strategy.max_attempts,
            strategy.base_delay,
            strategy.max_delay,
            strategy.backoff_factor,
            strategy.jitter,
        )
        for name, strategy in RETRY_STRATEGIES.items()
    }


def test_monitoring_lists_the_task_states_the_run_task_reports() -> None:
    import django_container_celery.tasks as tasks_module

    reported = set(
        re.findall(r'update_state\(\s*state="([A-Z_]+)"', inspect.getsource(tasks_module))
    )
    assert reported, "the run task reports custom states"
    section = _section(DOCS / "guides" / "monitoring.md", "## Flower")
    documented = {code for cells in _table_rows(section) for code in _codes(cells[0])}
    assert reported <= documented, f"undocumented task states: {sorted(reported - documented)}"


# -- API reference -----------------------------------------------------------------------


def plain_signature(obj: Any) -> str:
    """The signature as the API reference writes it: no annotations, no self, callables
    as defaults shown as ``...``."""
    if hasattr(obj, "run") and hasattr(obj, "apply_async") and not inspect.isclass(obj):
        obj = obj.run  # a Celery task: document the function's own parameters
    signature = inspect.signature(obj)
    params = []
    for param in signature.parameters.values():
        if param.name in ("self", "cls"):
            continue
        default = param.default
        if default is not inspect.Parameter.empty and callable(default):
            default = Ellipsis
        params.append(param.replace(annotation=inspect.Parameter.empty, default=default))
    plain = signature.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return str(plain).replace("=Ellipsis", "=...")


def api_entries() -> list[tuple[str, str, str | None]]:
    """(module, dotted name, documented signature or None) for each API heading."""
    entries = []
    module = None
    for line in prose_of(DOCS / "reference" / "api.md").splitlines():
        heading = re.match(r"^(#{2,4}) `([^`]+)`\s*$", line)
        if not heading:
            if line.startswith("## "):
                module = None  # a section that documents no module
            continue
        level, text = heading.groups()
        if level == "##":
            module = text
            continue
        assert module is not None, f"heading {text!r} outside a module section"
        name, _paren, rest = text.partition("(")
        entries.append((module, name, f"({rest}" if rest else None))
    return entries


def test_api_reference_matches_the_code() -> None:
    import importlib

    entries = api_entries()
    assert len(entries) > 60
    problems = []
    for module_name, name, documented in entries:
        obj: Any = importlib.import_module(module_name)
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            problems.append(f"{module_name}.{name} does not exist")
            continue
        if documented is not None and plain_signature(obj) != documented:
            problems.append(
                f"{module_name}.{name}: documented {documented}, code {plain_signature(obj)}"
            )
    assert not problems, "\n".join(problems)


# -- links -------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    return {slug(match) for match in re.findall(r"^#+ (.+)$", prose_of(page), re.MULTILINE)}


LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page: Path) -> None:
    problems = []
    for target in LINK_RE.findall(prose_of(page)):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path_part, _hash, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    assert not problems, "\n".join(problems)


def test_index_links_every_page() -> None:
    index = DOCS / "index.md"
    linked = {
        (DOCS / target.partition("#")[0]).resolve()
        for target in LINK_RE.findall(prose_of(index))
        if not re.match(r"^[a-z]+://", target)
    }
    orphans = [page_id(page) for page in PAGES if page != index and page not in linked]
    assert not orphans, f"pages not linked from index.md: {orphans}"
