"""Interleaved A/B of filter builds: Envoy CPU µs/request (median of rounds).
Usage: ab.py ROUNDS MODES(json,stream,paced) NAME=SPEC ...
SPEC: nowasm (Envoy without a filter); router (vllm-router, round robin, no Envoy); wasm (the gpuha Wasm filter); a .wasm path (another build of it);
native:DIR (the native filter, DIR empty: the target's); nempty (the native floor pair doing nothing); nfloor / ncall (the native floor pair without /
with the gpuha filter's Envoy calls); ndecide (ncall with the filter's pure decisions run on what the calls read); wfloor / wcall (the same with the Proxy-Wasm floor module);
floor:JSON (the Proxy-Wasm floor module with those configurations).
Prints each variant's median and, per mode, the median of each round's ratio to the first variant
(read that one for a ratio: it is paired within a round)."""
from pathlib import Path
import os, random, statistics, sys, json
sys.path.insert(0, str(Path(__file__).resolve().parents[3])); sys.path.insert(0, str(Path(__file__).resolve().parents[3]) + "/bench")
from gpuha_bench import common as c
rounds, modes = int(sys.argv[1]), sys.argv[2].split(",")
vs = [a.split("=", 1) for a in sys.argv[3:]]
FLOOR = str(c.TARGET / "wasm32-wasip1/release/gpuha_wasm_floor.wasm")
res = {}
for paced in sorted({m == "paced" for m in modes}):
    tps = 1000 if paced else 0
    _, w1 = c.fake_worker(f"a{int(paced)}", tokens_per_s=tps); _, w2 = c.fake_worker(f"b{int(paced)}", tokens_per_s=tps)
    _, ingest, http, _ = c.dnsd(name=f"dnsd{int(paced)}")
    c.sidecar(f"a{int(paced)}", w1, ingest); c.sidecar(f"b{int(paced)}", w2, ingest)
    c.fleet_ready(http, 2)
    ms = [m for m in modes if (m == "paced") == paced]
    for r in range(rounds):
        order = vs[:]; random.shuffle(order)
        for name, spec in order:
            kw = dict(picker_config=c.NO_BREAKER, guard_config=c.NO_BREAKER)
            if spec == "nowasm":
                kw["variant"] = "nowasm"
            elif spec.startswith("floor:"):
                cfgs = json.loads(spec[6:])
                kw.update(variant=cfgs.get("variant", "filter"), wasm=FLOOR, picker_config=cfgs.get("picker", {}), guard_config=cfgs.get("guard", {}))
                if "runtime" in cfgs: kw["extra_render"] = ("--wasm-runtime", cfgs["runtime"])
            elif spec in ("wfloor", "wcall"):
                pc = {"pause_request": True, "endpoints": f"{w1},{w2}"}; gc = {"hold_response": True}
                if spec == "wcall": pc["calls"] = "picker"; gc["calls"] = "guard"
                kw.update(variant="filter", wasm=FLOOR, picker_config=pc, guard_config=gc)
            elif spec == "nempty":
                from gpuha_bench.l7_floor import native_floor
                kw.update(variant="native", picker_config={}, guard_config={}, edit=native_floor)
            elif spec in ("nfloor", "ncall", "ndecide"):
                from gpuha_bench.l7_floor import native_floor
                pc = {"pause_request": True, "endpoints": f"{w1},{w2}"}; gc = {"hold_response": True}
                if spec != "nfloor": pc["calls"] = "picker"; gc["calls"] = "guard"
                if spec == "ndecide": pc["decide"] = gc["decide"] = True
                kw.update(variant="native", picker_config=pc, guard_config=gc, edit=native_floor)
            elif spec.startswith("native:"):
                kw.update(variant="native", native_dir=spec[7:] or None)
            elif spec == "wasm":
                kw.update(variant="filter")
            else:
                kw.update(variant="filter", wasm=spec)
            if spec == "router":
                p, port = c.vllm_router([w1, w2])
            else:
                p, port, admin, _ = c.envoy(f"ab-{name}", [w1, w2], http, **kw)
            try:
                for m in ms:
                    stream = m != "json"
                    c.wrk(port, stream, 4, 1)
                    c0 = c.cpu_seconds_fine(p.pid)
                    s = c.wrk(port, stream, 32, 3 if not paced else 4)
                    c1 = c.cpu_seconds_fine(p.pid)
                    v = (c1 - c0) / max(s["requests"], 1) * 1e6
                    res.setdefault((name, m), []).append((v, s["rps"], s["errors"]))
                    print(f"r{r} {name:10s} {m:6s} {v:7.1f} us/req {s['rps']:8.0f} rps err {s['errors']}", flush=True)
            finally:
                c.PROCS.stop(p)
    c.PROCS.stop_all()
print("\nmedians:")
for m in modes:
    base = None
    for name, _ in vs:
        xs = res.get((name, m), [])
        if not xs: continue
        med = statistics.median(x[0] for x in xs)
        if base is None: base = med
        print(f"{m:6s} {name:10s} cpu {med:7.1f} us/req (min {min(x[0] for x in xs):6.1f})  over first {med-base:+6.1f}  rps {statistics.median(x[1] for x in xs):8.0f}  err {sum(x[2] for x in xs)}")
# Each round's ratio to the first variant of the same round, then their median and quartiles: the
# machine's drift between rounds (this VM's no-filter cost moved 226-377 us between rounds of one
# run) cancels within a round, where a ratio of medians taken over different rounds keeps it.
def per_round(title, at):
    """Each round's ratio of field `at` (0: CPU per request, 1: req/s) to the first variant's."""
    print(f"\n{title} (median [quartiles]):")
    for m in modes:
        first = vs[0][0]
        for name, _ in vs[1:]:
            a, b = res.get((name, m), []), res.get((first, m), [])
            rs = sorted(x[at] / y[at] for x, y in zip(a, b) if y[at])
            if len(rs) < 2: continue
            q1, _, q3 = statistics.quantiles(rs, n=4)
            print(f"{m:6s} {name:10s} {statistics.median(rs):.3f}x [{q1:.3f} {q3:.3f}] over {len(rs)} rounds")
per_round("per-round ratios to the first variant", 0)
# The same for throughput (req/s at wrk's 32 connections).
per_round("per-round throughput ratios to the first variant", 1)
# Best of the rounds over the first variant's best: a shared VM's noise only slows a run down.
print("\nbest of the rounds over the first variant's best (req/s, CPU per request):")
for m in modes:
    first = res.get((vs[0][0], m), [])
    for name, _ in vs[1:]:
        xs = res.get((name, m), [])
        if not xs or not first: continue
        print(f"{m:6s} {name:10s} {max(x[1] for x in xs) / max(y[1] for y in first):.3f}x req/s  {min(x[0] for x in xs) / min(y[0] for y in first):.3f}x CPU")
