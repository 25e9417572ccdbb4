#!/usr/bin/env bash
# Make sure the real services the test suite needs are answering, installing
# (Debian packages) and starting them when needed.  No systemd is assumed.
#
#   bash scripts/services.sh all           postgres, redis, docker, image, docker2, browser,
#                                          faketime (in order)
#   bash scripts/services.sh postgres | redis | docker | image | docker2 | browser | faketime
#   bash scripts/services.sh stop-docker2  stops the second daemon (its containers run on)
#   bash scripts/services.sh status        one line per service; non-zero if any is down
#
# Environment (defaults):
#   DATABASE_URL      postgres://dcc:dcc@127.0.0.1:5432/dcc   (sqlite... skips postgres)
#   CELERY_BROKER_URL redis://127.0.0.1:6379/0
#   DOCKER_HOST       unix:///var/run/docker.sock
#   DCC_DOCKER2_HOST  unix:///var/run/dcc-docker2.sock       (the second daemon)
#   DCC_TEST_IMAGE    dcc-test-busybox:latest
#   DCC_SERVICES_LOCK_WAIT  600   seconds to wait for another run of this script
#                                 (/tmp/dcc-services.lock) before failing
#
# Docker notes:
#   * Only Debian's client /usr/bin/docker is used (a different build may sit at
#     /usr/local/bin/docker).  Without it, the daemon's socket is driven with
#     `curl --unix-socket`.
#   * dockerd is started with --bridge=none (no iptables here), so no "bridge"
#     network exists (`docker network ls` shows only host and none).  Checked on
#     Debian 12 with docker.io 20.10.24: `docker run` WITHOUT `--network none`
#     still works (exit 0); the container keeps NetworkMode "default", is not
#     attached to anything and sees only loopback, i.e. it behaves like "none".
#     Even `--network bridge` is accepted.  The jobs should nevertheless pass
#     network mode "none" explicitly (API: HostConfig.NetworkMode = "none"):
#     it states the intent and does not depend on this daemon's leniency
#     (other dockerd builds may refuse the missing bridge network).
#   * The test image is built without any registry: a static busybox in an
#     otherwise empty root filesystem, imported with `docker import`.
#   * docker2 is a second dockerd beside the first, for the tests where hosts
#     matter (one host failing while another serves): its own socket
#     (DCC_DOCKER2_HOST), data root /var/lib/dcc-docker2, exec root
#     /var/run/dcc-docker2, pid file /var/run/dcc-docker2.pid and containerd
#     namespaces (dcc-docker2, dcc-docker2-plugins), the first daemon's flags plus
#     --live-restore, and its own copy of the test image (images are per daemon).
#   * containerd: dockerd 20.10 starts a containerd of its own, under its exec
#     root, only when nothing exists at /run/containerd/containerd.sock; when a
#     system containerd listens there, both daemons use it, and their containerd
#     namespaces keep their containers apart (the first daemon's are the default
#     moby and plugins.moby).
#   * Pid files: a daemon's pid file counts only while the process it names is the
#     dockerd started with that very pid file, as its command line in
#     /proc/PID/cmdline shows (the first daemon: no --pidfile, or this one). A file
#     naming anything else (PIDs are reused, by another dockerd too) is stale: it is
#     never signalled, and the file is removed before a start (dockerd 20.10
#     refuses to start while its pid file names any live process).
#     `stop-docker2` signals only the second daemon so found, and waits for it to
#     exit.
#     Checked on Debian 12 with docker.io 20.10.24, no system containerd: each
#     daemon starts its own containerd under its exec root, both run
#     `--network none` containers at the same time, and a container started on
#     docker2 runs on through `stop-docker2` and `docker2` (started once, exit code
#     kept).
#
# Logs: /tmp/dcc-dockerd.log, /tmp/dcc-dockerd2.log (both appended to at each start),
#       /tmp/dcc-redis-PORT.log, /tmp/dcc-apt.log,
#       /var/log/postgresql/postgresql-VERSION-CLUSTER.log
set -euo pipefail

DATABASE_URL="${DATABASE_URL:-postgres://dcc:dcc@127.0.0.1:5432/dcc}"
CELERY_BROKER_URL="${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}"
DOCKER_HOST="${DOCKER_HOST:-unix:///var/run/docker.sock}"
DCC_DOCKER2_HOST="${DCC_DOCKER2_HOST:-unix:///var/run/dcc-docker2.sock}"
DCC_TEST_IMAGE="${DCC_TEST_IMAGE:-dcc-test-busybox:latest}"
export DOCKER_HOST

# Debian's docker client; overridable only to exercise the curl fallback.
DOCKER_CLI="${DCC_DOCKER_CLI:-/usr/bin/docker}"
DOCKERD_LOG=/tmp/dcc-dockerd.log
# Both daemons: no iptables here, hence no bridge network either.
DOCKERD_FLAGS=(--iptables=false --ip6tables=false --bridge=none --storage-driver=vfs)
DOCKERD2_LOG=/tmp/dcc-dockerd2.log
DOCKERD2_PIDFILE=/var/run/dcc-docker2.pid
DOCKERD2_DATA_ROOT=/var/lib/dcc-docker2
DOCKERD2_EXEC_ROOT=/var/run/dcc-docker2
APT_LOG=/tmp/dcc-apt.log
LOCK_FILE=/tmp/dcc-services.lock
LOCK_WAIT="${DCC_SERVICES_LOCK_WAIT:-600}"
# Bump when the root filesystem below changes: images built by an older
# version of this script are rebuilt.
IMAGE_RECIPE_VERSION=1
IMAGE_LABEL=dcc.test-image.recipe

log() { printf 'services: %s\n' "$*"; }

# fail SERVICE MESSAGE [LOGFILE]
fail() {
    local service="$1" msg="$2" logfile="${3:-}"
    {
        printf 'services: FAILED %s: %s\n' "$service" "$msg"
        if [ -n "$logfile" ]; then
            if [ -r "$logfile" ]; then
                printf 'services: last lines of %s:\n' "$logfile"
                tail -n 25 "$logfile" | sed 's/^/services:   | /'
            else
                printf 'services: (log file %s is missing or unreadable)\n' "$logfile"
            fi
        fi
    } >&2
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

is_local_host() {
    case "$1" in
        127.0.0.1 | localhost | ::1 | '') return 0 ;;
        *) return 1 ;;
    esac
}

# parse_url URL -> array URL_PARTS: scheme user password host port path
parse_url() {
    local url="$1"
    URL_PARTS=()
    mapfile -d '' -t URL_PARTS < <(python3 -c '
import sys, urllib.parse as up
r = up.urlsplit(sys.argv[1])
try:
    port = r.port
except ValueError:
    port = None
parts = [r.scheme, up.unquote(r.username or ""), up.unquote(r.password or ""),
         up.unquote(r.hostname or ""), str(port or ""), up.unquote(r.path.lstrip("/"))]
sys.stdout.write("\0".join(parts) + "\0")
' "$url") || true
    [ "${#URL_PARTS[@]}" -eq 6 ]
}

# ---------------------------------------------------------------- apt ------
APT_UPDATED=0
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# apt_install SERVICE PACKAGE...  (installs only the missing ones)
apt_install() {
    local service="$1"; shift
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    is_root || fail "$service" "package(s) ${missing[*]} missing and not running as root; install them with apt-get"
    command -v apt-get >/dev/null || fail "$service" "package(s) ${missing[*]} missing and apt-get is not available"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "$service: apt-get update"
        apt-get update >>"$APT_LOG" 2>&1 </dev/null 9>&- || fail "$service" "apt-get update failed" "$APT_LOG"
        APT_UPDATED=1
    fi
    log "$service: apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=300 "${missing[@]}" \
        >>"$APT_LOG" 2>&1 </dev/null 9>&- || fail "$service" "apt-get install ${missing[*]} failed" "$APT_LOG"
}

# ----------------------------------------------------------- postgres ------
PG_SCHEME='' PG_USER='' PG_PASSWORD='' PG_HOST='' PG_PORT='' PG_DB=''

pg_parse() {
    parse_url "$DATABASE_URL" || fail postgres "cannot parse DATABASE_URL"
    PG_SCHEME="${URL_PARTS[0]}" PG_USER="${URL_PARTS[1]}" PG_PASSWORD="${URL_PARTS[2]}"
    PG_HOST="${URL_PARTS[3]:-127.0.0.1}" PG_PORT="${URL_PARTS[4]:-5432}" PG_DB="${URL_PARTS[5]}"
    case "$PG_SCHEME" in
        postgres | postgresql | pgsql | postgis) ;;
        *) fail postgres "unsupported DATABASE_URL scheme '$PG_SCHEME'" ;;
    esac
    [ -n "$PG_USER" ] || fail postgres "DATABASE_URL has no user name"
    [ -n "$PG_DB" ] || fail postgres "DATABASE_URL has no database name"
}

pg_is_sqlite() { case "$DATABASE_URL" in sqlite*) return 0 ;; *) return 1 ;; esac; }

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1; }

# Can the application role log into its database, and may it create databases?
pg_app_ok() {
    local out
    out="$(PGHOST="$PG_HOST" PGPORT="$PG_PORT" PGUSER="$PG_USER" PGPASSWORD="$PG_PASSWORD" \
        PGDATABASE="$PG_DB" PGCONNECT_TIMEOUT=3 PGSSLMODE=prefer \
        psql -X -w -tAq -c 'SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user' \
        2>/dev/null)" || return 1
    [ "$out" = t ]
}

# Finds the local cluster listening on PG_PORT; sets PG_VER PG_CLUSTER PG_LOG.
PG_VER='' PG_CLUSTER='' PG_LOG=''
pg_find_cluster() {
    local ver name port _status _owner _dir logf
    PG_VER='' PG_CLUSTER='' PG_LOG=''
    command -v pg_lsclusters >/dev/null || return 1
    while read -r ver name port _status _owner _dir logf; do
        if [ "$port" = "$PG_PORT" ]; then
            PG_VER="$ver" PG_CLUSTER="$name"
            PG_LOG="${logf:-/var/log/postgresql/postgresql-$ver-$name.log}"
            return 0
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null)
    return 1
}

pg_start_local() {
    is_root || fail postgres "nothing answers on $PG_HOST:$PG_PORT and not running as root (cannot install/start postgresql)"
    apt_install postgresql postgresql
    if ! pg_find_cluster; then
        local ver name=main
        ver="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null \
            | awk -F/ '{print $5}' | sort -V | tail -n 1)"
        [ -n "$ver" ] || fail postgres "no postgres server binary under /usr/lib/postgresql"
        if pg_lsclusters --no-header 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" {f=1} END {exit !f}'; then
            name="dcc$PG_PORT"   # "main" exists on another port
        fi
        log "postgres: creating cluster $ver/$name on port $PG_PORT"
        pg_createcluster --port "$PG_PORT" --locale C.UTF-8 --encoding UTF8 "$ver" "$name" \
            >/tmp/dcc-pg-createcluster.log 2>&1 \
            || fail postgres "pg_createcluster $ver $name failed" /tmp/dcc-pg-createcluster.log
        pg_find_cluster || fail postgres "cluster $ver/$name not listed after creation"
    fi
    log "postgres: starting cluster $PG_VER/$PG_CLUSTER (port $PG_PORT)"
    if ! pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start >/tmp/dcc-pg-start.log 2>&1 9>&-; then
        cat /tmp/dcc-pg-start.log >&2
        fail postgres "pg_ctlcluster $PG_VER $PG_CLUSTER start failed" "$PG_LOG"
    fi
    for _ in $(seq 1 60); do
        pg_ready && return 0
        sleep 0.5
    done
    fail postgres "cluster $PG_VER/$PG_CLUSTER started but pg_isready gets no answer on $PG_HOST:$PG_PORT after 30 s" "$PG_LOG"
}

# Creates / updates the role and the database as the postgres superuser.
pg_provision() {
    is_root || fail postgres "cannot log in as $PG_USER to $PG_DB on $PG_HOST:$PG_PORT and not root (cannot create the role/database)"
    local psql_target=(-h /var/run/postgresql -p "$PG_PORT")
    if pg_find_cluster; then psql_target=(--cluster "$PG_VER/$PG_CLUSTER"); fi
    log "postgres: ensuring role '$PG_USER' (LOGIN CREATEDB) and database '$PG_DB'"
    # psql's :'var' quoting keeps odd names/passwords safe; \gexec runs each
    # generated statement on its own (CREATE DATABASE cannot be in a transaction).
    (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "${psql_target[@]}" -d postgres \
        -v u="$PG_USER" -v p="$PG_PASSWORD" -v d="$PG_DB" >/tmp/dcc-pg-provision.log 2>&1 <<'SQL'
SELECT format('CREATE ROLE %I', :'u')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'u') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %s', :'u',
              CASE WHEN :'p' = '' THEN 'NULL' ELSE quote_literal(:'p') END) \gexec
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', :'d', :'u', 'UTF8')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'d') \gexec
SQL
    ) || fail postgres "creating role/database as the postgres superuser failed" /tmp/dcc-pg-provision.log
}

ensure_postgres() {
    if pg_is_sqlite; then
        log "postgres: DATABASE_URL is sqlite, postgres not needed (skipped)"
        return 0
    fi
    pg_parse
    if ! command -v pg_isready >/dev/null || ! command -v psql >/dev/null; then
        if is_local_host "$PG_HOST"; then
            apt_install postgres postgresql
        else
            apt_install postgres postgresql-client
        fi
    fi
    if ! pg_ready; then
        is_local_host "$PG_HOST" \
            || fail postgres "remote server $PG_HOST:$PG_PORT does not answer (only a local one is started here)"
        pg_start_local
    fi
    if ! pg_app_ok; then
        is_local_host "$PG_HOST" \
            || fail postgres "cannot log in as $PG_USER to $PG_DB on remote $PG_HOST:$PG_PORT (or role lacks CREATEDB)"
        pg_provision
        pg_app_ok || fail postgres "role/database created but '$PG_USER' still cannot log in to '$PG_DB' on $PG_HOST:$PG_PORT (check pg_hba.conf)" "${PG_LOG:-}"
    fi
    log "postgres: answering on $PG_HOST:$PG_PORT (db $PG_DB, user $PG_USER)"
}

status_postgres() {
    if pg_is_sqlite; then log "postgres: not needed (sqlite)"; return 0; fi
    pg_parse
    if ! command -v pg_isready >/dev/null || ! command -v psql >/dev/null; then
        log "postgres: DOWN (psql/pg_isready not installed)"; return 1
    fi
    if ! pg_ready; then log "postgres: DOWN (nothing answers on $PG_HOST:$PG_PORT)"; return 1; fi
    if ! pg_app_ok; then
        log "postgres: DOWN (server answers on $PG_HOST:$PG_PORT but $PG_USER cannot log in to $PG_DB or lacks CREATEDB)"
        return 1
    fi
    log "postgres: answering on $PG_HOST:$PG_PORT (db $PG_DB, user $PG_USER)"
}

# -------------------------------------------------------------- redis ------
RD_SCHEME='' RD_PASSWORD='' RD_HOST='' RD_PORT=''

rd_parse() {
    parse_url "$CELERY_BROKER_URL" || fail redis "cannot parse CELERY_BROKER_URL"
    RD_SCHEME="${URL_PARTS[0]}" RD_PASSWORD="${URL_PARTS[2]}"
    RD_HOST="${URL_PARTS[3]:-127.0.0.1}" RD_PORT="${URL_PARTS[4]:-6379}"
}

rd_is_redis() { case "$CELERY_BROKER_URL" in redis://* | rediss://*) return 0 ;; *) return 1 ;; esac; }

rd_ping() {
    local out
    if command -v redis-cli >/dev/null; then
        local tls=()
        [ "$RD_SCHEME" = rediss ] && tls=(--tls)
        out="$(REDISCLI_AUTH="$RD_PASSWORD" timeout 5 redis-cli "${tls[@]}" -h "$RD_HOST" -p "$RD_PORT" ping 2>/dev/null)" || return 1
    else
        # Plain TCP fallback (no TLS / AUTH).
        # shellcheck disable=SC2016  # $0/$1 expand in the inner shell
        out="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "PING\r\n" >&3; head -c 7 <&3' \
            "$RD_HOST" "$RD_PORT" 2>/dev/null)" || return 1
        out="${out//[$'\r\n+']/}"
    fi
    [ "$out" = PONG ]
}

ensure_redis() {
    if ! rd_is_redis; then
        log "redis: CELERY_BROKER_URL is not a redis URL, redis not needed (skipped)"
        return 0
    fi
    rd_parse
    if rd_ping; then
        log "redis: answering on $RD_HOST:$RD_PORT"
        return 0
    fi
    is_local_host "$RD_HOST" || fail redis "remote redis $RD_HOST:$RD_PORT does not answer PING (only a local one is started here)"
    [ "$RD_SCHEME" = redis ] || fail redis "nothing answers on $RD_HOST:$RD_PORT and starting a local TLS redis is not supported"
    apt_install redis redis-server
    local logf="/tmp/dcc-redis-$RD_PORT.log" extra=() bind=(127.0.0.1)
    [ "$RD_HOST" = ::1 ] && bind=(127.0.0.1 ::1)
    [ -n "$RD_PASSWORD" ] && extra=(--requirepass "$RD_PASSWORD")
    log "redis: starting redis-server on $RD_HOST:$RD_PORT"
    : >"$logf"
    redis-server --port "$RD_PORT" --bind "${bind[@]}" --daemonize yes --save '' --appendonly no \
        --logfile "$logf" --dir /tmp "${extra[@]}" >>"$logf" 2>&1 </dev/null 9>&- \
        || fail redis "redis-server failed to start" "$logf"
    for _ in $(seq 1 40); do
        if rd_ping; then
            log "redis: answering on $RD_HOST:$RD_PORT"
            return 0
        fi
        grep -qE 'aborting|Fatal|FATAL' "$logf" 2>/dev/null && fail redis "redis-server exited during startup" "$logf"
        sleep 0.25
    done
    fail redis "redis-server started but no PONG from $RD_HOST:$RD_PORT after 10 s" "$logf"
}

status_redis() {
    if ! rd_is_redis; then log "redis: not needed (broker is not redis)"; return 0; fi
    rd_parse
    if rd_ping; then log "redis: answering on $RD_HOST:$RD_PORT"; return 0; fi
    log "redis: DOWN (no PONG from $RD_HOST:$RD_PORT)"
    return 1
}

# ------------------------------------------------------------- docker ------
DOCKER_SOCK=''

dk_parse() {
    case "$DOCKER_HOST" in
        unix://*) DOCKER_SOCK="${DOCKER_HOST#unix://}" ;;
        *) DOCKER_SOCK='' ;;
    esac
}

have_cli() { [ -x "$DOCKER_CLI" ]; }

# docker_api METHOD PATH [curl args...]  (unix socket only)
docker_api() {
    local method="$1" path="$2"; shift 2
    curl -sS --max-time 120 --unix-socket "$DOCKER_SOCK" -X "$method" "http://localhost$path" "$@"
}

dk_ping() {
    if [ -n "$DOCKER_SOCK" ] && command -v curl >/dev/null; then
        [ -S "$DOCKER_SOCK" ] || return 1
        [ "$(curl -s --max-time 5 --unix-socket "$DOCKER_SOCK" http://localhost/_ping 2>/dev/null)" = OK ]
    elif have_cli; then
        timeout 10 "$DOCKER_CLI" version --format '{{.Server.Version}}' >/dev/null 2>&1
    else
        return 1
    fi
}

# Alive and not a zombie (a dockerd we started stays our child until we exit).
proc_alive() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# dockerd_pidfile_of PID  prints the pid file the process was started with, read from
# its command line: the --pidfile / -p argument, else dockerd's default
# /var/run/docker.pid. Fails when the command line cannot be read (no such process).
dockerd_pidfile_of() {
    local arg next=0 pidfile=/var/run/docker.pid args=()
    mapfile -d '' -t args 2>/dev/null <"/proc/$1/cmdline" || return 1
    [ "${#args[@]}" -gt 0 ] || return 1
    for arg in "${args[@]:1}"; do
        if [ "$next" -eq 1 ]; then
            pidfile="$arg" next=0
            continue
        fi
        case "$arg" in
            --) break ;;
            --pidfile | -p) next=1 ;;
            --pidfile=*) pidfile="${arg#--pidfile=}" ;;
            -p=*) pidfile="${arg#-p=}" ;;
            -p?*) pidfile="${arg#-p}" ;;
        esac
    done
    printf '%s\n' "$pidfile"
}

# is_dockerd_of PID PIDFILE  whether PID is a live dockerd started with that pid file
# (paths compared after resolving symlinks: /var/run is /run).
is_dockerd_of() {
    local pid="$1" pidfile="$2" own
    proc_alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
    own="$(dockerd_pidfile_of "$pid")" || return 1
    [ "$(readlink -m "$own")" = "$(readlink -m "$pidfile")" ]
}

# dockerd_running_pid PIDFILE  prints the PID the pid file names, if that is the live
# dockerd which writes this pid file; fails otherwise (no file, or a stale one).
dockerd_running_pid() {
    local pidfile="$1" pid
    pid="$(cat "$pidfile" 2>/dev/null)" || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    is_dockerd_of "$pid" "$pidfile" && echo "$pid"
}

# pidfile_stale_note PIDFILE  describes what a stale pid file names, for the log.
pidfile_stale_note() {
    local pid comm
    pid="$(head -c 32 "$1" 2>/dev/null | tr -cd '0-9')"
    [ -n "$pid" ] || { echo "no PID"; return 0; }
    if [ -e "/proc/$pid" ]; then
        comm="$(cat "/proc/$pid/comm" 2>/dev/null)"
        echo "pid $pid, a live ${comm:-process} not started with this pid file"
    else
        echo "pid $pid, not running"
    fi
}

# dockerd_start SERVICE PIDFILE LOGFILE [DOCKERD ARG...]
# Reuses the dockerd the pid file names if it runs, else starts one with the given
# arguments and DOCKERD_FLAGS; then waits until DOCKER_HOST answers a ping.
dockerd_start() {
    local service="$1" pidfile="$2" logfile="$3" pid
    shift 3
    if pid="$(dockerd_running_pid "$pidfile")"; then
        log "$service: dockerd already running (pid $pid), waiting for it"
    else
        if [ -e "$pidfile" ]; then
            log "$service: removing stale pid file $pidfile ($(pidfile_stale_note "$pidfile"))"
            rm -f "$pidfile" || fail "$service" "cannot remove the stale pid file $pidfile"
        fi
        log "$service: starting dockerd (log $logfile)"
        printf '\n---- services: dockerd started %s ----\n' "$(date -u +%FT%TZ)" >>"$logfile"
        setsid /usr/sbin/dockerd "$@" "${DOCKERD_FLAGS[@]}" >>"$logfile" 2>&1 </dev/null 9>&- &
        pid=$!
    fi
    for _ in $(seq 1 120); do
        if dk_ping; then
            log "$service: answering on $DOCKER_HOST"
            return 0
        fi
        proc_alive "$pid" || fail "$service" "dockerd (pid $pid) exited during startup" "$logfile"
        sleep 0.5
    done
    fail "$service" "dockerd (pid $pid) started but $DOCKER_SOCK gives no successful ping after 60 s" "$logfile"
}

ensure_docker() {
    dk_parse
    if [ -n "$DOCKER_SOCK" ] && ! have_cli && ! command -v curl >/dev/null; then
        apt_install docker curl
    fi
    if dk_ping; then
        log "docker: answering on $DOCKER_HOST"
        return 0
    fi
    [ -n "$DOCKER_SOCK" ] || fail docker "daemon at $DOCKER_HOST does not answer (only a local unix-socket daemon is started here)"
    is_root || fail docker "nothing answers on $DOCKER_SOCK and not running as root (cannot start dockerd)"
    [ -x /usr/sbin/dockerd ] || apt_install docker docker.io
    [ -x /usr/sbin/dockerd ] || fail docker "/usr/sbin/dockerd is still missing after installing docker.io"
    if ! have_cli && ! command -v curl >/dev/null; then apt_install docker curl; fi

    local host_args=()
    [ "$DOCKER_SOCK" = /var/run/docker.sock ] || host_args=(-H "$DOCKER_HOST")
    dockerd_start docker /var/run/docker.pid "$DOCKERD_LOG" "${host_args[@]}"
}

status_docker() {
    dk_parse
    if dk_ping; then log "docker: answering on $DOCKER_HOST"; return 0; fi
    log "docker: DOWN (no answer on $DOCKER_HOST)"
    return 1
}

# -------------------------------------------------------------- image ------
# Prints the recipe label of the image if present ("" when it has none);
# returns non-zero when the image is absent.
image_label() {
    if have_cli; then
        "$DOCKER_CLI" image inspect --format "{{ index .Config.Labels \"$IMAGE_LABEL\" }}" \
            "$DCC_TEST_IMAGE" 2>/dev/null | sed 's/^<no value>$//'
    else
        local json
        json="$(docker_api GET "/images/$DCC_TEST_IMAGE/json" -f 2>/dev/null)" || return 1
        printf '%s' "$json" | python3 -c '
import json, sys
labels = (json.load(sys.stdin).get("Config") or {}).get("Labels") or {}
print(labels.get(sys.argv[1], ""))' "$IMAGE_LABEL"
    fi
}

image_build() {
    # A static busybox is needed: a dynamic one would not run in an empty rootfs.
    if is_root; then apt_install image busybox-static; fi
    [ -x /bin/busybox ] || fail image "/bin/busybox is missing (install busybox-static)"
    if command -v file >/dev/null; then
        file -L /bin/busybox | grep -q 'statically linked' \
            || fail image "/bin/busybox is not statically linked (install busybox-static)"
    elif ! pkg_installed busybox-static; then
        fail image "cannot confirm /bin/busybox is static (neither 'file' nor busybox-static installed)"
    fi

    local tmp rootfs applet
    tmp="$(mktemp -d /tmp/dcc-image.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    rootfs="$tmp/rootfs"
    mkdir -p "$rootfs"/{bin,etc,root,tmp,var/tmp,dev,proc,sys,usr/bin}
    chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $("$rootfs/bin/busybox" --list) sh echo sleep true false cat env ls yes head printf; do
        [ "$applet" = busybox ] && continue
        [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
    done
    ln -s /bin/busybox "$rootfs/usr/bin/env"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"

    local tarball="$tmp/rootfs.tar"
    tar -C "$rootfs" --owner=0 --group=0 --numeric-owner -cf "$tarball" . \
        || fail image "could not pack the root filesystem"

    local changes=('CMD ["/bin/sh"]' 'ENV PATH=/bin' "LABEL $IMAGE_LABEL=$IMAGE_RECIPE_VERSION")
    log "image: importing $DCC_TEST_IMAGE into $DOCKER_HOST (static busybox, no registry)"
    if have_cli; then
        "$DOCKER_CLI" import --change "${changes[0]}" --change "${changes[1]}" --change "${changes[2]}" \
            - "$DCC_TEST_IMAGE" <"$tarball" >"$tmp/import.log" 2>&1 \
            || fail image "docker import failed" "$tmp/import.log"
    else
        local query
        query="$(python3 -c '
import sys, urllib.parse as up
ref = sys.argv[1]
repo, _, tag = ref.rpartition(":")
if not repo or "/" in tag:
    repo, tag = ref, "latest"
q = [("fromSrc", "-"), ("repo", repo), ("tag", tag)] + [("changes", c) for c in sys.argv[2:]]
print(up.urlencode(q))' "$DCC_TEST_IMAGE" "${changes[@]}")"
        docker_api POST "/images/create?$query" -H 'Content-Type: application/x-tar' \
            --data-binary "@$tarball" >"$tmp/import.log" 2>&1 \
            || fail image "image import through the docker API failed" "$tmp/import.log"
        grep -q '"error' "$tmp/import.log" && fail image "image import through the docker API failed" "$tmp/import.log"
    fi
    rm -rf "$tmp"
    trap - EXIT
}

# Runs `sh -c 'echo ok'` in the image (network mode none) and checks the output.
image_smoke() {
    local out
    if have_cli; then
        out="$(timeout 120 "$DOCKER_CLI" run --rm --network none "$DCC_TEST_IMAGE" sh -c 'echo ok' 2>&1)" \
            || fail image "smoke run of $DCC_TEST_IMAGE failed: $out" "$DOCKERD_LOG"
    else
        local body cid
        body="$(python3 -c '
import json, sys
print(json.dumps({"Image": sys.argv[1], "Cmd": ["sh", "-c", "echo ok"], "Tty": True,
                  "HostConfig": {"NetworkMode": "none"}}))' "$DCC_TEST_IMAGE")"
        cid="$(docker_api POST /containers/create -f -H 'Content-Type: application/json' -d "$body" \
            | python3 -c 'import json, sys; print(json.load(sys.stdin)["Id"])')" \
            || fail image "could not create a smoke container from $DCC_TEST_IMAGE" "$DOCKERD_LOG"
        if ! { docker_api POST "/containers/$cid/start" -f >/dev/null \
                && docker_api POST "/containers/$cid/wait" -f >/dev/null \
                && out="$(docker_api GET "/containers/$cid/logs?stdout=1&stderr=1" -f)"; }; then
            docker_api DELETE "/containers/$cid?force=1" >/dev/null 2>&1 || true
            fail image "smoke container from $DCC_TEST_IMAGE failed to run" "$DOCKERD_LOG"
        fi
        docker_api DELETE "/containers/$cid?force=1" >/dev/null 2>&1 || true
        out="${out//$'\r'/}"
    fi
    [ "$out" = ok ] || fail image "smoke run of $DCC_TEST_IMAGE printed '$out' instead of 'ok'" "$DOCKERD_LOG"
}

# image_ensure SERVICE  imports the test image into the daemon at DOCKER_HOST when it is
# absent or built by an older recipe, and runs it once.
image_ensure() {
    local service="$1" label
    if label="$(image_label)"; then
        if [ -z "$label" ] || [ "$label" = "$IMAGE_RECIPE_VERSION" ]; then
            log "$service: $DCC_TEST_IMAGE present"
            return 0
        fi
        log "$service: $DCC_TEST_IMAGE was built by an older recipe ($label), rebuilding"
    fi
    image_build
    image_smoke
    log "$service: $DCC_TEST_IMAGE built and runs on $DOCKER_HOST (network none)"
}

ensure_image() {
    dk_parse
    dk_ping || ensure_docker
    image_ensure image
}

status_image() {
    dk_parse
    if ! dk_ping; then log "image: DOWN (docker does not answer)"; return 1; fi
    if image_label >/dev/null; then log "image: $DCC_TEST_IMAGE present"; return 0; fi
    log "image: DOWN ($DCC_TEST_IMAGE not present)"
    return 1
}

# ------------------------------------------------------------ docker2 ------
# A second dockerd beside the first (see the header). --live-restore keeps its
# containers running while it is stopped, as on a production host whose daemon
# restarts: a test stops it under running jobs and starts it again.

# on_docker2 FUNCTION [ARG...]  runs FUNCTION in a subshell where DOCKER_HOST,
# DOCKER_SOCK and DOCKERD_LOG name the second daemon (the docker and image helpers
# above then act on it).
on_docker2() {
    (
        DOCKER_HOST="$DCC_DOCKER2_HOST"
        DOCKERD_LOG="$DOCKERD2_LOG"
        export DOCKER_HOST
        dk_parse
        "$@"
    )
}

docker2_check_host() {
    case "$DCC_DOCKER2_HOST" in
        unix://?*) ;;
        *) fail docker2 "DCC_DOCKER2_HOST must be a unix:// socket (got '$DCC_DOCKER2_HOST')" ;;
    esac
    [ "$DCC_DOCKER2_HOST" != "$DOCKER_HOST" ] \
        || fail docker2 "DCC_DOCKER2_HOST and DOCKER_HOST are the same socket ($DOCKER_HOST)"
}

docker2_start() {
    if dk_ping; then
        log "docker2: answering on $DOCKER_HOST"
    else
        is_root || fail docker2 "nothing answers on $DOCKER_SOCK and not running as root (cannot start dockerd)"
        [ -x /usr/sbin/dockerd ] || apt_install docker2 docker.io
        [ -x /usr/sbin/dockerd ] || fail docker2 "/usr/sbin/dockerd is still missing after installing docker.io"
        if ! have_cli && ! command -v curl >/dev/null; then apt_install docker2 curl; fi
        # Its own exec root gives it its own containerd only while no system
        # containerd listens at /run/containerd/containerd.sock (see the header); its
        # own containerd namespaces keep its containers apart from the first daemon's
        # either way. Without iptables and a bridge they share no network setup.
        dockerd_start docker2 "$DOCKERD2_PIDFILE" "$DOCKERD2_LOG" -H "$DOCKER_HOST" \
            --data-root "$DOCKERD2_DATA_ROOT" --exec-root "$DOCKERD2_EXEC_ROOT" \
            --pidfile "$DOCKERD2_PIDFILE" \
            --containerd-namespace dcc-docker2 --containerd-plugins-namespace dcc-docker2-plugins \
            --live-restore
    fi
    image_ensure docker2
}

ensure_docker2() {
    docker2_check_host
    on_docker2 docker2_start
}

stop_docker2() {
    local pid
    if ! pid="$(dockerd_running_pid "$DOCKERD2_PIDFILE")"; then
        if [ -e "$DOCKERD2_PIDFILE" ]; then
            log "docker2: not running (stale $DOCKERD2_PIDFILE: $(pidfile_stale_note "$DOCKERD2_PIDFILE"); nothing signalled)"
        else
            log "docker2: not running (no $DOCKERD2_PIDFILE)"
        fi
        return 0
    fi
    log "docker2: stopping dockerd (pid $pid); its containers keep running (live-restore)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 120); do
        if ! is_dockerd_of "$pid" "$DOCKERD2_PIDFILE"; then
            log "docker2: stopped"
            return 0
        fi
        sleep 0.5
    done
    fail docker2 "dockerd (pid $pid) is still running 60 s after SIGTERM" "$DOCKERD2_LOG"
}

docker2_status() {
    if ! dk_ping; then
        log "docker2: DOWN (no answer on $DOCKER_HOST)"
        return 1
    fi
    if ! image_label >/dev/null; then
        log "docker2: DOWN (answers on $DOCKER_HOST but $DCC_TEST_IMAGE is not present)"
        return 1
    fi
    log "docker2: answering on $DOCKER_HOST ($DCC_TEST_IMAGE present)"
}

status_docker2() { on_docker2 docker2_status; }

# ------------------------------------------------------------- browser ------
# The admin's end-to-end test drives Debian's Chromium through Playwright; no browser
# is ever downloaded.
CHROMIUM="${DCC_CHROMIUM:-/usr/bin/chromium}"

ensure_browser() {
    if [ ! -x "$CHROMIUM" ]; then
        apt_install browser chromium
    fi
    [ -x "$CHROMIUM" ] || fail browser "$CHROMIUM is missing after installing chromium"
    log "browser: $("$CHROMIUM" --version 2>/dev/null | head -n 1)"
}

status_browser() {
    if [ -x "$CHROMIUM" ]; then log "browser: $CHROMIUM present"; return 0; fi
    log "browser: DOWN ($CHROMIUM missing)"
    return 1
}

# ------------------------------------------------------------ faketime ------
# The clock-skew tests run a worker whose clock is two minutes fast, by preloading
# Debian's libfaketime into that one process.
FAKETIME_LIB="${DCC_FAKETIME_LIB:-/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1}"

ensure_faketime() {
    if [ ! -e "$FAKETIME_LIB" ]; then
        apt_install faketime faketime
    fi
    [ -e "$FAKETIME_LIB" ] || fail faketime "$FAKETIME_LIB is missing after installing faketime"
    log "faketime: $FAKETIME_LIB present"
}

status_faketime() {
    if [ -e "$FAKETIME_LIB" ]; then log "faketime: $FAKETIME_LIB present"; return 0; fi
    log "faketime: DOWN ($FAKETIME_LIB missing)"
    return 1
}

# --------------------------------------------------------------- main ------
usage() {
    echo "usage: bash scripts/services.sh" \
        "{all|postgres|redis|docker|image|docker2|stop-docker2|browser|faketime|status}" >&2
    exit 2
}

# fd 9 holds the lock; every daemon started below gets it closed (9>&-) so
# that it does not keep the lock after this script ends.
take_lock() {
    command -v flock >/dev/null || return 0
    exec 9>"$LOCK_FILE"
    case "$LOCK_WAIT" in
        '' | *[!0-9]*) fail services "DCC_SERVICES_LOCK_WAIT must be a number of seconds (got '$LOCK_WAIT')" ;;
    esac
    flock -w "$LOCK_WAIT" 9 \
        || fail services "could not take $LOCK_FILE within $LOCK_WAIT s (another run is stuck?)"
}

main() {
    command -v python3 >/dev/null || fail services "python3 is needed to parse the service URLs"
    local cmd="${1:-}" rc
    [ "$#" -le 1 ] || usage
    case "$cmd" in
        all)
            take_lock
            ensure_postgres; ensure_redis; ensure_docker; ensure_image; ensure_docker2
            ensure_browser; ensure_faketime
            ;;
        browser) take_lock; ensure_browser ;;
        faketime) take_lock; ensure_faketime ;;
        postgres) take_lock; ensure_postgres ;;
        redis) take_lock; ensure_redis ;;
        docker) take_lock; ensure_docker ;;
        image) take_lock; ensure_image ;;
        docker2) take_lock; ensure_docker2 ;;
        stop-docker2) take_lock; stop_docker2 ;;
        status)
            rc=0
            status_postgres || rc=1
            status_redis || rc=1
            status_docker || rc=1
            status_image || rc=1
            status_docker2 || rc=1
            status_browser || rc=1
            status_faketime || rc=1
            exit "$rc"
            ;;
        *) usage ;;
    esac
}

# Run as a script; sourced (to call its functions with other paths), it only defines them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
