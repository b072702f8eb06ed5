#!/usr/bin/env bash
# Beam's Flink job server, kept running: what FlinkRunner pipelines submit to, without a
# JVM started (and warmed up) for every pipeline.
#
#   scripts/jobserver.sh start|stop|status
#
# The job server jar scripts/install_tools.sh built, listening for jobs on
# JOB_SERVER_PORT (default 8099; its artifact service and its own expansion service on
# ports the OS picks). A job runs where its --flink_master says: [local] (or [auto], the
# default) in a Flink mini cluster inside this JVM, HOST:PORT on that Flink cluster.
# Use it with SOURCEBEAM_FLINK_JOB_SERVER=127.0.0.1:$JOB_SERVER_PORT in the environment
# (FlinkRunner pipelines then get --job_endpoint; see pipelines/runners.py).
# State (log, pid, staged artifacts): $SOURCEBEAM_STATE_DIR/jobserver (default
# .cache/services/jobserver). Heap: JOB_SERVER_HEAP (default 1536m; embedded jobs run in it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

JOB_SERVER_PORT="${JOB_SERVER_PORT:-8099}"
JOB_SERVER_HEAP="${JOB_SERVER_HEAP:-1536m}"
JDIR="$STATE_DIR/jobserver"
JAR="$JARS/beam-runners-flink-1.19-job-server-2.70.0.jar"

start() {
  [[ -f "$JAR" ]] || die "$JAR missing: run scripts/install_tools.sh"
  mkdir -p "$JDIR/artifacts"
  start_java jobserver "$JOB_SERVER_PORT" "$JDIR" -Xmx"$JOB_SERVER_HEAP" -jar "$JAR" \
    --job-host 127.0.0.1 --job-port "$JOB_SERVER_PORT" --artifact-port 0 --expansion-port 0 \
    --artifacts-dir "$JDIR/artifacts" --flink-master '[auto]'
  wait_java jobserver "$JOB_SERVER_PORT" "$JDIR" "${JOB_SERVER_START_TIMEOUT:-90}"
}

case "${1:-}" in
  start) start ;;
  stop) stop_pid jobserver "$JDIR/jobserver.pid" ;;
  status) java_status jobserver "$JOB_SERVER_PORT" "$JDIR" ;;
  *) die "usage: scripts/jobserver.sh start|stop|status" ;;
esac
