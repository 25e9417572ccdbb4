"""Settings of the example project.

Everything has a default that needs no server: SQLite for the database, kombu's filesystem
transport as the Celery broker and Celery's filesystem result backend, all in files under
example_project/. Environment variables switch to real services:

    DATABASE_URL           postgres://user:password@host:5432/name  (default: SQLite file)
    CELERY_BROKER_URL      redis://host:6379/0 or amqp://...         (default: filesystem://)
    CELERY_RESULT_BACKEND  a Celery result backend URL   (default: the Redis broker, or files)
    DOCKER_HOST            unix:///var/run/docker.sock or tcp://host:2376
    DCC_DEMO_IMAGE         image of the example jobs          (default: dcc-test-busybox:latest)
    DCC_EXAMPLE_DATA_DIR   folder for the SQLite file, broker folders, results and logs
                           (default: example_project/)
    DJANGO_SECRET_KEY, DJANGO_DEBUG, DJANGO_ALLOWED_HOSTS
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import django

BASE_DIR = Path(__file__).resolve().parent.parent
# Where the run-time files go (SQLite database, broker folders, results, logs); tests point
# it at a temporary folder so that they never touch a demo's files.
DATA_DIR = Path(os.environ.get("DCC_EXAMPLE_DATA_DIR") or BASE_DIR).resolve()

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "django_container_celery",
    "reports",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "demo_site.urls"
WSGI_APPLICATION = "demo_site.wsgi.application"
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


def database_from_url(url: str) -> dict[str, object]:
    """A DATABASES entry from ``sqlite:///relative/path``, ``sqlite:////absolute/path``
    or ``postgres://user:password@host:port/name``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        # One slash separates the URL from the path, as in SQLAlchemy's URLs.
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        name = DATA_DIR / path if path and not path.startswith("/") else Path(path)
        options: dict[str, object] = {
            # Worker processes and beat write at the same time; wait for the lock instead
            # of failing at once with "database is locked".
            "timeout": 20,
        }
        if django.VERSION >= (5, 1):
            # Take the write lock when a transaction begins: a transaction that reads and
            # then writes (the claim does) could otherwise fail without waiting.
            options["transaction_mode"] = "IMMEDIATE"
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(name), "OPTIONS": options}
    if parsed.scheme in ("postgres", "postgresql", "pgsql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parsed.path.lstrip("/")),
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname or "",
            "PORT": str(parsed.port or ""),
        }
    raise ValueError(f"DATABASE_URL scheme '{parsed.scheme}' is not supported (sqlite, postgres)")


DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
DATABASES = {"default": database_from_url(DATABASE_URL)}

# -- Celery ------------------------------------------------------------------------------

BROKER_DIR = DATA_DIR / "broker"
RUN_DIR = DATA_DIR / "var"

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
_broker_scheme = CELERY_BROKER_URL.split("://", 1)[0].lower()

if _broker_scheme == "filesystem":
    _folders = {
        "data_folder_in": BROKER_DIR / "messages",
        "data_folder_out": BROKER_DIR / "messages",
        "control_folder": BROKER_DIR / "control",
        "processed_folder": BROKER_DIR / "processed",
    }
    for _folder in _folders.values():
        _folder.mkdir(parents=True, exist_ok=True)
    # kombu's filesystem transport, writing messages atomically (see demo_site/broker.py).
    CELERY_BROKER_TRANSPORT = "demo_site.broker:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        **{key: str(value) for key, value in _folders.items()},
        "store_processed": False,
        # The transport polls its folder; the default second makes every hop slow.
        "polling_interval": 0.1,
    }
elif _broker_scheme in ("redis", "rediss"):
    # Ten real priority levels (Redis folds them into four by default), served by priority.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {}
    # RabbitMQ serves priorities only on queues declared with x-max-priority.
    CELERY_TASK_QUEUE_MAX_PRIORITY = 10
    CELERY_TASK_DEFAULT_PRIORITY = 5

if os.environ.get("CELERY_RESULT_BACKEND"):
    CELERY_RESULT_BACKEND = os.environ["CELERY_RESULT_BACKEND"]
elif _broker_scheme in ("redis", "rediss"):
    CELERY_RESULT_BACKEND = CELERY_BROKER_URL
else:
    # Results must be readable by every process (the caller of .get() is not the worker);
    # Celery's filesystem backend does that without a server.
    (BROKER_DIR / "results").mkdir(parents=True, exist_ok=True)
    CELERY_RESULT_BACKEND = f"file://{BROKER_DIR / 'results'}"

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 24 * 3600
# A run task holds its worker process for the seconds a launch takes; reserving more
# messages than processes would only delay jobs another worker could start.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(RUN_DIR / "celerybeat-schedule")
RUN_DIR.mkdir(parents=True, exist_ok=True)

# -- Container jobs ----------------------------------------------------------------------

DEMO_IMAGE = os.environ.get("DCC_DEMO_IMAGE", "dcc-test-busybox:latest")
# Host folder that example jobs may bind-mount (the flaky job keeps a marker file there).
JOB_STATE_DIR = RUN_DIR / "job-state"
JOB_STATE_DIR.mkdir(parents=True, exist_ok=True)
# The worker's process count. The first batch runs with a global job limit of the same
# size, so that the order in which slots are handed out (by priority) is easy to see; the
# second batch restarts the worker with a larger limit, to show more containers running
# at once than the worker has processes.
DEMO_WORKER_CONCURRENCY = 2
DEMO_MAX_CONCURRENT_JOBS = int(os.environ.get("DCC_DEMO_MAX_CONCURRENT", DEMO_WORKER_CONCURRENCY))

CONTAINER_CELERY = {
    "DEFAULT_DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
    # This machine's Docker has no bridge network; the example jobs need no network.
    "NETWORK_MODE": "none",
    "MAX_CONCURRENT_JOBS": DEMO_MAX_CONCURRENT_JOBS,
    # Short intervals so the demo reacts within a second; production can keep defaults.
    "DISPATCH_INTERVAL": 1,
    "POLL_INTERVAL": 0.5,
    "RECONCILE_INTERVAL": 2.0,
    "LEASE_SECONDS": 30,
    "ALLOWED_BIND_MOUNTS": [str(JOB_STATE_DIR)],
    "RETRY_STRATEGIES": {
        # Waits of 2 s then 4 s: long enough to see `retrying`, short enough for a demo.
        "demo": {"max_attempts": 3, "base_delay": 2.0, "max_delay": 8.0, "jitter": 0.0},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_container_celery": {"handlers": ["console"], "level": "INFO", "propagate": False}
    },
}
