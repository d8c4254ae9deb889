#!/usr/bin/env python3
"""Measures how long a HEALTHY vLLM goes without visible progress while it has requests in flight.

One real vLLM server (started and group-killed by `gpuha_harness.vllm.VllmServer`, /dev/shm cleaned),
`/metrics` polled every 100 ms, and for each progress signal the longest wall-clock gap between
two observed changes while ``num_requests_running + num_requests_waiting > 0``. Results and the
reasoning: deploy/vllm/results/stall-window.md.

    python3 deploy/vllm/measure_stall_window.py --server main  --out DIR   # scenarios a, a2, b
    python3 deploy/vllm/measure_stall_window.py --server small --out DIR   # scenarios c, p

Environment as for the drills (GPUHA_VLLM_VENV, GPUHA_VLLM_MODEL). Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: gpuha_harness
from gpuha_harness.vllm import VllmServer, become_subreaper, default_model, default_venv  # noqa: E402

# Signals whose change means "the engine did something". Counters unless noted.
SIGNALS = {
    "steps": "vllm:iteration_tokens_total_count",        # histogram count: one per output batch
    "gen": "vllm:generation_tokens_total",
    "prompt": "vllm:prompt_tokens_total",
    "steps+gen+prompt": None,                             # any of the three
    "preemptions": "vllm:num_preemptions_total",
    "prefill_done": "vllm:request_prefill_time_seconds_count",
    "kv_usage": "vllm:kv_cache_usage_perc",               # gauge
    "flops": "vllm:estimated_flops_per_gpu_total",        # only with --enable-mfu-metrics
}
BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")
WANTED = {n for n in SIGNALS.values() if n} | set(BUSY)
SAMPLE_COLS = [*BUSY, *(n for n in SIGNALS.values() if n)]

# Server profiles. `main` is exactly the launcher's command line (SERVE_FLAGS / SERVE_ENV).
PROFILES = {
    "main": [],
    # Tiny KV cache: 17 blocks (the CPU build's blocks hold 128 tokens here) = 2176 tokens, one
    # max-length request, so that 8 generations of 64 + 1024 tokens cannot all fit and the
    # scheduler must preempt (recompute). Chunks of 64 tokens so that a 2000-token prompt takes 32
    # engine steps. MFU counters on, to see whether estimated_flops_per_gpu_total advances on steps
    # that emit nothing.
    "small": ["--max-model-len", "2048", "--num-gpu-blocks-override", "17",
              "--max-num-batched-tokens", "64", "--enable-mfu-metrics"],
}


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = line.find("{")
        if name_end < 0:
            name_end = line.find(" ")
        name = line[:name_end]
        if name in WANTED:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


class Poller:
    """Polls /metrics from a SEPARATE process (`--poll` mode of this script), so that the request
    threads of this one (GIL, CPU) cannot delay the scrapes. Samples are (monotonic t, values or
    None, scrape seconds); CLOCK_MONOTONIC is the same for both processes."""

    def __init__(self, addr: str, path: Path, period: float = 0.1):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, __file__, "--poll", f"http://{addr}/metrics",
                                      "--poll-out", str(path), "--poll-period", str(period)],
                                     stdin=subprocess.DEVNULL)
        self.samples: list = []
        self.errors: list = []
        self.lates: list = []
        self._pos = 0

    def refresh(self) -> None:
        with open(self.path) as f:
            f.seek(self._pos)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break
                self._pos += len(line.encode())
                t, late, scrape, vals, err = json.loads(line)
                self.samples.append((t, vals, scrape))
                self.lates.append((t, late))
                if err:
                    self.errors.append((t, scrape, err))

    def window(self, t_from: float, t_to: float):
        self.refresh()
        return [s for s in self.samples if t_from <= s[0] <= t_to and s[1] is not None]

    def max_late(self, t_from: float, t_to: float) -> float:
        return max((late for t, late in self.lates if t_from <= t <= t_to), default=0.0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def poll_main(url: str, out: Path, period: float) -> int:
    """`--poll` mode: scrape `url` every `period` s, one JSON line per scrape, until SIGTERM."""
    try:
        os.nice(-5)  # a sidecar on a GPU host has a core to itself; here it must win the CPU
    except OSError:
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    nxt = time.monotonic()
    with open(out, "a") as f:
        while True:
            t0 = time.monotonic()
            late = t0 - nxt  # how late this poller woke up (CPU starvation)
            err = None
            try:
                with opener.open(url, timeout=5) as r:
                    vals = parse_metrics(r.read().decode())
            except OSError as e:
                vals, err = None, repr(e)
            t1 = time.monotonic()
            f.write(json.dumps([t1, round(late, 4), round(t1 - t0, 4), vals, err]) + "\n")
            f.flush()
            nxt = max(nxt + period, t1)
            time.sleep(max(0.0, nxt - time.monotonic()))


def analyse(samples) -> dict:
    """Longest gap between observed changes of each signal while busy (running+waiting > 0).

    A busy period opens at the first busy sample; the gap clock starts there. A gap ends at the
    first sample that shows the signal changed (or at the end of the busy period, still open)."""
    res: dict = {}
    busy_s = [s for s in samples if sum(s[1].get(b, 0.0) for b in BUSY) > 0]
    res["busy_samples"] = len(busy_s)
    res["busy_s"] = round(busy_s[-1][0] - busy_s[0][0], 2) if busy_s else 0.0
    res["max_scrape_s"] = round(max((s[2] for s in samples), default=0.0), 3)
    # The largest hole between two successful scrapes: no gap below it can be told apart.
    res["max_sample_interval_s"] = round(max((b[0] - a[0] for a, b in zip(samples, samples[1:])), default=0.0), 3)
    if samples:
        first, last = samples[0][1], samples[-1][1]
        for key, name in (("steps", SIGNALS["steps"]), ("gen", SIGNALS["gen"]), ("prompt", SIGNALS["prompt"]),
                          ("preemptions", SIGNALS["preemptions"])):
            res[f"delta_{key}"] = round(last.get(name, 0.0) - first.get(name, 0.0))
    for key, name in SIGNALS.items():
        names = [SIGNALS["steps"], SIGNALS["gen"], SIGNALS["prompt"]] if name is None else [name]
        if not all(any(n in s[1] for s in samples) for n in names):
            continue
        max_gap, max_at, since, prev, open_gap = 0.0, None, None, None, 0.0
        for t, vals, _ in samples:
            cur = tuple(vals.get(n) for n in names)
            busy = sum(vals.get(b, 0.0) for b in BUSY) > 0
            changed = prev is not None and cur != prev
            if since is not None and changed:
                if t - since > max_gap:
                    max_gap, max_at = t - since, t
                since = t if busy else None
            elif busy and since is None:
                since = t
            elif not busy and since is not None:
                # Busy ended without a visible change: the gap stays open up to here.
                open_gap = max(open_gap, t - since)
                since = None
            prev = cur
        res[f"gap_{key}"] = round(max(max_gap, open_gap), 2)
    return res


# --------------------------------------------------------------------------------------------
# requests


def post(addr: str, body: dict, timeout: float = 900.0) -> dict:
    req = urllib.request.Request(f"http://{addr}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as r:
        return json.loads(r.read())


def random_ids(n: int, rng: random.Random) -> list[int]:
    # Token ids of the tiny model's 1024-token vocabulary, skipping the first few (special).
    return [rng.randrange(10, 1000) for _ in range(n)]


def completion(addr: str, prompt: list[int], max_tokens: int, results: list, label: str) -> None:
    t0 = time.monotonic()
    try:
        r = post(addr, {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True})
        results.append({"label": label, "s": round(time.monotonic() - t0, 2), "usage": r.get("usage")})
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        results.append({"label": label, "s": round(time.monotonic() - t0, 2), "error": repr(e)})


def run_threads(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def scenario(poller: Poller, name: str, fn, settle: float = 1.0) -> dict:
    time.sleep(settle)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    results: list = []
    fn(results)
    time.sleep(settle)
    t1 = time.monotonic()
    res = {"scenario": name, "wall_s": round(t1 - t0, 1), "loadavg_before": [round(x, 2) for x in load0],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "requests": results}
    window = poller.window(t0 - 0.5, t1)
    res |= analyse(window)
    res["poller_max_late_s"] = round(poller.max_late(t0 - 0.5, t1), 3)
    res["failed_scrapes"] = [[round(t - t0, 3), d, e] for t, d, e in poller.errors if t0 - 0.5 <= t <= t1]
    print(json.dumps(res), flush=True)
    res["samples"] = [[round(t - t0, 3), round(d, 3)] + [v.get(n) for n in SAMPLE_COLS] for t, v, d in window]
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", choices=sorted(PROFILES), default="main")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--poll", help=argparse.SUPPRESS)
    ap.add_argument("--poll-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--poll-period", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--long-prompt", type=int, default=30000)
    args = ap.parse_args()
    if args.poll:
        return poll_main(args.poll, args.poll_out, args.poll_period)
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    venv = default_venv()
    srv = VllmServer(name=f"stall-{args.server}", port=args.port, model=default_model(venv), logdir=args.out,
                     venv=venv, extra_args=PROFILES[args.server])

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    rng = random.Random(20261129)
    only = set(filter(None, args.only.split(",")))
    out: dict = {"server": args.server, "argv": srv.argv()[1:], "sample_cols": ["t", "scrape_s", *SAMPLE_COLS],
                 "scenarios": []}
    poller = None
    try:
        srv.start()
        out["start_s"] = round(srv.wait_ready(300), 1)
        print(f"ready in {out['start_s']} s", flush=True)
        poll_file = args.out / f"stall-{args.server}.samples.jsonl"
        poll_file.write_text("")
        poller = Poller(srv.addr, poll_file)
        time.sleep(0.5)
        addr = srv.addr
        plan = []
        if args.server == "main":
            n = args.long_prompt

            def a(res):  # one long prompt alone: chunked prefill, nothing else running
                completion(addr, random_ids(n, rng), 4, res, f"prompt{n}")

            def a2(res):  # the same prompt, with one short generation decoding beside it (mixed batches)
                fg = threading.Thread(target=completion, args=(addr, random_ids(n, rng), 4, res, f"prompt{n}"))
                fg.start()
                time.sleep(0.3)
                completion(addr, random_ids(32, rng), 300, res, "beside")
                fg.join()

            def b(res):  # 8 concurrent generations of 512 tokens
                run_threads([threading.Thread(target=completion, args=(addr, random_ids(64, rng), 512, res, f"gen{i}"))
                             for i in range(8)])
            def b2(res):  # 8 concurrent: 2000-token prompts, 2048 generated tokens each
                run_threads([threading.Thread(target=completion, args=(addr, random_ids(2000, rng), 2048, res, f"gen{i}"))
                             for i in range(8)])
            plan = [("a_long_prompt_alone", a), ("a2_long_prompt_beside_decode", a2), ("b_8x512", b),
                    ("b2_8x2000+2048", b2)]
        else:
            def c(res):  # 8 x (64 + 1024) tokens in 2176 tokens of KV cache: preemptions
                run_threads([threading.Thread(target=completion, args=(addr, random_ids(64, rng), 1024, res, f"gen{i}"))
                             for i in range(8)])

            def p(res):  # 2000-token prompt, 64-token chunks: 32 steps, only the last emits
                completion(addr, random_ids(2000, rng), 4, res, "prompt2000")
            plan = [("p_2000_prompt_64_chunks", p), ("c_preemption_8x1024_kv2048", c)]
        for name, fn in plan:
            if only and name.split("_")[0] not in only:
                continue
            out["scenarios"].append(scenario(poller, name, fn))
    finally:
        if poller is not None:
            poller.stop()
        srv.kill_group()
        out["log"] = srv.log_path.name
        (args.out / f"stall-{args.server}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
