#!/usr/bin/env bash
# The demo behind `make demo`: makes sure Docker answers and the job image exists, then
# runs the example project's `run_demo` command, which starts a Celery worker and beat,
# runs a mixed batch of container jobs, then more containers than worker processes, then a
# lane with a limit that it pauses and resumes while its jobs wait, prints a summary of each
# and stops what it started.
#
# Environment (defaults):
#   PYTHON             .venv/bin/python (with the package installed: pip install -e '.[dev]')
#   DATABASE_URL       unset: SQLite file example_project/db.sqlite3; postgres://... also works
#   CELERY_BROKER_URL  unset: kombu's filesystem transport under example_project/broker/;
#                      redis://... or amqp://... also work
#   DOCKER_HOST        unix:///var/run/docker.sock
#   DCC_DEMO_IMAGE     dcc-test-busybox:latest (built locally from busybox-static, no registry)
#   DCC_DEMO_PASSWORD  admin (password of the admin user the demo creates)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-.venv/bin/python}"
DEFAULT_IMAGE=dcc-test-busybox:latest
export DCC_DEMO_IMAGE="${DCC_DEMO_IMAGE:-$DEFAULT_IMAGE}"

if ! [ -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
    echo "demo: $PYTHON not found; run 'make demo' (it creates .venv) or set PYTHON" >&2
    exit 1
fi

# Services: Docker always; PostgreSQL and Redis only when the URLs name them.
case "${DATABASE_URL:-}" in
    postgres://* | postgresql://* | pgsql://*) bash scripts/services.sh postgres ;;
esac
case "${CELERY_BROKER_URL:-}" in
    redis://*) bash scripts/services.sh redis ;;
esac
bash scripts/services.sh docker
if [ "$DCC_DEMO_IMAGE" = "$DEFAULT_IMAGE" ]; then
    DCC_TEST_IMAGE="$DCC_DEMO_IMAGE" bash scripts/services.sh image
fi

# The example project runs from the checkout; the repository root on the path lets it
# find the app even where the package is not installed.
export PYTHONPATH="$ROOT/example_project:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" example_project/manage.py run_demo "$@"
