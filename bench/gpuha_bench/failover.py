"""Failover: pre-token retries, a worker killed or hung under load, large request bodies."""

import json
import os
import re
import signal
import statistics
import threading
import time
from pathlib import Path

from .common import BASELINE_NATIVE, BASELINE_WASM, NO_BREAKER, PROCS, cpu_seconds_fine, dnsd, envoy, fake_fleet, fake_worker, fleet_ready, host_stats, note, one_request, sidecar, wrk_result, wrk_start
from .markdown import Report, fmt


def access_log_lines(path):
    if not Path(path).exists():
        return []
    return [l for l in Path(path).read_text().splitlines() if l.strip()]


def sec_failover(R, quick):
    out = {}
    n = 60 if quick else 200
    # --- extra latency of a pre-token retry: one worker resets right after its 200 headers,
    # one is healthy. The breaker is disabled (huge threshold) so the bad worker keeps being
    # picked first about half of the time; each request's attempts come from the access log.
    for label, flags in [("reset before first token", ["--reset-after-tokens", "0"]),
                         ("SSE error before first token", ["--error-before-token"])]:
        bp, bad = fake_worker("fo-bad", flags)
        gp, good = fake_worker("fo-good")
        dp, ingest, http, _ = dnsd()
        sidecar("fo-bad", bad, ingest)
        sidecar("fo-good", good, ingest)
        fleet_ready(http, 2)
        nobreak = {"breaker": {"failure_threshold": 1000000}}
        # The picker would (rightly) rank the bad worker last — it never reports a first token —
        # so the retry would never happen: the picker is left out here and Envoy's round-robin
        # fallback alternates bad/good; the guard + retry policy are the shipped ones.
        ep, port, admin, log = envoy("envoy-fo", [bad, good], http, variant="guard-only", guard_config=nobreak)
        for _ in range(10):
            one_request(port, True)
        time.sleep(1.5)
        base = len(access_log_lines(log))
        lat = []
        for _ in range(n):
            dt, status, data = one_request(port, True)
            lat.append((dt, status, data))
        # Envoy flushes file access logs once a second.
        deadline = time.time() + 5
        while len(access_log_lines(log)) < base + n and time.time() < deadline:
            time.sleep(0.2)
        lines = access_log_lines(log)[base:]
        att = [int(re.search(r"attempts=(\d+)", l).group(1)) for l in lines]
        one = [d for (d, s, _), a in zip(lat, att) if a == 1 and s == 200]
        two = [d for (d, s, _), a in zip(lat, att) if a == 2 and s == 200]
        if not one:
            # Round robin advances once per attempt, so every request met the bad worker first:
            # the first-try baseline comes from the same config with only the good worker.
            PROCS.stop(ep)
            ep, port, admin, _ = envoy("envoy-fo-base", [good], http, variant="guard-only", guard_config=nobreak)
            for _ in range(10):
                one_request(port, True)
            one = [d for d, s, _ in (one_request(port, True) for _ in range(n)) if s == 200]
        bad_status = sum(1 for d, s, _ in lat if s != 200)
        spliced = sum(1 for _, s, data in lat if b"fo-bad:" in data)
        r = {"requests": n, "attempts1": len(one), "attempts2": len(two), "non200": bad_status, "log_lines": len(lines),
             "spliced": spliced}
        if one and two:
            r["p50_ms_attempts1"] = statistics.median(one) * 1e3
            r["p50_ms_attempts2"] = statistics.median(two) * 1e3
            r["extra_ms_p50"] = r["p50_ms_attempts2"] - r["p50_ms_attempts1"]
            r["p90_ms_attempts2"] = sorted(two)[int(len(two) * 0.9)] * 1e3
        out[label] = r
        note(f"failover retry ({label}): {r}")
        PROCS.stop_all()

    # --- SIGKILL / SIGSTOP under load: time from the signal to the last request Envoy sent to
    # the victim (per-host rq_total in /clusters, polled every 20 ms).
    # HANG: fake-vllm's SIGUSR1 hangs its engine with `/metrics` still answering (frozen
    # numbers), what a CUDA/NCCL hang looks like from outside: judged by progress, not silence.
    for sig_name, sig in [("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP), ("HANG", signal.SIGUSR1)]:
        ws, http = fake_fleet("fo", 3)
        addrs = [a for _, a in ws]
        ep, port, admin, log = envoy("envoy-kill", addrs, http)
        victim_p, victim = ws[0]
        total = 12
        wp = wrk_start(port, True, 16, total, timeout="15s")
        samples = []
        stop_poll = threading.Event()

        def poll():
            while not stop_poll.is_set():
                try:
                    hs = host_stats(admin)
                    samples.append((time.time(), hs.get(victim, {}).get("rq_total", 0),
                                    hs.get(victim, {}).get("cx_connect_fail", 0)))
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.02)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        time.sleep(3)
        t_sig = time.time()
        os.kill(victim_p.pid, sig)
        wp.wait(total + 30)
        stop_poll.set()
        th.join()
        res = wrk_result()
        at_sig = [s for s in samples if s[0] <= t_sig]
        rq_at_sig = at_sig[-1][1] if at_sig else 0
        last_change = None
        prev = rq_at_sig
        for t, rq, cf in samples:
            if t > t_sig and rq != prev:
                last_change = t
            if t > t_sig:
                prev = rq
        lines = access_log_lines(log)
        retried = sum(1 for l in lines if "attempts=1" not in l)
        r = {"signal": sig_name, "rq_to_victim_after_signal": (samples[-1][1] - rq_at_sig) if samples else None,
             "last_rq_to_victim_s": (last_change - t_sig) if last_change else 0.0,
             "client_errors": res["errors"] if res else None, "requests": res["requests"] if res else None,
             "non200_in_log": sum(1 for l in lines if '" 200 ' not in l), "retried_in_log": retried,
             "p99_ms": res["p99_us"] / 1e3 if res else None, "max_ms": res["max_us"] / 1e3 if res else None}
        out[sig_name] = r
        note(f"failover {sig_name}: {r}")
        try:
            os.kill(victim_p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        PROCS.stop_all()
    R["failover"] = out


def big_body(mb):
    """A chat request whose one message is `mb` MB of text (a long context, or base64 images)."""
    filler = "x" * (mb * 1_000_000)
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": filler}], "max_tokens": 4, "stream": True}).encode()


def sec_big_bodies(R, quick):
    """Bodies of 1, 10 and 30 MB through the router with the filter (Wasm, native, and the
    baseline builds when given) and through the same Envoy without Wasm: added latency (p50/p99)
    and Envoy CPU per request, interleaved."""
    ws, http = fake_fleet("bb", 2)
    addrs = [a for _, a in ws]
    variants = {}
    builds = [("filter", "filter", None, None), ("native", "native", None, None)]
    if BASELINE_WASM:
        builds.append(("filter (baseline)", "filter", BASELINE_WASM, None))
    if BASELINE_NATIVE:
        builds.append(("native (baseline)", "native", None, BASELINE_NATIVE))
    for v, kind, wasm, ndir in builds + [("nowasm", "nowasm", None, None)]:
        variants[v] = envoy(f"envoy-bb-{len(variants)}", addrs, http, variant=kind, picker_config=NO_BREAKER, guard_config=NO_BREAKER,
                            wasm=wasm, native_dir=ndir)
    n = 4 if quick else 12
    out = []
    for mb in (1, 10, 30):
        body = big_body(mb)
        for v, (ep, port, admin, _) in variants.items():
            one_request(port, True, body=body)
        lat = {v: [] for v in variants}
        cpu = {v: 0.0 for v in variants}
        for _ in range(n):
            for v, (ep, port, admin, _) in variants.items():
                c0 = cpu_seconds_fine(ep.pid)
                dt, status, _ = one_request(port, True, timeout=60, body=body)
                cpu[v] += cpu_seconds_fine(ep.pid) - c0
                if status == 200:
                    lat[v].append(dt)
        for v in variants:
            xs = sorted(lat[v])
            r = {"mb": mb, "variant": v, "ok": len(xs), "requests": n,
                 "p50_ms": statistics.median(xs) * 1e3 if xs else None,
                 "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3 if xs else None,
                 "envoy_cpu_ms_per_req": cpu[v] / n * 1e3}
            out.append(r)
            note(f"big body {mb} MB {v}: {r}")
    R["big_bodies"] = out




def report_failover(R, rep: Report) -> None:
    md = rep.md
    fo = R.get("failover")
    if fo:
        md += ["## 2. Failover", "", "| scenario | figure |", "|---|---|"]
        for k in ("reset before first token", "SSE error before first token"):
            r = fo.get(k)
            if r:
                md.append(f"| pre-token retry, {k}: extra latency (p50 of retried − p50 of first-try, sequential streams) | "
                          f"{fmt(r.get('extra_ms_p50'), 2)} ms ({r['attempts2']} retried / {r['attempts1']} first-try, non-200 {r['non200']}, spliced {r['spliced']}) |")
        for k in ("SIGKILL", "SIGSTOP", "HANG"):
            r = fo.get(k)
            if r:
                what = "engine hang (metrics still answering)" if k == "HANG" else k
                md.append(f"| {what} of 1 of 3 workers under load (wrk 16 streams): signal → last request Envoy sent to it | "
                          f"{fmt(r['last_rq_to_victim_s'], 3)} s ({r['rq_to_victim_after_signal']} requests sent to it after the signal; "
                          f"client errors {r['client_errors']}, retried {r['retried_in_log']}, p99 {fmt(r['p99_ms'], 1)} ms, max {fmt(r['max_ms'], 0)} ms) |")


def report_big_bodies(R, rep: Report) -> None:
    md = rep.md
    bb = R.get("big_bodies")
    if bb:
        md += ["", "Large request bodies (stream, 4 tokens), the same Envoy with each filter build and without a filter, interleaved:", "",
               "| body | variant | p50 ms | p99 ms | Envoy CPU ms/request |", "|---|---|---:|---:|---:|"]
        for r in bb:
            md.append(f"| {r['mb']} MB | {r['variant']} | {fmt(r['p50_ms'], 1)} | {fmt(r['p99_ms'], 1)} | {fmt(r['envoy_cpu_ms_per_req'], 2)} |")
