"""Prefix-cache affinity beside vllm-router's cache_aware and round_robin (fake workers with a prefix cache)."""

import json
import os
import re
import statistics
import time

from .common import PROCS, WORK, dnsd, envoy, envoy_stats, fake_worker, fleet_ready, free_port, http_get, note, sidecar, vllm_router
from .markdown import Report, Target, fmt


AFF_WORKERS = 4
# Slots per worker: few, so a router that piles work on one worker makes requests queue there.
AFF_SLOTS = 4
# Prefill 300 µs per prompt token not in the worker's prefix cache (a 500-token prompt: 150 ms
# uncached, a few ms cached). The cache holds 6 144 tokens per worker: the multi-turn working set
# split over the workers fits, the whole working set on every worker (what a router that scatters
# a session needs) does not.
AFF_PREFILL_US = 300
AFF_CACHE_TOKENS = 6144


def aff_counts(workers):
    """Per worker address: (prefix-cache hit tokens, queried tokens, finished requests) from the
    worker's own /metrics."""
    out = {}
    for w in workers:
        _, body = http_get(f"http://{w}/metrics", timeout=5)
        text = body.decode()

        def total(name):
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

        out[w] = (total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total"),
                  total("vllm:request_success_total"))
    return out


def aff_turn(conn, messages, timeout=60.0):
    """One streamed chat turn on a keep-alive connection: (TTFT s, total s, reply text, error)."""
    body = json.dumps({"model": "tiny", "messages": messages, "max_tokens": 4, "stream": True}).encode()
    t0 = time.perf_counter()
    ttft, text = None, ""
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return None, None, "", f"status {resp.status}"
        buf = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                try:
                    ev = json.loads(line[5:])
                except ValueError:
                    continue
                for ch in ev.get("choices") or []:
                    c = (ch.get("delta") or {}).get("content")
                    if c:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        text += c
        if ttft is None:
            return None, None, text, "no token"
        return ttft, time.perf_counter() - t0, text, None
    except Exception as e:  # noqa: BLE001 - every exception is an observation here
        conn.close()
        return None, None, text, repr(e)


def aff_multi_turn(port, tag, sessions, turns, parallel):
    """`sessions` conversations over one short system prompt, each with its own 150-word opening
    and `turns` turns, every turn resending the growing history (with the worker's reply)."""
    import http.client

    system = f"[{tag}] You are a careful assistant. " + " ".join(f"rule{i} applies." for i in range(30))

    def one(s):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": f"{tag} session {s}: " + " ".join(f"fact{s}-{k}" for k in range(150))}]
        out = []
        for t in range(turns):
            ttft, total, text, err = aff_turn(conn, msgs)
            out.append((ttft, err))
            msgs = msgs + [{"role": "assistant", "content": text.strip()},
                           {"role": "user", "content": f"turn {t} follow-up " + " ".join(f"q{s}-{t}-{k}" for k in range(20))}]
        conn.close()
        return out

    return aff_pool(one, sessions, parallel)


def aff_shared_prompt(port, tag, users, parallel):
    """`users` users, one each: the same long system prompt (~600 tokens), a different question."""
    import http.client

    system = f"[{tag}] You are the support assistant of a large store. " + " ".join(
        f"policy{i}: answer item {i} politely and cite section {i}." for i in range(75))

    def one(u):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": f"user {u} asks: " + " ".join(f"w{u}-{k}" for k in range(30))}]
        ttft, _, _, err = aff_turn(conn, msgs)
        conn.close()
        return [(ttft, err)]

    return aff_pool(one, users, parallel)


def aff_pool(fn, n, parallel):
    """Runs fn(0..n) on `parallel` client threads (closed loop); (per-request (ttft, err), wall s)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        res = [x for r in pool.map(fn, range(n)) for x in r]
    return res, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def sec_affinity(R, quick):
    """The same fake workers (prefix cache on, prefill cost per uncached token) behind our router
    with affinity on and off, vllm-router `cache_aware` and `round_robin`; two workloads, every
    run with prompts tagged new (no cache carries over: stale blocks are the least recently used
    and go first), routers interleaved, repeats rotated."""
    reps = 1 if quick else 3
    sessions, turns = (24, 4) if quick else (48, 6)
    users = 96 if quick else 240
    parallel = 12
    extra = ["--prefill-us-per-token", AFF_PREFILL_US, "--prefix-cache-tokens", AFF_CACHE_TOKENS]
    ws = [fake_worker(f"aff{i}", extra=extra, ttft_ms=5, max_num_seqs=AFF_SLOTS) for i in range(AFF_WORKERS)]
    workers = [a for _, a in ws]
    _, ingest, fleet, _ = dnsd()
    for i, a in enumerate(workers):
        sidecar(f"aff{i}", a, ingest)
    fleet_ready(fleet, AFF_WORKERS)
    R["affinity_setup"] = {"workers": AFF_WORKERS, "slots": AFF_SLOTS, "prefill_us_per_token": AFF_PREFILL_US,
                           "prefix_cache_tokens": AFF_CACHE_TOKENS, "ttft_ms": 5, "max_tokens": 4, "reps": reps,
                           "sessions": sessions, "turns": turns, "users": users, "client_threads": parallel}
    rows, runs = compare(workers, fleet, reps, sessions, turns, users, parallel)
    R["affinity"] = rows
    R["affinity_runs"] = runs
    PROCS.stop_all()


def compare(workers, fleet, reps, sessions, turns, users, parallel):
    """Both workloads through every router over `workers` (reported by dnsd at `fleet`): the rows
    (pooled per router and workload) and every run."""
    # One untimed pass first (straight to the workers, spread by hand), so the first router
    # measured does not meet workers and sidecars that have never been loaded.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda i: aff_multi_turn(int(workers[i % len(workers)].rsplit(":", 1)[1]), f"warmup{i}", 3, 2, 1),
                      range(len(workers) * 3)))
    routers = [("gpuha (affinity on)", "on"), ("vllm-router cache_aware", "cache_aware"),
               ("vllm-router round_robin", "round_robin"), ("gpuha (affinity off)", "off")]
    workloads = [("multi-turn", lambda port, tag: aff_multi_turn(port, tag, sessions, turns, parallel)),
                 ("shared system prompt", lambda port, tag: aff_shared_prompt(port, tag, users, parallel))]
    runs = []
    for rep in range(reps):
        order = routers[rep % len(routers):] + routers[:rep % len(routers)]
        for label, kind in order:
            proxy = admin = None
            try:
                if kind in ("on", "off"):
                    pc = {"pick": {"affinity": {"enabled": kind == "on"}}}
                    proxy, port, admin, _ = envoy(f"envoy-aff-{rep}-{kind}", workers, fleet, picker_config=pc)
                    deadline = time.time() + 20
                    while envoy_stats(admin).get("wasmcustom.gpuha.fleet_polls", 0) < 1:
                        if time.time() > deadline:
                            raise RuntimeError("the filter never polled the fleet")
                        time.sleep(0.05)
                else:
                    proxy, port = vllm_router(workers, policy=kind)
            except Exception as e:  # noqa: BLE001
                note(f"affinity {label}: could not start: {e}")
                continue
            try:
                import http.client
                warm = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                for _ in range(len(workers)):
                    aff_turn(warm, [{"role": "user", "content": f"warm {rep} {kind}"}])
                warm.close()
                for wl, fn in workloads:
                    tag = f"r{rep}-{kind}-{wl[:5]}-{os.urandom(3).hex()}"
                    s0 = envoy_stats(admin) if admin else {}
                    c0 = aff_counts(workers)
                    res, wall = fn(port, tag)
                    c1 = aff_counts(workers)
                    s1 = envoy_stats(admin) if admin else {}
                    hits = sum(c1[w][0] - c0[w][0] for w in workers)
                    queried = sum(c1[w][1] - c0[w][1] for w in workers)
                    per_worker = [int(c1[w][2] - c0[w][2]) for w in workers]
                    ttfts = [t for t, e in res if e is None]
                    errs = [e for _, e in res if e is not None]
                    st = {k: s1.get(f"wasmcustom.gpuha.affinity_{k}", 0) - s0.get(f"wasmcustom.gpuha.affinity_{k}", 0)
                          for k in ("keyed", "hits", "spills", "placed")} if admin else None
                    row = {"router": label, "workload": wl, "rep": rep, "requests": len(res), "errors": len(errs),
                           "error_samples": errs[:3], "wall_s": wall, "rps": len(ttfts) / wall, "hit_tokens": hits,
                           "queried_tokens": queried, "hit_rate": hits / queried if queried else None,
                           "ttft_ms": [round(t * 1000, 2) for t in ttfts], "per_worker": per_worker, "filter": st,
                           "loadavg": os.getloadavg()[0]}
                    runs.append(row)
                    note(f"affinity #{rep} {label} / {wl}: hit rate {row['hit_rate'] or 0:.1%}, TTFT p50 "
                         f"{fmt(pct(row['ttft_ms'], 50), 1)} ms p99 {fmt(pct(row['ttft_ms'], 99), 1)} ms, "
                         f"{row['rps']:.1f} req/s, per worker {per_worker}, errors {len(errs)}, filter {st}")
            finally:
                PROCS.stop(proxy)
    rows = []
    for wl, _ in workloads:
        for label, _ in routers:
            rs = [r for r in runs if r["router"] == label and r["workload"] == wl]
            if not rs:
                continue
            ttft = [t for r in rs for t in r["ttft_ms"]]
            per_worker = [sum(r["per_worker"][i] for r in rs) for i in range(len(workers))]
            # Spread per run, then the median over the runs: every run places its new sessions
            # anew, so the pooled counts would average an imbalance away.
            max_min = [max(r["per_worker"]) / min(r["per_worker"]) if min(r["per_worker"]) else None for r in rs]
            cv = [statistics.pstdev(r["per_worker"]) / statistics.mean(r["per_worker"]) for r in rs if sum(r["per_worker"])]
            hits, queried = sum(r["hit_tokens"] for r in rs), sum(r["queried_tokens"] for r in rs)
            rows.append({"router": label, "workload": wl, "reps": len(rs), "requests": sum(r["requests"] for r in rs),
                         "errors": sum(r["errors"] for r in rs), "hit_rate": hits / queried if queried else None,
                         "uncached_tokens": queried - hits, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                         "rps": sum(len(r["ttft_ms"]) for r in rs) / sum(r["wall_s"] for r in rs),
                         "per_worker": per_worker,
                         # None: a worker got nothing in a run (max/min is infinite).
                         "max_min": None if None in max_min else statistics.median(max_min),
                         "max_min_runs": max_min, "cv": statistics.median(cv) if cv else None,
                         "filter": {k: sum((r["filter"] or {}).get(k, 0) for r in rs) for k in ("keyed", "hits", "spills", "placed")}
                         if rs[0]["filter"] is not None else None})
    return rows, runs


def sec_affinity_vllm(R, quick):
    """The same comparison against real vLLM 0.32 CPU servers (prefix caching on: vLLM's default),
    hit rate from vLLM's own counters. Needs the real-vLLM install of deploy/vllm/setup.sh
    (GPUHA_VLLM_VENV); skipped, with a note, without it."""
    from gpuha_harness import vllm as vl

    venv, model = vl.default_venv(), vl.default_model()
    if not (venv / "bin" / "python").exists() or not model.exists():
        note(f"affinity_vllm: no real vLLM install at {venv} (deploy/vllm/setup.sh): skipped")
        return
    n = 3
    reps = 1
    sessions, turns = (9, 3) if quick else (18, 4)
    users = 24 if quick else 48
    parallel = 6
    _, ingest, fleet, _ = dnsd()
    servers = [vl.VllmServer(name=f"affv{i}", port=free_port(), model=model, logdir=WORK, venv=venv) for i in range(n)]
    try:
        started = vl.start_parallel(servers)
        note(f"affinity_vllm: {n} real vLLM servers healthy after {started}")
        workers = [s.addr for s in servers]
        for s in servers:
            sidecar(s.name, s.addr, ingest)
        fleet_ready(fleet, n)
        R["affinity_vllm_setup"] = {"workers": n, "build": vl.vllm_build(), "serve_flags": " ".join(vl.SERVE_FLAGS), "max_tokens": 4,
                                    "reps": reps, "sessions": sessions, "turns": turns, "users": users, "client_threads": parallel}
        rows, runs = compare(workers, fleet, reps, sessions, turns, users, parallel)
        R["affinity_vllm"] = rows
        R["affinity_vllm_runs"] = runs
    finally:
        PROCS.stop_all()
        for s in servers:
            try:
                s.kill_group()
            except Exception as e:  # noqa: BLE001 - report and go on cleaning the others
                note(f"affinity_vllm: cleanup of {s.name}: {e}")


def report_affinity_vllm(R, rep: Report) -> None:
    su = R.get("affinity_vllm_setup", {})
    intro = (f"{su.get('workers')} real vLLM servers ({su.get('build')} build, `{su.get('serve_flags')}`, prefix caching on: "
             f"vLLM's default), {su.get('client_threads')} client threads, max_tokens {su.get('max_tokens')}. "
             f"Multi-turn: {su.get('sessions')} sessions × {su.get('turns')} turns; shared system prompt: {su.get('users')} users. "
             f"Hit rate: vLLM's own `vllm:prefix_cache_hits_total / queries_total`; load: vLLM's `request_success_total` per server.")
    table(R.get("affinity_vllm"), rep, "## 6b. Prefix-cache affinity against real vLLM servers", intro)


def report_affinity(R, rep: Report) -> None:
    su = R.get("affinity_setup", {})
    intro = (f"{su.get('workers')} fake workers (`--max-num-seqs {su.get('slots')} --ttft-ms {su.get('ttft_ms')} "
             f"--prefill-us-per-token {su.get('prefill_us_per_token')} --prefix-cache-tokens {su.get('prefix_cache_tokens')}`), "
             f"{su.get('client_threads')} client threads (closed loop, streamed, max_tokens {su.get('max_tokens')}). "
             f"Multi-turn: {su.get('sessions')} sessions × {su.get('turns')} turns resending the history; shared system prompt: "
             f"{su.get('users')} users, one ~600-token system prompt, a different question each. Hit rate: the workers' "
             f"own `vllm:prefix_cache_hits_total / queries_total`, delta over the run; load: requests finished per worker "
             f"(summed over the repeats; max/min and CV: median of the repeats'). "
             f"Repeats: {su.get('reps')} (router order rotated), pooled.")
    table(R.get("affinity"), rep, "## 6. Prefix-cache affinity (fake workers with a prefix cache)", intro)


def table(af, rep: Report, title: str, intro: str) -> None:
    """The rows of one comparison, their ratios to vllm-router cache_aware, and the targets."""
    md, targets = rep.md, rep.targets
    where = ", real vLLM" if "real vLLM" in title else ""
    if af:
        def mm(v):
            return "∞" if v is None else f"{v:.2f}"
        md += ["", title, "", intro, "",
               "| workload | router | hit rate | uncached prompt tokens | TTFT p50 ms | TTFT p99 ms | req/s | requests per worker | max/min | CV | errors | affinity hits/keyed, spills, placed |",
               "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in af:
            f = r.get("filter")
            aff = f"{f['hits']}/{f['keyed']}, {f['spills']}, {f.get('placed', 0)}" if f else "–"
            md.append(f"| {r['workload']} | {r['router']} | {(r['hit_rate'] or 0)*100:.1f} % | {fmt(r['uncached_tokens'])} | "
                      f"{fmt(r['ttft_p50_ms'], 1)} | {fmt(r['ttft_p99_ms'], 1)} | {fmt(r['rps'], 1)} | {r['per_worker']} | "
                      f"{mm(r['max_min'])} | {fmt(r['cv'], 2)} | {r['errors']} | {aff} |")
        md += ["", "Ratios vs vllm-router `cache_aware` (hit rate, TTFT: higher / lower is better; uncached tokens = prefill work):", "",
               "| workload | router | hit rate | uncached tokens | TTFT p50 | TTFT p99 | req/s | max/min load (this vs cache_aware) |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in af:
            b = next((x for x in af if x["workload"] == r["workload"] and x["router"] == "vllm-router cache_aware"), None)
            if not b or r is b:
                continue

            def ratio(k):
                return f"{r[k] / b[k]:.2f}" if r.get(k) is not None and b.get(k) else "–"
            md.append(f"| {r['workload']} | {r['router']} | {ratio('hit_rate')} | {ratio('uncached_tokens')} | {ratio('ttft_p50_ms')} | "
                      f"{ratio('ttft_p99_ms')} | {ratio('rps')} | {mm(r['max_min'])} vs {mm(b['max_min'])} |")
        for wl in dict.fromkeys(r["workload"] for r in af):
            a = next((x for x in af if x["workload"] == wl and x["router"] == "gpuha (affinity on)"), None)
            b = next((x for x in af if x["workload"] == wl and x["router"] == "vllm-router cache_aware"), None)
            if a and b and a["hit_rate"] is not None and b["hit_rate"] is not None:
                spread_ok = b["max_min"] is None or (a["max_min"] is not None and a["max_min"] <= b["max_min"] * 1.05)
                ok = a["hit_rate"] >= b["hit_rate"] - 0.02 and a["ttft_p50_ms"] <= b["ttft_p50_ms"] * 1.05 and spread_ok
                targets.append(Target(f"affinity ≥ vllm-router cache_aware: hit rate, TTFT p50, load spread ({wl}{where})", ok,
                                f"hit {a['hit_rate']*100:.1f} vs {b['hit_rate']*100:.1f} %, TTFT p50 {fmt(a['ttft_p50_ms'], 1)} vs "
                                f"{fmt(b['ttft_p50_ms'], 1)} ms, load max/min {mm(a['max_min'])} vs {mm(b['max_min'])}"))
