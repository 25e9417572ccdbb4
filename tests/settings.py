"""Settings for the test suite: real PostgreSQL, Redis and Docker, named by environment.

DATABASE_URL (default postgres://dcc:dcc@127.0.0.1:5432/dcc), CELERY_BROKER_URL (default
redis://127.0.0.1:6379/0) and DOCKER_HOST (default unix:///var/run/docker.sock) are the
same variables ``scripts/services.sh`` starts services for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]


def database_from_url(url: str) -> dict[str, object]:
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        # sqlite:///relative/path or sqlite:////absolute/path
        name = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name or ":memory:"}
    if parsed.scheme not in ("postgres", "postgresql", "pgsql"):
        raise ValueError(f"DATABASE_URL scheme '{parsed.scheme}' is not supported")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parsed.path.lstrip("/"),
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
    }


DATABASES = {
    "default": database_from_url(
        os.environ.get("DATABASE_URL", "postgres://dcc:dcc@127.0.0.1:5432/dcc")
    )
}
# Lets two test runs on one server use separate test databases.
if os.environ.get("DCC_TEST_DATABASE"):
    DATABASES["default"]["TEST"] = {"NAME": os.environ["DCC_TEST_DATABASE"]}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "django_container_celery",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", CELERY_BROKER_URL)

DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
TEST_IMAGE = os.environ.get("DCC_TEST_IMAGE", "dcc-test-busybox:latest")

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Ten real priority levels on Redis (its default folds them into four).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "priority_steps": list(range(10)),
    "queue_order_strategy": "priority",
}
CELERY_RESULT_EXPIRES = 3600
# Fail fast when Redis is down: delay() then leaves the job queued for dispatch instead of
# blocking the caller while the result backend retries (its default is about 20 s).
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {
    "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
}

CONTAINER_CELERY = {
    "DEFAULT_DOCKER_HOST": DOCKER_HOST,
    "NETWORK_MODE": "none",
    "LEASE_SECONDS": 30,
    "POLL_INTERVAL": 0.2,
    "DISPATCH_INTERVAL": 1,
    "RECONCILE_INTERVAL": 1.0,
    "RETRY_STRATEGIES": {
        "fast": {"max_attempts": 5, "base_delay": 1.0, "max_delay": 2.0, "jitter": 0.0}
    },
}
# Worker processes started by the tests get their own overrides through the environment.
CONTAINER_CELERY.update(json.loads(os.environ.get("DCC_SETTINGS_JSON", "{}")))
