#!/usr/bin/env bash
# Beam's Java IO expansion services, kept running: what ReadFromKafka and WriteToKafka
# expand with, without a JVM started (and warmed up) for every pipeline.
#
#   scripts/expansion.sh start|stop|status
#
# Two services from the jars scripts/install_tools.sh built: one for Prism and the
# DirectRunner (EXPANSION_PORT, default 8097) and one for Flink that expands KafkaIO to
# the legacy read (FLINK_EXPANSION_PORT, default 8098; see runners.py). Both start with
# --alsoStartLoopbackWorker, as Beam's Python SDK starts the jar inside a pipeline that
# keeps its services: the Java environment is then (embedded, the service's loopback
# worker), which Flink runs embedded and Prism on the loopback worker.
# Use them with SOURCEBEAM_EXPANSION_SERVICE=127.0.0.1:$EXPANSION_PORT and
# SOURCEBEAM_FLINK_EXPANSION_SERVICE=127.0.0.1:$FLINK_EXPANSION_PORT in the environment.
# State (logs, pids): $SOURCEBEAM_STATE_DIR/expansion (default .cache/services/expansion).
# Heap: EXPANSION_HEAP (default 768m) each.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

EXPANSION_PORT="${EXPANSION_PORT:-8097}"
FLINK_EXPANSION_PORT="${FLINK_EXPANSION_PORT:-8098}"
EXPANSION_HEAP="${EXPANSION_HEAP:-768m}"
EDIR="$STATE_DIR/expansion"
MAIN_JAR="$JARS/beam-sdks-java-io-expansion-service-2.70.0.jar"
FLINK_JAR="$JARS/beam-sdks-java-io-expansion-service-2.70.0-flink.jar"

# NAME PORT JAR: one service (pid and log under $EDIR/NAME.*).
start_one() {
  local name="$1" port="$2" jar="$3" pidfile="$EDIR/$1.pid" logfile="$EDIR/$1.log"
  [[ -f "$jar" ]] || die "$jar missing: run scripts/install_tools.sh"
  if pid_alive "$pidfile"; then
    log "$name already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
    return 0
  fi
  port_open "$port" && die "port $port is already in use; set EXPANSION_PORT / FLINK_EXPANSION_PORT"
  mkdir -p "$EDIR"
  log "starting $name on 127.0.0.1:$port, log $logfile"
  nohup "$(java_bin)" -Xmx"$EXPANSION_HEAP" -jar "$jar" "$port" --filesToStage="$jar" \
    --alsoStartLoopbackWorker >>"$logfile" 2>&1 < /dev/null &
  echo $! > "$pidfile"
}

# NAME PORT: wait until it accepts connections (or fail with its log).
wait_one() {
  local name="$1" port="$2" pidfile="$EDIR/$1.pid" logfile="$EDIR/$1.log"
  local deadline=$((SECONDS + ${EXPANSION_START_TIMEOUT:-90}))
  until port_open "$port"; do
    if ! pid_alive "$pidfile"; then
      tail -30 "$logfile" >&2; rm -f "$pidfile"; die "$name exited during startup (log: $logfile)"
    fi
    if (( SECONDS > deadline )); then
      tail -30 "$logfile" >&2; stop_pid "$name" "$pidfile"
      die "$name not listening after ${EXPANSION_START_TIMEOUT:-90}s (log: $logfile)"
    fi
    sleep 0.2
  done
  log "$name is up: 127.0.0.1:$port (pid $(cat "$pidfile"))"
}

start() {
  start_one expansion "$EXPANSION_PORT" "$MAIN_JAR"
  start_one expansion-flink "$FLINK_EXPANSION_PORT" "$FLINK_JAR"
  wait_one expansion "$EXPANSION_PORT"
  wait_one expansion-flink "$FLINK_EXPANSION_PORT"
}

stop() {
  stop_pid expansion-flink "$EDIR/expansion-flink.pid"
  stop_pid expansion "$EDIR/expansion.pid"
}

status() {
  local ok=0 stopped=0 name port
  for name in expansion expansion-flink; do
    port="$EXPANSION_PORT"; [[ "$name" == expansion-flink ]] && port="$FLINK_EXPANSION_PORT"
    if pid_alive "$EDIR/$name.pid"; then
      if port_open "$port"; then
        echo "$name: running pid=$(cat "$EDIR/$name.pid") address=127.0.0.1:$port health=ok"; ok=$((ok + 1))
      else echo "$name: running pid=$(cat "$EDIR/$name.pid") address=127.0.0.1:$port health=failing"; fi
    else
      echo "$name: stopped (address would be 127.0.0.1:$port)"; stopped=$((stopped + 1))
    fi
  done
  (( ok == 2 )) && return 0
  (( stopped == 2 )) && return 3
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: scripts/expansion.sh start|stop|status" ;;
esac
