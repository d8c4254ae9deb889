#!/usr/bin/env python3
"""GPU HA local demo: 3 fake vLLM workers + sidecars + dnsd + stock Envoy with the gpuha filter,
all on 127.0.0.1; steady streaming traffic through the official `openai` SDK; one worker killed
with SIGKILL mid-traffic. Prints a live line per second and the final counts; exits 1 if any
client saw an error (a truncated stream past its first token is the contract, not an error;
a splice of two workers is an error).

Run it through ./deploy/local/demo.sh, which builds the binaries first. Directly:

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \
        python3 deploy/local/demo.py [--duration 12] [--kill-at 4] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import gpuha_harness as harness  # noqa: E402
from gpuha_harness import Outcome, chat, filter_stat, make_client, wait_for  # noqa: E402


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.in_flight = 0

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            out = {"ok": 0, "truncated": 0, "errors": 0, "splices": 0, "in_flight": self.in_flight}
            for o in self.outcomes:
                k = {"completed": "ok", "truncated": "truncated", "splice": "splices"}.get(o.kind, "errors")
                out[k] += 1
            return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=24, help="concurrent streaming clients")
    ap.add_argument("--ttft-ms", type=int, default=800, help="fake workers' time to first token")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of traffic")
    ap.add_argument("--kill-at", type=float, default=4.0, help="second at which one worker gets SIGKILL")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--pgid-file", help="write the process groups started here, one per line (demo.sh kills them on exit)")
    a = ap.parse_args()

    # SIGTERM/SIGHUP from the shell's trap: unwind through `finally`, which ends every process.
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    # A background job of a non-interactive shell starts with SIGINT ignored: take Ctrl-C back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    stack = harness.Stack(name="demo")
    print(f"logs: {stack.logdir}")
    try:
        return run(stack, a)
    except KeyboardInterrupt:
        return 130
    finally:
        stack.close()
        if a.pgid_file:
            Path(a.pgid_file).write_text("")


def run(stack: harness.Stack, a) -> int:
    def note_pgids():
        if a.pgid_file:
            Path(a.pgid_file).write_text("".join(f"{p.pgid}\n" for p in stack.procs))

    dnsd = stack.start_dnsd(config=dnsd_config(stack))
    note_pgids()
    print(f"dnsd        ingest udp {dnsd.ingest}, fleet http://{dnsd.http}/v1/fleet, DNS {dnsd.dns} "
          f"({SERVICE}: pool local-a -> 127.0.0.11, pool local-b -> 127.0.0.12, fail-whale 127.0.0.99)")
    workers = []
    for i in range(a.workers):
        w = stack.start_worker(f"w{i + 1}", ttft_ms=a.ttft_ms, tokens_per_s=20, pool="local-a")
        note_pgids()
        workers.append(w)
        print(f"worker {w.id}   fake vLLM on {w.addr} (TTFT {a.ttft_ms} ms, 20 tokens/s), sidecar -> dnsd every 500 ms")
    edge = stack.start_worker("b1", pool="local-b", sidecar=True)
    note_pgids()
    print(f"worker b1   fake vLLM on {edge.addr}, pool local-b (the second 'region', for the DNS part)")
    stack.wait_fresh([w.id for w in workers] + ["b1"])
    envoy = stack.start_pool_router(workers=workers, pool=["local-a"])
    note_pgids()
    print(f"envoy       http://127.0.0.1:{envoy.port}/v1 (admin http://{envoy.admin}), access log {envoy.access_log}")
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    print(f"fresh in dnsd: {sorted(stack.fresh_ids())}\n")
    print(f"{a.clients} clients stream chat completions (max_tokens {a.max_tokens}) for {a.duration:.0f}s; "
          f"one worker gets SIGKILL at {a.kill_at:.0f}s.\n")

    client = make_client(envoy.base_url, timeout=30)
    tally = Tally()
    stop_sending = threading.Event()
    counter = iter(range(10**9))
    counter_lock = threading.Lock()
    live: dict[int, str] = {}  # requests past their first token -> worker

    def first_token(o: Outcome) -> None:
        with tally.lock:
            live[o.idx] = o.tokens[0][0]

    def loop():
        while not stop_sending.is_set():
            with counter_lock:
                i = next(counter)
            with tally.lock:
                tally.in_flight += 1
            o = chat(client, i, a.max_tokens, on_first_token=first_token)
            with tally.lock:
                tally.in_flight -= 1
                live.pop(i, None)
                tally.outcomes.append(o)

    retries0 = envoy.stats(r"upstream_rq_retry$").get("cluster.gpuha_workers.upstream_rq_retry", 0)
    threads = []
    for k in range(a.clients):
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        threads.append(t)
        time.sleep((a.ttft_ms / 1000 + a.max_tokens / 20) / a.clients)  # spread the starts over one stream's length

    start = time.monotonic()
    victim = None
    next_line = start + 1
    while True:
        now = time.monotonic()
        if victim is None and now - start >= a.kill_at:
            with tally.lock:
                per = {w.id: 0 for w in workers}
                for wid in live.values():
                    per[wid] = per.get(wid, 0) + 1
            victim = stack.workers[max(per, key=lambda k: per[k])]
            victim.proc.kill9()
            print(f"\n>>> {now - start:4.1f}s  kill -9 {victim.id} (pid {victim.proc.pid}) with {per[victim.id]} streams "
                  f"past their first token on it\n", flush=True)
        if now >= next_line:
            s = tally.snapshot()
            retries = envoy.stats(r"upstream_rq_retry$").get("cluster.gpuha_workers.upstream_rq_retry", 0) - retries0
            print(f"t={now - start:4.1f}s  ok={s['ok']:4d}  in_flight={s['in_flight']:3d}  failovers={retries:3d}  "
                  f"truncated={s['truncated']:3d}  errors={s['errors']:3d}  fresh={sorted(stack.fresh_ids())}", flush=True)
            next_line += 1
        if now - start >= a.duration:
            break
        time.sleep(max(0.0, min(next_line, start + a.duration) - time.monotonic()))

    stop_sending.set()
    print("\nstopping the clients; waiting for the streams in flight ...", flush=True)
    for t in threads:
        t.join(timeout=40)
    s = tally.snapshot()
    retries = envoy.stats(r"upstream_rq_retry$").get("cluster.gpuha_workers.upstream_rq_retry", 0) - retries0
    outcomes = tally.outcomes
    per_worker = harness.per_worker(outcomes)
    print(f"\nfinal: {len(outcomes)} requests, {s['ok']} completed, {retries} pre-token failovers (Envoy retries), "
          f"{s['truncated']} truncated after their first token "
          f"(all on {victim.id if victim else '-'}: "
          f"{all(o.worker == (victim.id if victim else None) for o in outcomes if o.kind == 'truncated')}), "
          f"{s['errors']} client errors, {s['splices']} splices")
    print(f"served per worker: {dict(sorted(per_worker.items()))}")
    print(f"picker: {filter_stat(envoy, 'picks')} picks, {filter_stat(envoy, 'pre_token_retries')} pre-token retries by the guard, "
          f"{filter_stat(envoy, 'post_token_truncations')} post-token truncations, fresh now {sorted(stack.fresh_ids())}")
    bad = [o for o in outcomes if o.kind not in ("completed", "truncated")]
    for o in bad[:10]:
        print("  " + o.describe())
    if bad:
        print("FAIL: a client saw an error or a splice")
        return 1
    print("OK: no client error, no splice; pre-token failures were retried, post-token ones ended cleanly truncated")
    return dns_evacuation(stack, dnsd, edge)


SERVICE = "api.gpuha.test."


def dnsd_config(stack: harness.Stack) -> Path:
    """dnsd with a DNS zone: two pools (two 'regions'), each with one router address."""
    return harness.write_zone_config(stack, {"local-a": ("here", "none", "127.0.0.11"), "local-b": ("there", "none", "127.0.0.12")},
                                     SERVICE, "127.0.0.99")


def dig(dns: str) -> list[str]:
    host, port = dns.rsplit(":", 1)
    r = subprocess.run(["dig", "+short", "+tries=1", "+time=1", f"@{host}", "-p", port, SERVICE, "A"],
                       capture_output=True, text=True, timeout=5)
    return sorted(r.stdout.split())


def dns_evacuation(stack: harness.Stack, dnsd, edge) -> int:
    """Part 2: the whole of pool local-b goes dark; dnsd drops it from the answer after the
    10 s eviction window (each line is a real `dig` against dnsd)."""
    if shutil.which("dig") is None:
        print("\n(DNS part skipped: no `dig`; apt-get install dnsutils)")
        return 0
    print(f"\n== DNS tier: dig @{dnsd.dns} {SERVICE}")
    print(f"answer now: {dig(dnsd.dns)}")
    edge.proc.kill9()
    killed = time.monotonic()
    print(f">>> kill -9 b1, the only worker of pool local-b; its sidecar goes silent")
    last = None
    while time.monotonic() - killed < 20:
        ans = dig(dnsd.dns)
        if ans != last:
            print(f"t={time.monotonic() - killed:5.2f}s  answer {ans}", flush=True)
            last = ans
        if ans == ["127.0.0.11"]:
            print(f"pool local-b left the answer {time.monotonic() - killed:.2f}s after the kill "
                  f"(10 s eviction window; clients re-resolve within the 5 s TTL)")
            return 0
        time.sleep(0.25)
    print("FAIL: pool local-b was still answered 20 s after its last worker died")
    return 1


if __name__ == "__main__":
    sys.exit(main())
