# Shared helpers for Sourcebeam's service scripts (sourced, not run).
# Why: kafka.sh and flink.sh start JVMs in the background and must agree on where
# state, logs and pid files live, how to wait for health, and how to stop cleanly.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
JARS="$CACHE/jars"
# Where running services keep their data, logs and pid files. Tests point this at a
# private directory so concurrent runs in one checkout do not collide.
STATE_DIR="${SOURCEBEAM_STATE_DIR:-$CACHE/services}"
FLINK_VERSION="${FLINK_VERSION:-1.19.0}"
FLINK_HOME="${FLINK_HOME:-$CACHE/flink-$FLINK_VERSION/pyflink}"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# pid_alive PIDFILE: the pid in PIDFILE names a live process.
pid_alive() {
  local f="$1"
  [[ -s "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# stop_pid NAME PIDFILE: TERM, wait up to 20 s, then KILL; removes PIDFILE.
stop_pid() {
  local name="$1" f="$2" pid i
  if ! pid_alive "$f"; then rm -f "$f"; return 0; fi
  pid="$(cat "$f")"
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
    sleep 0.5
  done
  log "$name did not stop within 20 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.5
  rm -f "$f"
}

# java_bin: the java launcher (JAVA_HOME first).
java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"
  else command -v java || die "java not found (install a JDK 17)"; fi
}
