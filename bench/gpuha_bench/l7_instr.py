"""Instructions per paced streaming request, counted rather than timed: Envoy runs under
valgrind's callgrind (with its cache model), the counters are zeroed after a warm-up and dumped
after a window of paced streams (one SSE event per body chunk), less what an idle window of
the same length counts (periodic work), and every count is divided by the requests completed
in the window. Counts do not move with the machine's
neighbours the way CPU time does: the module's own instructions per request agree within ~1 %
between runs of one build; Envoy's own code moves by up to ~5 % (its event loop batches events
differently from run to run). So they show a change of a few per cent in the module that the
timed `l7_paced` rows cannot. Kernel time is not counted. The Wasm build's rows
(`GPUHA_BENCH_INSTR_WASM=1`, with `GPUHA_BENCH_BASELINE_WASM` beside it) count V8's generated code
too, as Envoy's (its anonymous mappings): two builds of the same code agreed within 0.6 % in one
run, but one build's count moved by up to 8 % between runs (the code V8 generates, and when it
tiers up), so compare Wasm builds within a run only. `GPUHA_BENCH_INSTR_JSON=1` counts the same
variants on json requests too, the `l7` section's json row: the filter's hooks
on a request whose answer is one body. Opt-in: `bench/run.py --only l7_instr` (about 2 minutes a
variant; needs valgrind)."""

import os
import re
import shutil
import subprocess
import time
from collections import Counter

from .common import BASELINE_NATIVE, BASELINE_WASM, NATIVE_PGO, NO_BREAKER, PROCS, WORK, envoy, note, worker_pair, wrk
from .l7_floor import native_floor
from .markdown import Report, fmt

# Events of callgrind's cache model, in its order.
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
TOP = 15
TOKENS_PER_S = 100
IDLE_S = 5
# The floor with the Envoy calls the gpuha filter makes on a request, and no decision (the native
# floor module's `calls`).
CALL_FLOOR = "native call floor: the floor + the gpuha filter's Envoy calls, no decisions"
# The call floor with the filter's pure decisions run on what the calls read (`"decide"`).
DECISION_FLOOR = "native decision floor: the call floor + the filter's decisions, no glue"
CONNS = 4


def parse_callgrind(text):
    """Self cost per (object, function) from a callgrind dump, {(ob, fn): Counter(event: n)},
    the calls made to each function, {fn: n}, the instructions spent inside each function's
    calls, its own and its callees' ({fn: Ir}, from the inclusive cost line that follows each
    `calls=` line; kept apart from the self costs), and the same per call edge
    ({(caller fn, callee fn): Ir}). Handles the name compression (`fn=(id) name`, then `fn=(id)`)."""
    names = {}
    costs = {}
    calls = Counter()
    inclusive = Counter()
    edges = Counter()
    cfn = None
    events = EVENTS
    ob = fn = None
    skip_next = False

    def name(kind, v):
        m = re.match(r"\((\d+)\)(?: (.*))?$", v)
        if not m:
            return v
        if m.group(2) is not None:
            names[(kind, m.group(1))] = m.group(2)
        return names.get((kind, m.group(1)), v)

    for line in text.splitlines():
        if line.startswith("events:"):
            events = tuple(line.split()[1:])
        elif line.startswith("ob="):
            ob = name("ob", line[3:])
        elif line.startswith("fn="):
            fn = name("fn", line[3:])
        elif line.startswith("cob="):
            name("ob", line[4:])
        elif line.startswith(("cfi=", "cfl=")):
            name("fl", line[4:])
        elif line.startswith("cfn="):
            cfn = name("fn", line[4:])
        elif line.startswith(("fl=", "fi=", "fe=")):
            name("fl", line[3:])
        elif line.startswith("calls="):
            skip_next = True
            calls[cfn] += int(line[6:].split()[0])
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()[1:]
            if skip_next:
                skip_next = False
                if parts and "Ir" in events:
                    ir = int(parts[events.index("Ir")])
                    inclusive[cfn] += ir
                    edges[(fn, cfn)] += ir
                continue
            c = costs.setdefault((ob, fn), Counter())
            for e, v in zip(events, parts):
                c[e] += int(v)
    return costs, calls, inclusive, edges


# The Proxy-Wasm SDK's entry points a request runs through (not the configuration's ticks and
# fleet poll: `proxy_on_tick`, `proxy_on_http_call_response`).
SDK_REQUEST_ENTRIES = ("proxy_on_context_create", "proxy_on_request_headers", "proxy_on_request_body", "proxy_on_request_trailers",
                       "proxy_on_response_headers", "proxy_on_response_body", "proxy_on_response_trailers", "proxy_on_log",
                       "proxy_on_done", "proxy_on_delete")
# Calls counted per request: the module's thread-local lookups (a `dlopen`ed library's
# thread-locals go through `__tls_get_addr`: Envoy without a module makes none) and allocations.
COUNTED_CALLS = (("thread-local lookups", "__tls_get_addr"), ("allocations", "__rustc::__rust_alloc"),
                 ("frees", "__rustc::__rust_dealloc"))
SDK_BACKGROUND = ("on_tick", "on_http_call_response", "on_configure", "on_vm_start", "on_queue_ready")


def sdk_account(edges, n):
    """What the Proxy-Wasm SDK itself costs a request of the native build, from the call edges
    (idle window taken out): its dispatcher (the `proxy_on_*` entry points and their context
    lookups, less the filter's methods they call) and its host-call wrappers (each
    `proxy_wasm::hostcalls::*` call from outside the SDK, less the native host's `proxy_*`
    function it calls: the argument encoding, the copies and allocations of the answers, their
    UTF-8 checks). What a glue written directly on the dynamic-modules ABI would not run, with the
    filter's code and the host's work the same; the host's own emulation of Proxy-Wasm (its
    contexts, shared data as bytes) is counted with the native host."""
    def sdk(fn):
        return fn.startswith(("proxy_on_", "proxy_wasm::dispatcher::"))
    def filter_code(fn):
        return fn.lstrip("<").startswith("gpuha_filter::")
    def wrapper(fn):
        return fn.startswith("proxy_wasm::hostcalls::")
    def host_import(fn):
        return fn.startswith("proxy_") and not fn.startswith(("proxy_on_", "proxy_wasm::"))
    entries = sum(ir for (c, f), ir in edges.items() if f in SDK_REQUEST_ENTRIES and not sdk(c))
    into_filter = sum(ir for (c, f), ir in edges.items() if sdk(c) and filter_code(f) and not any(b in c for b in SDK_BACKGROUND))
    wrapped = sum(ir for (c, f), ir in edges.items() if wrapper(f) and not wrapper(c))
    hosted = sum(ir for (c, f), ir in edges.items() if wrapper(c) and host_import(f))
    return {"dispatcher": (entries - into_filter) / n, "host_call_wrappers": (wrapped - hosted) / n}


# The module's hooks a request runs through (a stream's filter: not the configuration's ticks and
# fleet poll, which the idle window takes out anyway). A hook that runs inside another (a local
# reply sent from a request hook runs the response hooks) is counted in both: the paced streams
# measured here send none.
def is_request_hook(fn):
    return (fn or "").startswith("envoy_dynamic_module_on_http_filter_") and "_config_" not in fn


# The module's code by layer, from each function's symbol (its crate path; the leading `<` of a
# trait method's symbol skipped). Approximate where code was inlined across crates: a function's
# cost goes to the crate it was inlined into.
LAYERS = (("decisions", "gpuha-liveness and the searches it calls (memchr, serde_json)"),
          ("filter glue", "gpuha-filter: the Proxy-Wasm filter around the decisions"),
          ("Proxy-Wasm layer", "the Proxy-Wasm SDK and the native host's `proxy_*` ABI it calls"),
          ("native host", "gpuha-native: the dynamic-module hooks, Envoy calls, shared data, contexts"),
          ("allocation", "`__rust_alloc`/`__rust_dealloc`, the module's allocator, vectors growing"),
          ("std, other", "Rust's std/core (UTF-8 checks, hashing, thread-local access) and the rest"))


def layer(fn):
    """The `LAYERS` name of one of the module's functions."""
    f = (fn or "").lstrip("<")
    if f.startswith(("__rustc::__rust_alloc", "__rustc::__rust_dealloc", "__rustc::__rust_realloc", "gpuha_native::alloc::",
                     "alloc::raw_vec::", "alloc::alloc::")):
        return "allocation"
    if f.startswith(("gpuha_liveness::", "memchr::", "serde_json::")):
        return "decisions"
    if f.startswith("gpuha_filter::"):
        return "filter glue"
    if f.startswith(("proxy_wasm::", "proxy_")):
        return "Proxy-Wasm layer"
    if f.startswith(("gpuha_native::", "envoy_dynamic_module_")):
        return "native host"
    return "std, other"


def where(ob):
    """Whose code an object is: Envoy's (its binary, and the anonymous mapping `???` where Envoy
    moves its hot code, its allocator among it), the module's, or the C library and the rest."""
    ob = ob or "???"
    if ob.endswith("/envoy") or ob == "???":
        return "envoy"
    if "libgpuha_native" in ob:
        return "module"
    return "libc and other"


def floors(endpoints):
    """The native floor pair's three variants (see `sec_l7_instr`) naming `endpoints`: the picker's
    and the guard's Envoy-side behaviour, then with their calls too (the call floor), then with the
    filter's pure decisions run on what the calls read (the decision floor)."""
    behaviours = {"pause_request": True, "endpoints": endpoints}
    return [("native floor: pause + endpoints, upstream holds the answer", "native", behaviours, {"hold_response": True}, native_floor, None, None),
            (CALL_FLOOR, "native", {**behaviours, "calls": "picker"}, {"hold_response": True, "calls": "guard"}, native_floor, None, None),
            (DECISION_FLOOR, "native", {**behaviours, "calls": "picker", "decide": True}, {"hold_response": True, "calls": "guard", "decide": True},
             native_floor, None, None)]


def sec_l7_instr(R, quick):
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise RuntimeError("valgrind (with callgrind_control) missing: apt-get install valgrind")
    secs = 8 if quick else 15
    # Tokens slow enough that Envoy under valgrind still gets one event per body chunk.
    w1, w2, http = worker_pair("iw", tokens_per_s=TOKENS_PER_S, dnsd_name="dnsd-instr")
    # (label, Envoy variant, picker config, guard config, config edit, native build dir, Wasm module,
    # request: paced streams, or json answers of workers that answer at once)
    variants = [("envoy (no filter)", "nowasm", None, None, None, None, None),
                *floors(f"{w1},{w2}"),
                ("envoy+filter (native)", "native", NO_BREAKER, NO_BREAKER, None, None, None)]
    if BASELINE_NATIVE:
        variants.append(("envoy+filter (native, baseline)", "native", NO_BREAKER, NO_BREAKER, None, BASELINE_NATIVE, None))
    if NATIVE_PGO:
        variants.append(("envoy+filter (native, PGO)", "native", NO_BREAKER, NO_BREAKER, None, NATIVE_PGO, None))
    if os.environ.get("GPUHA_BENCH_INSTR_WASM"):
        variants.append(("envoy+filter (Wasm)", "filter", NO_BREAKER, NO_BREAKER, None, None, None))
        if BASELINE_WASM:
            variants.append(("envoy+filter (Wasm, baseline)", "filter", NO_BREAKER, NO_BREAKER, None, None, BASELINE_WASM))
    variants = [v + ("paced",) for v in variants]
    if os.environ.get("GPUHA_BENCH_INSTR_JSON"):
        # The json row of `l7` (throughput at saturation): the same variants on json requests to two
        # workers that answer at once.
        # Their own dnsd: a fleet view with the paced workers in it would offer those too.
        j1, j2, jhttp = worker_pair("ij", dnsd_name="dnsd-instr-json")
        json_floors = {f[0]: f for f in floors(f"{j1},{j2}")}
        variants += [json_floors.get(v[0], v[:-1]) + ("json",) for v in variants]
    rows = []
    for label, kind, pcfg, gcfg, edit, ndir, wasm, req in variants:
        name = f"envoy-instr-{len(rows)}"
        stream, workers, fleet = (True, [w1, w2], http) if req == "paced" else (False, [j1, j2], jhttp)
        out = WORK / f"{name}.callgrind"
        wrap = ("valgrind", "--tool=callgrind", "--cache-sim=yes", f"--callgrind-out-file={out}")
        proxy, port, _, _ = envoy(name, workers, fleet, variant=kind, picker_config=pcfg, guard_config=gcfg, edit=edit,
                                  native_dir=ndir, wasm=wasm, wrap=wrap, ready_s=300)
        ctl = lambda op: subprocess.run(["callgrind_control", op, str(proxy.pid)], check=True, capture_output=True, timeout=60)
        try:
            # A warm-up (V8 compiles the module's hot code in its optimizing tier meanwhile).
            wrk(port, stream, 4, 10 if kind == "filter" else 2)
            # An idle window first: what Envoy and the filter do on their own (stats flushes, the
            # fleet poll and its ticks), taken out of the loaded window at its length. Under
            # valgrind the load is a few dozen requests a second, so that periodic work would
            # otherwise be charged to each request many times over what it is at full speed.
            ctl("--zero")
            t0 = time.monotonic()
            time.sleep(IDLE_S)  # a measurement window, not a wait for readiness
            ctl("--dump")
            idle_s = time.monotonic() - t0
            ctl("--zero")
            t1 = time.monotonic()
            sat = wrk(port, stream, CONNS, secs, timeout="30s")
            load_s = time.monotonic() - t1
            ctl("--dump")
        finally:
            PROCS.stop(proxy, timeout=30)
        dumps = {p.name.rsplit(".", 1)[-1]: p for p in WORK.glob(f"{name}.callgrind.*")}
        if not {"1", "2"} <= dumps.keys() or not sat["requests"]:
            raise RuntimeError(f"{label}: no callgrind dumps or no request ({sorted(dumps)}, {sat['requests']})")
        idle, idle_calls, idle_incl, idle_edges = parse_callgrind(dumps["1"].read_text(errors="replace"))
        costs, calls, incl, edges = parse_callgrind(dumps["2"].read_text(errors="replace"))
        scale = load_s / idle_s
        for k, ir in idle_edges.items():
            edges[k] -= ir * scale
        for k, c in idle.items():
            left = costs.setdefault(k, Counter())
            for e, v in c.items():
                left[e] -= v * scale
        n = sat["requests"]
        total = Counter()
        by_where = Counter()
        for (ob, _), c in costs.items():
            total.update(c)
            by_where[where(ob)] += c["Ir"]
        top = sorted(((fn, c["Ir"] / n) for (ob, fn), c in costs.items() if where(ob) == "module"), key=lambda x: -x[1])[:TOP]
        row = {"variant": label, "request": req, "requests": n, "errors": sat["errors"],
               "per_request": {e: total[e] / n for e in EVENTS},
               "idle_ir_per_s": sum(c["Ir"] for c in idle.values()) / idle_s,
               "ir_by_code": {k: v / n for k, v in by_where.items()},
               # Both filters' body hooks (a dynamic module's): about two per streamed chunk.
               "body_hooks": calls["envoy_dynamic_module_on_http_filter_response_body"] / n,
               # Of those, the ones that entered the filter (the Proxy-Wasm SDK's entry point): the
               # rest the native host answered itself (a picker done with the body, a guard's
               # clean chunks).
               "filter_body_hooks": calls["proxy_on_response_body"] / n,
               "module_top": [{"function": fn, "ir": round(ir)} for fn, ir in top],
               # The Proxy-Wasm SDK's own part of the module's cost (`sdk_account`).
               "sdk": sdk_account(edges, n),
               # Calls per request that a shared library's thread-locals and the module's
               # allocator make (the idle window's taken out).
               "calls": {k: (calls[f] - idle_calls[f] * scale) / n for k, f in COUNTED_CALLS},
               # The module's own cost by layer (`LAYERS`): instructions and I1 misses per request.
               "module_layers": {name: {e: sum(c[e] for (ob, fn), c in costs.items() if where(ob) == "module" and layer(fn) == name) / n
                                        for e in ("Ir", "I1mr")} for name, _ in LAYERS},
               # The native filter's own cost, steadier than the totals (Envoy's event loop moves
               # them by a few per cent): each request hook with the Envoy calls it makes.
               "hooks": {fn[len("envoy_dynamic_module_on_http_filter_"):]: (ir - idle_incl[fn] * scale) / n
                         for fn, ir in incl.items() if is_request_hook(fn)}}
        if label == DECISION_FLOOR and row["module_layers"]["decisions"]["Ir"] < 5000:
            # The floor's decisions are dropped, so one that stopped running (a body it no longer
            # reads, a scan that fails) would only show here.
            raise RuntimeError(f"{label}: the decisions did not run ({row['module_layers']['decisions']['Ir']:.0f} instructions a request)")
        rows.append(row)
        note(f"L7 instructions {label}, {req}: {n} requests, {row['per_request']['Ir']:.0f} Ir/request, "
             f"I1 misses {row['per_request']['I1mr']:.0f}, errors {sat['errors']}")
    PROCS.stop_all()
    R["l7_instr"] = rows


def report_l7_instr(R, rep: Report) -> None:
    rows = R.get("l7_instr")
    if not rows:
        return
    md = rep.md
    for req in ("paced", "json"):
        kind_rows = [r for r in rows if r.get("request", "paced") == req]
        if kind_rows:
            report_kind(md, req, kind_rows)


def report_kind(md, req, rows) -> None:
    base = next((r["per_request"] for r in rows if r["variant"] == "envoy (no filter)"), None)
    if req == "paced":
        md += ["## L7 instructions per paced streaming request (Envoy under callgrind)", "",
               f"Paced streams ({TOKENS_PER_S} tokens/s, 16 tokens: one SSE event per chunk even with Envoy slowed down "
               f"by valgrind), wrk {CONNS} connections; Envoy's user-space instructions and its simulated cache misses, "
               "counted over a window after a warm-up, less an idle window's count at the same length (periodic work), "
               "and divided by the requests completed in it. Body hooks: the "
               "module's response-body hooks entered per request (both filters: about two per chunk); in the filter: "
               "those of them the native host handed to the filter (the others it answered itself).", ""]
    else:
        md += ["## L7 instructions per json request (Envoy under callgrind)", "",
               f"The json row of the L7 section (`GPUHA_BENCH_INSTR_JSON=1`): json requests (`\"stream\": false`) to two "
               f"workers that answer at once, wrk {CONNS} connections, counted as above.", ""]
    md += ["| variant | requests | instructions | × no filter | Envoy's code | module | C library, other | body hooks | in the filter | I1 misses | D1 misses |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, w = r["per_request"], r["ir_by_code"]
        ratio = f"{p['Ir'] / base['Ir']:.3f}" if base else "–"
        md.append(f"| {r['variant']} | {r['requests']} | {fmt(p['Ir'])} | {ratio} | {fmt(w.get('envoy', 0))} | {fmt(w.get('module', 0))} | "
                  f"{fmt(w.get('libc and other', 0))} | {fmt(r.get('body_hooks'), 1)} | {fmt(r.get('filter_body_hooks'), 1)} | "
                  f"{fmt(p['I1mr'])} | {fmt(p['D1mr'] + p['D1mw'])} |")
    native = [r for r in rows if r.get("hooks") and (r["variant"].startswith("envoy+filter (native") or r["variant"] in (CALL_FLOOR, DECISION_FLOOR))]
    if native:
        hooks = sorted({h for r in native for h in r["hooks"]}, key=lambda h: -max(r["hooks"].get(h, 0) for r in native))
        md += ["", f"The native filter's request hooks, instructions per {req} request, each with the Envoy calls it makes "
               "(its own cost: steadier than the totals above, which Envoy's event loop moves by a few per cent):", "",
               "| hook | " + " | ".join(r["variant"] for r in native) + " |", "|---|" + "---:|" * len(native)]
        md += [f"| `{h}` | " + " | ".join(fmt(r["hooks"].get(h, 0)) for r in native) + " |" for h in hooks]
        md.append("| all | " + " | ".join(f"**{fmt(sum(r['hooks'].values()))}**" for r in native) + " |")
    layered = [r for r in rows if r.get("module_layers") and (r["variant"].startswith("envoy+filter (native") or r["variant"] == DECISION_FLOOR)]
    if layered:
        md += ["", f"The module's own code by layer, per {req} request (self cost of each function, by its crate; "
               "approximate where code was inlined across crates). An instruction cache miss is about one line "
               "of code run per request: the module's code runs once a request, between Envoy's.", "",
               "| layer | what | " + " | ".join(f"{r['variant']}: instructions | I1 misses" for r in layered) + " |",
               "|---|---|" + "---:|---:|" * len(layered)]
        for name, what in LAYERS:
            md.append(f"| {name} | {what} | " + " | ".join(f"{fmt(r['module_layers'][name]['Ir'])} | {fmt(r['module_layers'][name]['I1mr'])}"
                                                          for r in layered) + " |")
        md.append("| all | | " + " | ".join(f"**{fmt(sum(v['Ir'] for v in r['module_layers'].values()))}** | "
                                             f"**{fmt(sum(v['I1mr'] for v in r['module_layers'].values()))}**" for r in layered) + " |")
    sdk = [r for r in layered if r.get("sdk")]
    if sdk:
        md += ["", f"Of that, the Proxy-Wasm SDK itself, per {req} request (from the call graph, inclusive: its dispatcher "
               "without the filter's methods it calls, its host-call wrappers without the native host's functions they "
               "call): what a glue written directly on the dynamic-modules ABI would not run, with the same filter code "
               "and host work. Then the calls per request to `__tls_get_addr` (a thread-local lookup of a library loaded "
               "with `dlopen`) and to the module's allocator.", "",
               "| | " + " | ".join(r["variant"] for r in sdk) + " |", "|---|" + "---:|" * len(sdk),
               "| dispatcher: the `proxy_on_*` entry points, their context lookups | " + " | ".join(fmt(r["sdk"]["dispatcher"]) for r in sdk) + " |",
               "| host-call wrappers: arguments encoded, answers copied and checked | " + " | ".join(fmt(r["sdk"]["host_call_wrappers"]) for r in sdk) + " |",
               "| the module's own code | " + " | ".join(fmt(sum(v["Ir"] for v in r["module_layers"].values())) for r in sdk) + " |"]
        md += [f"| calls per request: {k} | " + " | ".join(fmt(r.get("calls", {}).get(k), 1) for r in sdk) + " |" for k, _ in COUNTED_CALLS]
    for r in rows:
        if r["variant"] == "envoy+filter (native)" and r["module_top"]:
            md += ["", f"The module's own functions in `{r['variant']}`, instructions per {req} request (self, top {TOP}):", "",
                   "| function | instructions |", "|---|---:|"]
            md += [f"| `{t['function'][:110]}` | {fmt(t['ir'])} |" for t in r["module_top"]]
    md.append("")
