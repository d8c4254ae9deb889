#!/usr/bin/env python3
"""The training load of the profile-guided native filter build (`native/pgo.sh`).

Usage: bench/pgo_train.py DIR [SECONDS]

Starts, as the bench's L7 rows do (its harness, on 127.0.0.1, every process stopped by PID):
two fake vLLM workers that answer at once and two that stream one token a millisecond (one SSE
event per body chunk), their sidecars, a dnsd, and stock Envoy with the native filter found in
DIR (an instrumented `libgpuha_native.so`). wrk then sends chat requests for SECONDS each (default
8): json answers, whole streams, paced streams. Envoy stops cleanly at the end, and the profile
runtime in the module writes its counts where the build told it to (`-Cprofile-generate`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: gpuha_harness
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpuha_bench

from gpuha_bench.common import NO_BREAKER, PROCS, envoy, worker_pair, wrk  # noqa: E402


def main():
    if len(sys.argv) not in (2, 3) or not (Path(sys.argv[1]) / "libgpuha_native.so").is_file():
        sys.exit(__doc__)
    native_dir, secs = Path(sys.argv[1]).resolve(), int(sys.argv[2]) if len(sys.argv) == 3 else 8
    try:
        for paced in (False, True):
            w1, w2, http = worker_pair(f"train{int(paced)}w", tokens_per_s=1000 if paced else 0, dnsd_name=f"dnsd-train{int(paced)}")
            # The configuration of the bench's filter rows (the breaker's threshold out of a
            # saturating load's way; the same code runs).
            proxy, port, _, _ = envoy(f"envoy-train{int(paced)}", [w1, w2], http, variant="native",
                                      picker_config=NO_BREAKER, guard_config=NO_BREAKER, native_dir=native_dir)
            for stream in ((True,) if paced else (False, True)):
                r = wrk(port, stream, 32, secs)
                print(f"pgo_train: {'paced stream' if paced else 'stream' if stream else 'json'}: "
                      f"{r['requests']} requests, {r['errors']} errors", flush=True)
                if not r["requests"]:
                    sys.exit("pgo_train: no request completed: no profile worth building from")
            # A clean stop: Envoy exits, and the module's counts are written.
            PROCS.stop(proxy, timeout=30)
    finally:
        PROCS.stop_all()


if __name__ == "__main__":
    main()
