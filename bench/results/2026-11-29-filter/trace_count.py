"""Counts VM entries ([host->vm]) and host calls ([vm->host]) per request of a filter build, from
Envoy's wasm:trace log. Usage: trace_count.py WASM [WASM...]"""
from pathlib import Path
import collections, os, re, sys, time
sys.path.insert(0, str(Path(__file__).resolve().parents[3])); sys.path.insert(0, str(Path(__file__).resolve().parents[3]) + "/bench")
from gpuha_bench import common as c

def n_req(n):
    return n

def counts(log, start):
    txt = open(log, errors="replace").read()[start:]
    e = collections.Counter(re.findall(r"\[host->vm\] (\w+)", txt))
    h = collections.Counter(re.findall(r"\[vm->host\] (?:env\.)?(\w+)", txt))
    return e, h

def main():
    paced = os.environ.get("PACED") == "1"
    _, w1 = c.fake_worker("t1", tokens_per_s=1000 if paced else 0)
    _, w2 = c.fake_worker("t2", tokens_per_s=1000 if paced else 0)
    _, ingest, http, _ = c.dnsd()
    c.sidecar("t1", w1, ingest); c.sidecar("t2", w2, ingest)
    c.fleet_ready(http, 2)
    for wasm in sys.argv[1:]:
        p, port, admin, _ = c.envoy("tr", [w1, w2], http, picker_config=c.NO_BREAKER, guard_config=c.NO_BREAKER, wasm=wasm)
        c.PROCS.stop(p)
        cfg = c.WORK / "tr.yaml"
        p, _ = c.PROCS.start("trenv", [c.envoy_bin(), "-c", cfg, "--concurrency", 1, "--log-level", "warn",
                                        "--component-log-level", "wasm:trace", "--base-id", port], cpu=c.SUT_CPU)
        c.wait_http(f"http://127.0.0.1:{admin}/ready", timeout=30)
        err = c.WORK / "trenv.err"
        for _ in range(3):
            c.one_request(port, False); c.one_request(port, True)
        time.sleep(1.5)
        for stream in (False, True):
            off = err.stat().st_size
            n = 5
            for _ in range(n):
                dt, st, body = c.one_request(port, stream)
                assert st == 200, body[:300]
            time.sleep(0.3)
            e, h = counts(err, off)
            if os.environ.get("SEQ"):
                txt = open(err, errors="replace").read()[off:]
                seq = re.findall(r"\[(host->vm|vm->host)\] (?:env\.)?(\w+)", txt)
                print(" ".join(("\n>" + n) if d == "host->vm" and n != "proxy_on_memory_allocate" else ("+m" if n == "proxy_on_memory_allocate" else n.replace("proxy_", "")) for d, n in seq[: len(seq) // n_req(n)]))
            print(f"\n== {os.path.basename(wasm)} stream={stream}: per request: VM entries {sum(e.values())/n:.1f}, host calls {sum(h.values())/n:.1f}")
            print("  entries:", ", ".join(f"{k}={v/n:g}" for k, v in e.most_common()))
            print("  hostcalls:", ", ".join(f"{k}={v/n:g}" for k, v in h.most_common()))
        c.PROCS.stop(p)
    c.PROCS.stop_all()

main()
