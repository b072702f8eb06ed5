#!/usr/bin/env bash
# Installs what Sourcebeam's runners and local services need, under .cache/:
#   .cache/bin/prism                      Beam's Prism runner, built from the Go module proxy
#   .cache/jars/beam-runners-flink-1.19-job-server-2.70.0.jar   Beam's Flink job server (shaded here)
#   .cache/jars/beam-sdks-java-io-expansion-service-2.70.0.jar  Beam's Java IO expansion service (Kafka)
#   .cache/jars/beam-sdks-java-io-expansion-service-2.70.0-flink.jar  its launcher for Flink pipelines
#   .cache/jars/kafka/*.jar               the Apache Kafka 4.1.1 broker (KRaft) and its tools
#   .cache/flink-1.19.0/pyflink/{lib,bin} the Flink 1.19.0 distribution jars (PyPI apache-flink-libraries)
#
# Idempotent: each part is skipped when its output exists and its recipe (version or
# pom.xml) has not changed, so a second run takes a second or two. Exits non-zero with
# a message naming the part that failed.
#
# Why Flink 1.19 and Beam 2.70 on the Java side (the Python SDK is 2.77): the
# Maven Central reachable here serves no shaded Beam job-server or IO expansion-service
# jar for any recent version, and of the unshaded Flink runners only
# beam-runners-flink-1.19 at 2.70.0; scripts/maven/*/pom.xml shade them from parts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
PRISM_VERSION="${PRISM_VERSION:-v2.77.0}"
FLINK_VERSION="${FLINK_VERSION:-1.19.0}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

log() { echo "[install_tools $(date +%H:%M:%S)] $*" >&2; }
die() { echo "install_tools: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH ($2)"; }

need go "Go is needed to build Prism"
need java "a JDK 17 is needed for Kafka, Flink and the Beam Java services"
need mvn "Maven is needed to fetch the Java artifacts from Maven Central"
need curl "curl is used by the service health checks"
mkdir -p "$CACHE/bin" "$CACHE/jars" "$CACHE/stamps"
t_all=$SECONDS

# --- Prism -------------------------------------------------------------------
install_prism() {
  local stamp="$CACHE/stamps/prism" want="prism@$PRISM_VERSION"
  if [[ -x "$CACHE/bin/prism" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
    log "prism $PRISM_VERSION: present"; return 0
  fi
  log "prism $PRISM_VERSION: building with go install (a few minutes on a cold Go cache)"
  local t=$SECONDS
  GOBIN="$CACHE/bin" \
    go install "github.com/apache/beam/sdks/v2/go/cmd/prism@$PRISM_VERSION" \
    || die "go install of prism $PRISM_VERSION failed"
  [[ -x "$CACHE/bin/prism" ]] || die "prism binary missing after go install"
  echo "$want" > "$stamp"
  log "prism: built in $((SECONDS - t))s -> $CACHE/bin/prism"
}

# --- Java artifacts from Maven Central ----------------------------------------
# mvn_part NAME OUTPUT: build scripts/maven/NAME (pom.xml and any sources) unless OUTPUT
# exists and the module is unchanged since the last successful build.
mvn_part() {
  local name="$1" output="$2" dir="$ROOT/scripts/maven/$1"
  local pom="$dir/pom.xml" stamp="$CACHE/stamps/maven-$name" sum
  sum="$(cd "$dir" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
  if [[ -e "$output" && "$(cat "$stamp" 2>/dev/null)" == "$sum" ]]; then
    log "maven $name: present"; return 0
  fi
  log "maven $name: resolving from Maven Central and packaging (a few minutes cold)"
  local t=$SECONDS logf="$CACHE/stamps/maven-$name.log"
  [[ "$name" == kafka-broker ]] && rm -rf "$CACHE/jars/kafka"  # no stale jars on its classpath
  if ! mvn -B -q -f "$pom" package >"$logf" 2>&1; then
    grep -E 'ERROR' "$logf" | head -20 >&2 || tail -20 "$logf" >&2
    die "maven build of $name failed (full log: $logf)"
  fi
  [[ -e "$output" ]] || die "maven $name finished but $output is missing"
  echo "$sum" > "$stamp"
  log "maven $name: done in $((SECONDS - t))s"
}

# --- Flink distribution --------------------------------------------------------
install_flink() {
  local dest="$CACHE/flink-$FLINK_VERSION"
  if [[ -f "$dest/pyflink/lib/flink-dist-$FLINK_VERSION.jar" && -f "$dest/pyflink/bin/bash-java-utils.jar" ]]; then
    log "flink $FLINK_VERSION distribution: present"; return 0
  fi
  log "flink $FLINK_VERSION distribution: pip install apache-flink-libraries==$FLINK_VERSION"
  local t=$SECONDS tmp="$dest.partial"
  rm -rf "$tmp"
  # --target and --no-deps: a private directory, so it cannot touch apache-beam's dependencies.
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
    "apache-flink-libraries==$FLINK_VERSION" || die "pip install apache-flink-libraries==$FLINK_VERSION failed"
  [[ -f "$tmp/pyflink/lib/flink-dist-$FLINK_VERSION.jar" ]] || die "flink-dist-$FLINK_VERSION.jar missing from apache-flink-libraries"
  rm -rf "$dest"; mv "$tmp" "$dest"
  log "flink: installed in $((SECONDS - t))s -> $dest/pyflink"
}

# flink_launcher: a manifest-only jar that starts the IO expansion service with the
# Flink-specific main class (see FlinkExpansionServiceMain.java) and the shaded jar beside
# it on its Class-Path; pipelines/runners.py hands it to FlinkRunner pipelines.
flink_launcher() {
  local main="$CACHE/jars/beam-sdks-java-io-expansion-service-2.70.0.jar"
  local out="$CACHE/jars/beam-sdks-java-io-expansion-service-2.70.0-flink.jar"
  if [[ -f "$out" && "$out" -nt "$main" ]]; then log "flink expansion launcher: present"; return 0; fi
  "$PYTHON" - "$out" "$(basename "$main")" <<'PY' || die "could not write the Flink expansion launcher jar"
import sys, zipfile
out, class_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out + '.tmp', 'w') as z:
  z.writestr('META-INF/MANIFEST.MF', 'Manifest-Version: 1.0\n'
             'Main-Class: sourcebeam.tools.FlinkExpansionServiceMain\n'
             f'Class-Path: {class_path}\n')
import os
os.replace(out + '.tmp', out)
PY
  log "flink expansion launcher: written -> $out"
}

install_prism
install_flink
mvn_part kafka-broker "$CACHE/jars/kafka/kafka_2.13-4.1.1.jar"
mvn_part io-expansion-service "$CACHE/jars/beam-sdks-java-io-expansion-service-2.70.0.jar"
flink_launcher
mvn_part flink-job-server "$CACHE/jars/beam-runners-flink-1.19-job-server-2.70.0.jar"
log "all tools ready in $((SECONDS - t_all))s"
