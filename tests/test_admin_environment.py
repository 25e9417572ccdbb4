"""The admin's environment lines: any string value survives the form unchanged.

The format and its parser are checked on arbitrary values, then the real change view is
driven the way a browser does it: the textarea's text as the page showed it, with CRLF
line ends, sent back with only the name changed.
"""

from __future__ import annotations

import html
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_container_celery.admin.forms import (
    EnvironmentField,
    format_environment,
    parse_environment,
)
from django_container_celery.executors import reset_memory_executor
from django_container_celery.executors.memory import MemoryExecutor
from django_container_celery.masking import MASK, is_secret_key
from django_container_celery.models import ContainerJob

from .admin_support import job_form_data

APP = "django_container_celery"
_names = itertools.count()

KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]*", fullmatch=True)
# Every character but NUL, which PostgreSQL cannot store, and lone surrogates, which are
# not characters (no UTF-8 page or form carries one, and PostgreSQL refuses them too).
VALUES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
ENVIRONMENTS = st.dictionaries(KEYS, VALUES, max_size=8)

# Examples are not saved: the runs must leave nothing behind in the working tree.
PROPERTY = hypothesis_settings(max_examples=300, deadline=None, database=None)


def errors_of(text: str, stored: dict[str, str] | None = None) -> list[str]:
    field = EnvironmentField()
    field.stored = stored or {}
    with pytest.raises(ValidationError) as caught:
        field.clean(text)
    return [str(message) for message in caught.value.messages]


# -- the format ---------------------------------------------------------------------------


@PROPERTY
@given(ENVIRONMENTS)
def test_format_then_parse_gives_back_every_value(environment: dict[str, str]) -> None:
    text = format_environment(environment, masked=False)
    assert parse_environment(text) == environment
    # A browser sends the textarea back with CRLF line ends.
    assert parse_environment(text.replace("\n", "\r\n")) == environment


@PROPERTY
@given(ENVIRONMENTS)
def test_masked_text_sent_back_keeps_the_stored_values(environment: dict[str, str]) -> None:
    text = format_environment(environment, masked=True)
    field = EnvironmentField()
    field.stored = dict(environment)
    assert field.clean(text) == environment
    assert field.clean(text.replace("\n", "\r\n")) == environment
    assert not field.has_changed(environment, text)
    assert not field.has_changed(environment, text.replace("\n", "\r\n"))
    for key, value in parse_environment(text).items():
        assert value == (MASK if is_secret_key(key) else environment[key])


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("a\nb", 'V="a\\nb"'),
        ("a\r\nb\rc", 'V="a\\r\\nb\\rc"'),
        ("  x  ", 'V="  x  "'),
        (" lead", 'V=" lead"'),
        ("trail\t", 'V="trail\\t"'),
        ("a\tb", 'V="a\\tb"'),
        ("a=b", "V=a=b"),
        ("=", "V=="),
        ("", "V="),
        ('"', 'V="\\""'),
        ('"quoted"', 'V="\\"quoted\\""'),
        ('say "hi"', 'V=say "hi"'),
        ("it's", "V=it's"),
        ("\\", "V=\\"),
        ("C:\\dir\\n", "V=C:\\dir\\n"),
        ('\\"', 'V=\\"'),
        ("héllo ☃ 日本", "V=héllo ☃ 日本"),
        ("#value", "V=#value"),
        ("# not a comment", "V=# not a comment"),
        (MASK + "x", f"V={MASK}x"),
        ("line\u2028sep", 'V="line\\u2028sep"'),
        ("\x7f\x85", 'V="\\u007f\\u0085"'),
        ("\x1b[0m", 'V="\\u001b[0m"'),
    ],
)
def test_values_are_written_plainly_unless_quoting_is_needed(value: str, line: str) -> None:
    assert format_environment({"V": value}, masked=False) == line
    assert parse_environment(line) == {"V": value}


def test_parse_rules() -> None:
    text = (
        "# a comment\n"
        "   # an indented comment\n"
        "\n"
        "   \n"
        "  A = spaced \n"
        "B=#1\n"
        'C="json"  \n'
        'D="tab\there"\n'
        'E=x"y\n'
        'F="\\u00e9\\ud83d\\ude00"\n'
        "G=\n"
    )
    assert parse_environment(text) == {
        "A": " spaced ",
        "B": "#1",
        "C": "json",
        "D": "tab\there",
        "E": 'x"y',
        "F": "é😀",
        "G": "",
    }
    # Only CR and LF end a line: the other separators stay inside a plain value.
    assert parse_environment("A=x\x0cy\u2028z\x85") == {"A": "x\x0cy\u2028z\x85"}


def test_bad_quoted_values_name_their_line() -> None:
    messages = errors_of('OK=1\nA="open\nB="x" tail\nC="\\q"\nD="fine"')
    assert len(messages) == 3
    assert messages[0].startswith("Line 2: the value of 'A' starts with \" but is not one JSON")
    assert (
        messages[1].startswith("Line 3: the value of 'B'")
        and "Extra data: column 7" in (messages[1])
    )
    assert messages[2].startswith("Line 4: the value of 'C'")


def test_lone_surrogate_escape_is_refused() -> None:
    assert errors_of('A="\\ud800"') == [
        "Line 1: the value of 'A' holds a \\u escape of a lone surrogate (\\ud800 to "
        "\\udfff), which is not a character."
    ]


def test_nul_is_refused_with_its_line() -> None:
    nul = "Line {} holds a NUL character (\\x00 or \\u0000), which cannot be stored; remove it."
    text = 'A=1\nB=x\x00y\nC="\\u0000"\nD\x00=1\n\x00\n# comment \x00 ignored'
    assert errors_of(text) == [nul.format(2), nul.format(3), nul.format(4), nul.format(5)]


def test_existing_rules_are_kept() -> None:
    messages = errors_of(f"GOOD=1\nno equals\n9BAD=x\nGOOD=2\nNEW_TOKEN={MASK}")
    assert messages == [
        "Line 2: 'no equals' has no '='; write NAME=value.",
        "Line 3: '9BAD' is not a valid variable name; use letters, digits and _, not "
        "starting with a digit.",
        "Line 4: 'GOOD' is already set on line 1.",
    ]
    assert errors_of(f"NEW_TOKEN={MASK}") == [
        f"'NEW_TOKEN' has the mask {MASK} as its value but no stored value to keep; type "
        "the real value."
    ]
    field = EnvironmentField()
    field.stored = {"API_TOKEN": "  old\nsecret  "}
    assert field.clean(f'API_TOKEN={MASK}\nMODE=" fast"') == {
        "API_TOKEN": "  old\nsecret  ",
        "MODE": " fast",
    }


def test_has_changed() -> None:
    field = EnvironmentField()
    stored = {"A": "x", "B_TOKEN": "secret"}
    field.stored = stored
    assert not field.has_changed(stored, f"A=x\r\nB_TOKEN={MASK}")
    assert not field.has_changed(stored, f"B_TOKEN={MASK}\n\n# reordered\nA=x\n")
    assert field.has_changed(stored, f"A=x \nB_TOKEN={MASK}")
    assert field.has_changed(stored, "A=x\nB_TOKEN=other")
    assert field.has_changed(stored, "A=\x00")
    assert not field.has_changed(None, "")
    # A value that is not a string cannot be read back as itself; the text the form
    # showed still counts as no change, so a rename leaves it alone.
    legacy = {"WORKERS": 4}
    assert not field.has_changed(legacy, format_environment(legacy))


def test_the_guide_example_reads_as_described() -> None:
    guide = Path(__file__).resolve().parent.parent / "docs" / "guides" / "monitoring.md"
    section = guide.read_text().split("the environment is edited as", 1)[1]
    match = re.search(r"```text\n(.*?)\n *```", section, re.DOTALL)
    assert match is not None
    example = "\n".join(line.strip() for line in match.group(1).splitlines())
    field = EnvironmentField()
    field.stored = {"API_TOKEN": "t0ken"}
    environment = {
        "URL": "postgres://db/app?sslmode=require",
        "GREETING": "hello\n  world",
        "PADDED": "  x  ",
        "API_TOKEN": "t0ken",
    }
    assert field.clean(example) == environment
    assert format_environment(environment) == example


# -- through the admin's change view ----------------------------------------------------------

ENVIRONMENT = {"MULTI": "a\nb", "PAD": "  x  ", "EQ": "a=b", "EMPTY": "", "API_TOKEN": "s3cr3t"}
TEXTAREA_RE = re.compile(r'<textarea name="environment"[^>]*>(.*?)</textarea>', re.DOTALL)


@pytest.fixture(autouse=True)
def memory_docker(settings: Any) -> MemoryExecutor:
    settings.CONTAINER_CELERY = {**settings.CONTAINER_CELERY, "EXECUTOR": "memory"}
    return reset_memory_executor()


def change_url(job: ContainerJob) -> str:
    return reverse(f"admin:{APP}_containerjob_change", args=[job.pk])


def make_job(**fields: Any) -> ContainerJob:
    fields.setdefault("docker_image", "busybox:latest")
    fields.setdefault("command", "echo hi")
    fields.setdefault("name", f"env-job-{next(_names)}")
    return ContainerJob.objects.create(**fields)


def stored_json(job: ContainerJob) -> str:
    """The environment column as PostgreSQL holds it."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT environment::text FROM {ContainerJob._meta.db_table} WHERE id = %s",
            [job.pk],
        )
        row = cursor.fetchone()
    assert row is not None
    return str(row[0])


def shown_environment(client: Client, job: ContainerJob) -> str:
    """The textarea's text as a browser submits it."""
    page = client.get(change_url(job)).content.decode()
    match = TEXTAREA_RE.search(page)
    assert match is not None
    text = html.unescape(match.group(1))
    # HTML drops one line break right after <textarea>; browsers send lines with CRLF.
    return text.removeprefix("\n").replace("\n", "\r\n")


@pytest.mark.django_db
def test_rename_leaves_the_environment_as_stored(admin_client: Client) -> None:
    job = make_job(environment=ENVIRONMENT)
    before = stored_json(job)
    text = shown_environment(admin_client, job)
    assert "s3cr3t" not in text
    # PostgreSQL's jsonb keeps its own key order, so the lines come in that order.
    assert sorted(text.split("\r\n")) == sorted(
        ['MULTI="a\\nb"', 'PAD="  x  "', "EQ=a=b", "EMPTY=", f"API_TOKEN={MASK}"]
    )

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.post(change_url(job), job_form_data(job, text, name="renamed"))
    assert response.status_code == 302, response.content.decode()[:3000]
    updates = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("UPDATE")]
    job_updates = [sql for sql in updates if ContainerJob._meta.db_table in sql]
    assert len(job_updates) == 1
    assert '"environment"' not in job_updates[0].split("WHERE")[0]

    saved = ContainerJob.objects.get(pk=job.pk)
    assert saved.name == "renamed"
    assert saved.environment == ENVIRONMENT
    assert stored_json(job) == before


@pytest.mark.django_db
def test_editing_one_variable_keeps_the_others(admin_client: Client) -> None:
    job = make_job(environment=ENVIRONMENT)
    text = shown_environment(admin_client, job).replace("EMPTY=", 'EMPTY=" new\\tvalue "')
    response = admin_client.post(change_url(job), job_form_data(job, text))
    assert response.status_code == 302, response.content.decode()[:3000]
    assert ContainerJob.objects.get(pk=job.pk).environment == {
        **ENVIRONMENT,
        "EMPTY": " new\tvalue ",
    }


@pytest.mark.django_db
@pytest.mark.parametrize("nul", ["\x00", "\\u0000"], ids=["raw", "escaped"])
def test_nul_is_a_form_error_not_a_server_error(admin_client: Client, nul: str) -> None:
    job = make_job(environment=ENVIRONMENT)
    before = stored_json(job)
    text = shown_environment(admin_client, job) + f'\r\nBAD="x{nul}y"'
    response = admin_client.post(change_url(job), job_form_data(job, text, name="renamed"))
    assert response.status_code == 200
    content = response.content.decode()
    assert "Line 6 holds a NUL character" in content
    saved = ContainerJob.objects.get(pk=job.pk)
    assert saved.name == job.name
    assert stored_json(job) == before
