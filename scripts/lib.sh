# Shared helpers for Sourcebeam's service scripts (sourced, not run).
# Why: kafka.sh, flink.sh, expansion.sh and jobserver.sh start JVMs in the background and must
# agree on where state, logs and pid files live, how to wait for health, and how to stop cleanly.

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

# Beam's own Java services (expansion.sh, jobserver.sh): one JVM per service on one port,
# its pid and log under a folder of the state directory.

# start_java NAME PORT DIR JAVA_ARGS...: start it in the background unless it runs already.
start_java() {
  local name="$1" port="$2" dir="$3" pidfile="$3/$1.pid" logfile="$3/$1.log"
  shift 3
  if pid_alive "$pidfile"; then
    log "$name already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
    return 0
  fi
  port_open "$port" && die "port $port is already in use (for $name): choose another port"
  mkdir -p "$dir"
  log "starting $name on 127.0.0.1:$port, log $logfile"
  nohup "$(java_bin)" "$@" >>"$logfile" 2>&1 < /dev/null &
  echo $! > "$pidfile"
}

# wait_java NAME PORT DIR TIMEOUT: until it accepts connections (or fail with its log).
wait_java() {
  local name="$1" port="$2" pidfile="$3/$1.pid" logfile="$3/$1.log"
  local deadline=$((SECONDS + $4))
  until port_open "$port"; do
    if ! pid_alive "$pidfile"; then
      tail -30 "$logfile" >&2; rm -f "$pidfile"; die "$name exited during startup (log: $logfile)"
    fi
    if (( SECONDS > deadline )); then
      tail -30 "$logfile" >&2; stop_pid "$name" "$pidfile"
      die "$name not listening after $4 s (log: $logfile)"
    fi
    sleep 0.2
  done
  log "$name is up: 127.0.0.1:$port (pid $(cat "$pidfile"))"
}

# java_status NAME PORT DIR: one status line; exit 0 healthy, 1 running but not listening,
# 3 stopped.
java_status() {
  local name="$1" port="$2" pidfile="$3/$1.pid"
  if ! pid_alive "$pidfile"; then
    echo "$name: stopped (address would be 127.0.0.1:$port)"; return 3
  fi
  if port_open "$port"; then
    echo "$name: running pid=$(cat "$pidfile") address=127.0.0.1:$port health=ok"; return 0
  fi
  echo "$name: running pid=$(cat "$pidfile") address=127.0.0.1:$port health=failing"; return 1
}
