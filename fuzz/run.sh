#!/usr/bin/env bash
# Builds and runs the fuzz targets with libFuzzer, on stable Rust (no cargo-fuzz needed).
#
#   fuzz/run.sh smoke            every target for SMOKE_SECS (default 10) seconds each
#   fuzz/run.sh long             every target for LONG_RUNS (default 10 000 000) executions
#   fuzz/run.sh run TARGET [ARGS...]   one target, libFuzzer ARGS (e.g. -runs=1000, a crash file)
#   fuzz/run.sh build            only build
#
# The instrumentation is what `cargo fuzz build -s none` asks rustc for (SanitizerCoverage,
# `--cfg fuzzing`, debug assertions and overflow checks), passed through RUSTFLAGS, all stable
# flags. `--target` keeps them off build scripts and proc macros, which are not linked with
# libFuzzer. Seeds are written to seeds/TARGET by make_seeds.py; what the fuzzer finds grows corpus/TARGET;
# crashes are written to artifacts/TARGET/ and make the run fail.
set -euo pipefail
cd "$(dirname "$0")"

# LONG_TARGETS="a b" (environment) limits `long` to some targets.
read -r -a LONG_TARGETS <<< "${LONG_TARGETS:-}"
TARGETS=(frame_decode frame_mutate attempt sse_output request_scan sidecar_metrics dns_respond config_parse fleet_wire)
HOST=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
BIN="$CARGO_TARGET_DIR/$HOST/release"

build() {
    local t0=$SECONDS
    # Seeds come from the repository's captures and test batteries (not committed twice).
    python3 make_seeds.py
    cargo build --release --locked --target "$HOST" --bins
    echo "fuzz: built in $((SECONDS - t0)) s"
}

# Per-target libFuzzer options. The captures are up to 100 KB, and libFuzzer's default input
# limit is the largest seed: the SSE scanners are bounded to 8 KB inputs (a few events, at
# ~30x the speed); the sidecar's seeds are ~3 KB excerpts of /metrics pages (the lines the
# mapping reads and some the filter skips), so 8 KB leaves room to grow.
opts() {
    case $1 in
        sse_output) echo "-max_len=8192" ;;
        sidecar_metrics) echo "-max_len=8192" ;;
        *) echo "-max_len=4096" ;;
    esac
}

# run TARGET ARGS...: one libFuzzer run over corpus/TARGET (grown) and seeds/TARGET (read).
run() {
    local t=$1
    shift
    mkdir -p "corpus/$t" "artifacts/$t"
    # shellcheck disable=SC2046
    "$BIN/$t" "corpus/$t" "seeds/$t" -artifact_prefix="artifacts/$t/" -print_final_stats=1 $(opts "$t") "$@"
}

# summary TARGET ARGS...: `run`, printing only its verdict and counts (its log goes to
# artifacts/TARGET/log); fails when the target found a crash.
summary() {
    local t=$1 rc=0
    run "$@" > "artifacts/$t/log" 2>&1 || rc=$?
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^Done|^==[0-9]+== ERROR|^SUMMARY|panicked at' "artifacts/$t/log" | sed "s/^/$t: /"
    if [ "$rc" -ne 0 ]; then
        echo "$t: FAILED (exit $rc); see fuzz/artifacts/$t/log and the crash file it names" >&2
        return "$rc"
    fi
}

case "${1:-smoke}" in
    build)
        build
        ;;
    smoke)
        build
        failed=0
        for t in "${TARGETS[@]}"; do
            mkdir -p "artifacts/$t"
            summary "$t" -max_total_time="${SMOKE_SECS:-10}" || failed=1
        done
        exit "$failed"
        ;;
    long)
        build
        failed=0
        for t in "${LONG_TARGETS[@]:-${TARGETS[@]}}"; do
            mkdir -p "artifacts/$t"
            summary "$t" -runs="${LONG_RUNS:-10000000}" || failed=1
        done
        exit "$failed"
        ;;
    run)
        shift
        build
        run "$@"
        ;;
    *)
        echo "usage: $0 smoke|long|build|run TARGET [libFuzzer args]" >&2
        exit 2
        ;;
esac
