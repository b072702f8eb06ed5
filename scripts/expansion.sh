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

start() {
  local name port jar
  for name in expansion expansion-flink; do
    port="$EXPANSION_PORT"; jar="$MAIN_JAR"
    [[ "$name" == expansion-flink ]] && port="$FLINK_EXPANSION_PORT" && jar="$FLINK_JAR"
    [[ -f "$jar" ]] || die "$jar missing: run scripts/install_tools.sh"
    start_java "$name" "$port" "$EDIR" -Xmx"$EXPANSION_HEAP" -jar "$jar" "$port" \
      --filesToStage="$jar" --alsoStartLoopbackWorker
  done
  wait_java expansion "$EXPANSION_PORT" "$EDIR" "${EXPANSION_START_TIMEOUT:-90}"
  wait_java expansion-flink "$FLINK_EXPANSION_PORT" "$EDIR" "${EXPANSION_START_TIMEOUT:-90}"
}

stop() {
  stop_pid expansion-flink "$EDIR/expansion-flink.pid"
  stop_pid expansion "$EDIR/expansion.pid"
}

status() {
  local ok=0 stopped=0 code name_port
  for name_port in "expansion $EXPANSION_PORT" "expansion-flink $FLINK_EXPANSION_PORT"; do
    code=0; java_status $name_port "$EDIR" || code=$?
    (( code == 0 )) && ok=$((ok + 1))
    (( code == 3 )) && stopped=$((stopped + 1))
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
