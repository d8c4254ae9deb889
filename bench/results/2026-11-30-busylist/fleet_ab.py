"""Interleaved A/B of the fleet section's request rows: Envoy CPU per request with a busy
synthetic fleet of N workers (every worker in the near-best band), this build vs a baseline
filter, rounds in random order. Usage (repository root):
    GPUHA_BENCH_TARGET=target GPUHA_BENCH_NO_INSTALL=1 fleet_ab.py ROUNDS N[,N...] NAME=WASM ..."""
from pathlib import Path
import random, statistics, sys, time
sys.path.insert(0, str(Path(__file__).resolve().parents[3])); sys.path.insert(0, str(Path(__file__).resolve().parents[3]) + "/bench")
from gpuha_bench import common as c

rounds, sizes = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
builds = [a.split("=", 1) for a in sys.argv[3:]]
_, w = c.fake_worker("fab-w")
res = {}
for n in sizes:
    dp, ingest, http, _ = c.dnsd(cpu=c.LOAD_CPU)
    kp, _ = c.PROCS.start("fab-keepalive", [c.TOOL, "keepalive", "--to", ingest, "--key-file", c.make_key(), "--workers", n,
                                            "--hz", "2", "--model", "tiny", "--steady", "0"], cpu=c.LOAD_CPU, wait="READY")
    c.fleet_ready(http, n, timeout=30)
    for r in range(rounds):
        order = builds[:]
        random.shuffle(order)
        for name, wasm in order:
            ep, port, admin, _ = c.envoy("fab-envoy", [w], http, picker_config={"poll_interval_ms": 500},
                                         extra_render=["--access-log", "/dev/null"], wasm=wasm)
            c.one_request(port, False, timeout=5)
            time.sleep(2.0)
            row = {}
            for rate in (0, 20):
                c0, t0, sent = c.cpu_seconds_fine(ep.pid), time.time(), 0
                while time.time() - t0 < 6.0:
                    if rate:
                        try:
                            c.one_request(port, False, timeout=5)
                            sent += 1
                        except Exception:  # noqa: BLE001
                            pass
                        time.sleep(1.0 / rate)
                    else:
                        time.sleep(0.1)
                el = time.time() - t0
                row[rate] = ((c.cpu_seconds_fine(ep.pid) - c0) / el * 1e3, sent / el)
            per = (row[20][0] - row[0][0]) / max(row[20][1], 1e-9)
            res.setdefault((n, name), []).append(per)
            import os
            print(f"r{r} n={n:5d} {name:9s} idle {row[0][0]:6.2f} ms/s, {row[20][1]:4.1f} req/s {row[20][0]:6.2f} ms/s: {per:5.2f} ms/request (load {os.getloadavg()[0]:.1f})", flush=True)
            c.PROCS.stop(ep)
    c.PROCS.stop(kp)
    c.PROCS.stop(dp)
c.PROCS.stop_all()
print("\nmedian Envoy CPU ms per request (request-path cost over the idle poll cost):")
for n in sizes:
    print(f"  n={n:5d} " + "  ".join(f"{name}={statistics.median(res[(n, name)]):.2f} (of {len(res[(n, name)])})" for name, _ in builds))
