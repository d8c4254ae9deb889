#!/usr/bin/env bash
# The native filter built with profile-guided optimisation (PGO): the same code as
# `cargo build --release -p gpuha-native`, laid out and inlined from counts of a training load, so
# that the few hot paths of a request sit together and the rest out of their way. The module's code
# runs once per request between Envoy's, from cold caches: what it costs Envoy is mostly lines of
# code fetched (bench/results/2026-12-02-pgo/).
#
#   native/pgo.sh        # writes target/pgo/libgpuha_native.so
#
# Then point Envoy at it: ENVOY_DYNAMIC_MODULES_SEARCH_PATH=<repo>/target/pgo (envoy/README.md).
#
# Steps: an instrumented build (its own target dir), the training load (bench/pgo_train.py: stock
# Envoy, fake vLLM workers, sidecars and dnsd on 127.0.0.1; json answers, streams, paced streams;
# ~30 s), `llvm-profdata merge` (rustup's llvm-tools, matching rustc's LLVM; added if missing), the
# optimised build. About 1.5 minutes on 2 cores from a built tree (the two module builds compile
# the module's dependencies again, each in its own target dir).
#
# Needs what the bench's L7 rows need: stock Envoy (deploy/ensure-deps.sh installs it) and wrk.
# Env: GPUHA_PGO_OUT (default target/pgo), GPUHA_PGO_SECS (seconds per training load, default 8),
# CARGO_TARGET_DIR (where the release dnsd, sidecar and fake worker of the training load are built).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${GPUHA_PGO_OUT:-$root/target/pgo}
mkdir -p "$out"
out=$(cd "$out" && pwd)
secs=${GPUHA_PGO_SECS:-8}

command -v wrk >/dev/null || { echo "native/pgo.sh: wrk is missing (apt-get install wrk): the training load needs it" >&2; exit 1; }
host=$(rustc -vV | sed -n 's/^host: //p')
tools="$(rustc --print sysroot)/lib/rustlib/$host/bin"
if [[ ! -x $tools/llvm-profdata ]]; then
  rustup component add llvm-tools
fi

echo "== native/pgo.sh: the training load's binaries (release)"
cargo build -q --release -p gpuha-dnsd -p gpuha-sidecar -p fake-vllm

echo "== native/pgo.sh: the instrumented module ($out/gen)"
rm -rf "$out/profraw"
mkdir -p "$out/profraw"
RUSTFLAGS="-Cprofile-generate=$out/profraw" cargo build -q --release -p gpuha-native --target-dir "$out/gen"
# Build scripts were instrumented too, and wrote their own counts when they ran.
rm -f "$out"/profraw/*

echo "== native/pgo.sh: the training load (${secs} s per load)"
GPUHA_BENCH_TARGET="${CARGO_TARGET_DIR:-$root/target}" python3 bench/pgo_train.py "$out/gen/release" "$secs"
shopt -s nullglob
raw=("$out"/profraw/*.profraw)
if ((${#raw[@]} == 0)); then
  echo "native/pgo.sh: the training load left no profile in $out/profraw (did Envoy exit cleanly?)" >&2
  exit 1
fi
"$tools/llvm-profdata" merge -o "$out/gpuha.profdata" "${raw[@]}"

echo "== native/pgo.sh: the optimised module ($out/use)"
RUSTFLAGS="-Cprofile-use=$out/gpuha.profdata" cargo build -q --release -p gpuha-native --target-dir "$out/use"
cp "$out/use/release/libgpuha_native.so" "$out/libgpuha_native.so"
echo "native/pgo.sh: $out/libgpuha_native.so (ENVOY_DYNAMIC_MODULES_SEARCH_PATH=$out)"
