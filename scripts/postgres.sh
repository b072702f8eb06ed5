#!/usr/bin/env bash
# A real PostgreSQL server on loopback for the view store (transforms/view_store.py).
#
#   scripts/postgres.sh install   install PostgreSQL's server from Debian's packages if missing
#   scripts/postgres.sh start     install if needed, init a cluster (once), start it
#   scripts/postgres.sh stop|status
#   scripts/postgres.sh dsn       print the DSN (postgresql://sourcebeam:...@127.0.0.1:PORT/sourcebeam)
#
# Port: PG_PORT (default 5433, so a distribution's own cluster on 5432 cannot collide).
# State (cluster, log, password): $SOURCEBEAM_STATE_DIR/postgres (default .cache/services/postgres).
# The server runs as the `postgres` OS user when we are root (PostgreSQL refuses to run as root),
# so the state directory's parents must be traversable by that user.
# The password is generated at init, kept in the state directory (mode 600), and printed only by
# `dsn`; nothing else here echoes it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_PORT="${PG_PORT:-5433}"
PGDIR="$STATE_DIR/postgres"
DATA="$PGDIR/data"
LOGFILE="$PGDIR/postgres.log"
PWFILE="$PGDIR/password"
PG_USER=sourcebeam
PG_DB=sourcebeam

pg_bin() {
  # The newest installed server's bin directory.
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  [[ -n "$d" && -x "$d/postgres" ]] && echo "$d"
}

install() {
  if [[ -n "$(pg_bin)" ]]; then return 0; fi
  [[ "$(id -u)" == 0 ]] || die "PostgreSQL is not installed and we are not root: apt-get install postgresql"
  log "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  [[ -n "$(pg_bin)" ]] || die "apt-get install postgresql did not install a server"
}

# as_pg CMD...: run CMD as the postgres OS user when we are root.
as_pg() {
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

healthy() {
  "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d "$PG_DB" -U "$PG_USER" 2>/dev/null
}

running() {
  [[ -f "$DATA/postmaster.pid" ]] && as_pg "$(pg_bin)/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

init_cluster() {
  mkdir -p "$PGDIR"
  chmod 755 "$PGDIR"
  touch "$LOGFILE"
  if [[ "$(id -u)" == 0 ]]; then chown postgres: "$PGDIR" "$LOGFILE"; fi
  if [[ ! -s "$PWFILE" ]]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$PWFILE")
    if [[ "$(id -u)" == 0 ]]; then chown postgres: "$PWFILE"; fi
  fi
  if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "initialising a PostgreSQL cluster in $DATA"
    as_pg "$(pg_bin)/initdb" -D "$DATA" -U "$PG_USER" --pwfile="$PWFILE" --auth=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >>"$LOGFILE" 2>&1 || { tail -20 "$LOGFILE" >&2; die "initdb failed (log: $LOGFILE)"; }
  fi
}

start() {
  install
  if running; then
    log "postgres already running on 127.0.0.1:$PG_PORT"
    return 0
  fi
  port_open "$PG_PORT" && die "port $PG_PORT is already in use; set PG_PORT"
  init_cluster
  log "starting postgres on 127.0.0.1:$PG_PORT, log $LOGFILE"
  # Small memory settings: the machine is shared. The socket lives in our state directory.
  as_pg "$(pg_bin)/pg_ctl" start -D "$DATA" -l "$LOGFILE" -w -t "${PG_START_TIMEOUT:-60}" \
    -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$PGDIR -c shared_buffers=32MB -c max_connections=40" \
    >/dev/null || { tail -20 "$LOGFILE" >&2; die "postgres did not start (log: $LOGFILE)"; }
  local deadline=$((SECONDS + 30))
  until healthy; do
    (( SECONDS > deadline )) && { tail -20 "$LOGFILE" >&2; die "postgres not ready after start (log: $LOGFILE)"; }
    sleep 0.5
  done
  # The database the view store uses (the password goes through the environment, never argv).
  if ! PGPASSWORD="$(cat "$PWFILE")" "$(pg_bin)/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres \
      -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    PGPASSWORD="$(cat "$PWFILE")" "$(pg_bin)/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DB" \
      || die "could not create database $PG_DB"
  fi
  log "postgres is up on 127.0.0.1:$PG_PORT (database $PG_DB, user $PG_USER; scripts/postgres.sh dsn)"
}

stop() {
  if [[ -z "$(pg_bin)" ]] || ! running; then return 0; fi
  log "stopping postgres ($DATA)"
  as_pg "$(pg_bin)/pg_ctl" stop -D "$DATA" -m fast -w -t 30 >/dev/null
}

status() {
  if [[ -z "$(pg_bin)" ]]; then echo "postgres: not installed"; return 3; fi
  if running; then
    if healthy; then echo "postgres: running address=127.0.0.1:$PG_PORT database=$PG_DB health=ok"
    else echo "postgres: running address=127.0.0.1:$PG_PORT health=failing"; return 1; fi
  else
    echo "postgres: stopped (address would be 127.0.0.1:$PG_PORT)"; return 3
  fi
}

dsn() {
  [[ -s "$PWFILE" ]] || die "no cluster in $PGDIR yet: scripts/postgres.sh start"
  echo "postgresql://$PG_USER:$(cat "$PWFILE")@127.0.0.1:$PG_PORT/$PG_DB"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  dsn) dsn ;;
  *) die "usage: scripts/postgres.sh install|start|stop|status|dsn" ;;
esac
