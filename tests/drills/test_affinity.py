"""Affinity drills: prefix-cache and session affinity through stock Envoy with fake vLLM workers
whose prefix cache works like vLLM's (chained 16-token blocks; `vllm:prefix_cache_hits_total`,
`vllm:prefix_cache_queries_total`) and whose time to first token grows with the uncached part of
the prompt. The hit rate is read from the workers' own metrics.

One stack, two routers over the same workers: one with affinity (the default), one with it
disabled by config, so the comparison is the picker's and nothing else.
"""

from __future__ import annotations

import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import gpuha_harness as harness
from gpuha_harness import filter_stat, make_client, wait_for

SYSTEM = "You are a careful assistant. " + " ".join(f"rule{i} applies." for i in range(30))
PREFILL = ["--prefill-us-per-token", "300"]


def report(line: str) -> None:
    print(f"\n[affinity] {line}")


def worker_of(text: str) -> str | None:
    ids = {t.split(":")[0] for t in text.split() if ":" in t}
    return ids.pop() if len(ids) == 1 else None


def converse(client, messages: list[dict], headers: dict | None = None) -> tuple[str | None, str, BaseException | None]:
    """One streamed chat turn: (worker id, text, error)."""
    text = ""
    try:
        s = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True,
                                           extra_headers=headers or {})
        for chunk in s:
            for ch in chunk.choices:
                if ch.delta and ch.delta.content:
                    text += ch.delta.content
        return worker_of(text), text, None
    except Exception as e:  # noqa: BLE001 - every exception is an observation here
        return None, text, e


def cache_counts(workers) -> dict[str, tuple[float, float]]:
    """Per worker: (prefix-cache hit tokens, queried tokens), from its own /metrics."""
    out = {}
    for w in workers:
        text = w.metrics()
        get = lambda name: sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))  # noqa: E731
        out[w.id] = (get("vllm:prefix_cache_hits_total"), get("vllm:prefix_cache_queries_total"))
    return out


def hit_rate(before, after) -> float:
    hits = sum(after[w][0] - before[w][0] for w in after)
    queried = sum(after[w][1] - before[w][1] for w in after)
    return hits / queried if queried else 0.0


def run_sessions(client, tag: str, sessions: int, turns: int, parallel: int = 6) -> dict[int, list]:
    """`sessions` conversations sharing SYSTEM, each with its own opening message and `turns`
    turns resending the growing history, `parallel` requests at a time. Each next request is the
    next turn of a session drawn at random (seeded) from those waiting whose turn is due: every
    session takes its turn t before any takes its turn t + 1, as when many users read and type
    between turns. Not each session's turns back to back: a turn
    sent the moment its answer ended found the worker that had just finished it the least loaded,
    so the picker without affinity kept a share of turns on their worker by that alone, and the
    share moved with the machine's timing (CI's run: 13 of 60 sessions with every turn on one
    worker without affinity, its hit rate 66.5 % where 55-62 % was seen on other runs, and the
    15-point bound missed). Nor in a fixed order: sessions then met the same others at each turn,
    and the same tie-breaks (the hit rate without affinity 56 % or 62 % by run). Nor drawn from
    every session waiting, whatever its turn: sessions then drifted apart in turns, and at the end
    the few left took theirs back to back again (62 % once in 10 runs). Returns per session the
    worker of each turn."""
    msgs = {s: [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{tag} session {s}: " + " ".join(f"fact{s}-{k}" for k in range(150))}]
            for s in range(sessions)}
    seen: dict[int, list] = {s: [] for s in range(sessions)}
    ready = list(range(sessions))
    lock = threading.Lock()
    rng = random.Random(sessions * 1000 + turns)

    def run() -> None:
        while True:
            with lock:
                if not ready:
                    return
                # Rounds: a session's next turn only after every session's turn before it.
                low = min(len(seen[x]) for x in ready)
                due = [x for x in ready if len(seen[x]) == low]
                s = due[rng.randrange(len(due))]
                ready.remove(s)
            t = len(seen[s])
            wid, text, err = converse(client, msgs[s])
            seen[s].append(wid if err is None else err)
            msgs[s] = msgs[s] + [{"role": "assistant", "content": text.strip()},
                                 {"role": "user", "content": f"turn {t} follow-up " + " ".join(f"q{s}-{t}-{k}" for k in range(20))}]
            if t + 1 < turns:
                with lock:
                    ready.append(s)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for f in [pool.submit(run) for _ in range(parallel)]:
            f.result()
    return seen


def fleet_summary(view: harness.FleetSamples) -> str:
    """dnsd's view of each worker during a run: how often it was not fresh, its highest queue
    (running + waiting) and TTFT figures. Read when a run's figures need explaining: a worker
    that looked slow or busy to every router skews both runs."""
    seen: dict[str, dict] = {}
    for _, workers in view.samples:
        for wid, w in workers.items():
            s = seen.setdefault(wid, {"samples": 0, "stale": 0, "queue": 0, "ttft": 0.0})
            s["samples"] += 1
            s["stale"] += not w.get("fresh")
            s["queue"] = max(s["queue"], (w.get("running") or 0) + (w.get("waiting") or 0))
            s["ttft"] = max(s["ttft"], w.get("ttft_ms") or 0.0)
    return "; ".join(f"{wid}: not fresh {s['stale']}/{s['samples']}, max queue {s['queue']}, max ttft {s['ttft']:.0f}"
                     for wid, s in sorted(seen.items()))


def warm(envoy, stack) -> None:
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, f"{envoy.name}'s first fleet poll")
    client = make_client(envoy.base_url)
    wait_for(lambda: converse(client, [{"role": "user", "content": "warm"}])[2] is None and filter_stat(envoy, "picks") > 0,
             10, f"{envoy.name} routing a request", interval=0.1)


def test_multi_turn_affinity_hits_the_cache_spreads_and_fails_over(stack):
    """Multi-turn sessions over a shared system prompt: with affinity every turn of a session
    lands on one worker, and the workers' own prefix-cache hit rate is far above the same
    workload through the same picker with affinity disabled; sessions and requests spread evenly
    over the workers (new keys are placed by load, bounded loads); a session header pins
    unrelated back-to-back prompts to one worker (finished requests do not count as load); when a
    session's worker is killed its sessions move (0 client errors) and the others stay."""
    stack.start_dnsd()
    workers = stack.start_workers(3, ttft_ms=20, tokens_per_s=0, extra=PREFILL)
    # The router without affinity balances by load among all three workers (a near-best band
    # wide enough for every one): with the default band, TTFTs that grow with the uncached prompt
    # made it herd onto the worker whose last TTFT was lowest (247, 71 and 42 of 360 requests in
    # one run), and sessions kept on fewer workers hit their cache by chance more often (62 %
    # against 56-57 % when spread), which moved the baseline this drill compares with. Both
    # routers get the band: a request with affinity is placed by its spill margin, not by it.
    band = {"near_best_ratio": 10.0, "near_best_ms": 1000.0}
    plain = stack.start_pool_router(name="plain", picker_config=json.dumps({"pick": {**band, "affinity": {"enabled": False}}}))
    affine = stack.start_pool_router(name="affine", picker_config=json.dumps({"pick": band}))
    warm(plain, stack)
    warm(affine, stack)

    sessions, turns = 60, 6
    b0 = cache_counts(workers)
    with harness.FleetSamples(stack) as watch_off:
        off = run_sessions(make_client(plain.base_url, timeout=30), "plain", sessions, turns)
    b1 = cache_counts(workers)
    with harness.FleetSamples(stack) as watch_on:
        on = run_sessions(make_client(affine.base_url, timeout=30), "affine", sessions, turns)
    b2 = cache_counts(workers)
    rate_off, rate_on = hit_rate(b0, b1), hit_rate(b1, b2)
    queried = lambda a, b: sum(b[w][1] - a[w][1] for w in b)  # noqa: E731
    hits_of = lambda a, b: sum(b[w][0] - a[w][0] for w in b)  # noqa: E731
    # Prefill work: prompt tokens not found in a cache.
    uncached_off, uncached_on = queried(b0, b1) - hits_of(b0, b1), queried(b1, b2) - hits_of(b1, b2)

    errors = [x for r in (off, on) for seen in r.values() for x in seen if not isinstance(x, str)]
    assert not errors, errors[:3]
    sticky_on = sum(len(set(seen)) == 1 for seen in on.values())
    sticky_off = sum(len(set(seen)) == 1 for seen in off.values())
    per_worker = {w.id: sum(seen[0] == w.id for seen in on.values()) for w in workers}
    requests = {w.id: sum(x == w.id for seen in on.values() for x in seen) for w in workers}
    requests_off = {w.id: sum(x == w.id for seen in off.values() for x in seen) for w in workers}
    hits = filter_stat(affine, "affinity_hits")
    keyed = filter_stat(affine, "affinity_keyed")
    report(f"multi-turn: {sessions} sessions x {turns} turns; prefix-cache hit rate (workers' metrics) "
           f"affinity off {rate_off:.1%}, on {rate_on:.1%}; uncached prompt tokens off {uncached_off:.0f}, "
           f"on {uncached_on:.0f} ({uncached_on / max(uncached_off, 1):.2f}x); sessions on one worker: off {sticky_off}, on {sticky_on}; "
           f"sessions per worker (on) {per_worker}, requests {requests} (off {requests_off}); affinity_hits {hits}/{keyed}, "
           f"spills {filter_stat(affine, 'affinity_spills')}, placed {filter_stat(affine, 'affinity_placed')}; "
           f"plain router keyed {filter_stat(plain, 'affinity_keyed')}; "
           f"breaker trips, pre-token retries, fail-open picks: plain {[filter_stat(plain, k) for k in ('breaker_trips', 'pre_token_retries', 'fail_open')]}, "
           f"affine {[filter_stat(affine, k) for k in ('breaker_trips', 'pre_token_retries', 'fail_open')]}; dnsd's view during the runs: "
           f"off [{fleet_summary(watch_off)}], on [{fleet_summary(watch_on)}]")
    assert filter_stat(plain, "affinity_keyed") == 0, "affinity disabled by config reads no key"
    # A session leaves its worker only by a spill, and spills only when its worker holds well over
    # the mean load (keep bound): with 6 requests in flight on 3 workers, about 4 of the 5 others
    # on its worker. Requests drawn at random put that on a few sessions of 60: 47-58 stayed in
    # 12 runs here (6 with a busy loop beside them), 51.6 on average.
    moved = {s: v for s, v in on.items() if len(set(v)) > 1}
    assert len(moved) <= filter_stat(affine, "affinity_spills"), moved
    assert sticky_on >= sessions * 0.7, moved
    assert sticky_off < sessions / 2, sticky_off
    assert rate_on >= rate_off + 0.15, (rate_off, rate_on)
    assert uncached_on <= 0.6 * uncached_off, (uncached_off, uncached_on)
    # Even, not just spread: new sessions go to the first worker in their rendezvous order whose
    # load is within the bound of the mean (rendezvous alone: max/min 2 is common).
    assert max(requests.values()) <= 1.5 * min(requests.values()), requests

    client = make_client(affine.base_url, timeout=30)
    pinned = []
    spills0 = filter_stat(affine, "affinity_spills")
    for i in range(12):
        # Back to back, within one frame: a finished request is no longer counted as load (the
        # picker counts requests in flight, not sends since the worker's last frame).
        pinned.append(converse(client, [{"role": "user", "content": f"unrelated prompt {i}"}], {"x-session-id": "session-42"}))
    assert all(r[2] is None for r in pinned), [r[2] for r in pinned]
    report(f"session header: 12 back-to-back unrelated prompts with one x-session-id served by {sorted({r[0] for r in pinned})}")
    assert len({r[0] for r in pinned}) == 1
    assert filter_stat(affine, "affinity_spills") == spills0

    # Failover: kill the worker holding the most sessions; their next turns move with no
    # client error, the other sessions stay where their cache is.
    victim_id = max(per_worker, key=per_worker.get)
    victim = stack.workers[victim_id]
    client = make_client(affine.base_url, timeout=30)
    history = {s: [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": f"affine session {s}: " + " ".join(f"fact{s}-{k}" for k in range(150))}]
               for s in range(sessions)}
    # Sessions that spilled have no single worker to keep.
    sticky = {s for s, seen in on.items() if len(set(seen)) == 1}
    victim.proc.kill9()
    with ThreadPoolExecutor(max_workers=6) as pool:
        after = dict(zip(range(sessions), pool.map(lambda s: converse(client, history[s]), range(sessions))))
    errors = [(s, r[2]) for s, r in after.items() if r[2] is not None]
    moved = {s: r[0] for s, r in after.items() if on[s][0] == victim_id}
    stayed = {s: (on[s][0], r[0]) for s, r in after.items() if on[s][0] != victim_id and s in sticky}
    report(f"failover: killed {victim_id} ({per_worker[victim_id]} sessions): client errors {len(errors)}, "
           f"its sessions now on {sorted(set(moved.values()))}, other sessions kept their worker "
           f"{sum(a == b for a, b in stayed.values())}/{len(stayed)}")
    assert not errors, errors[:3]
    assert moved and all(w not in (None, victim_id) for w in moved.values()), moved
    # Rendezvous moves only the dead worker's keys (a spill under load may move a few more).
    assert sum(a == b for a, b in stayed.values()) >= 0.9 * len(stayed), stayed


def test_hot_prefix_spills(stack):
    """One prefix sent by many concurrent clients (the same conversation opening): its worker
    takes it until its load (requests in flight) is over the keep bound, then the requests
    spill to the next worker in the key's order under the balance bound (affinity_spills > 0,
    more than one worker); once the burst is over, nothing is left counted in flight (the same
    requests one at a time stay on one worker)."""
    stack.start_dnsd()
    # Two slots per worker and a slow prefill: a burst queues on the hot worker.
    workers = stack.start_workers(3, ttft_ms=300, tokens_per_s=0, max_num_seqs=2, extra=PREFILL)
    envoy = stack.start_pool_router(name="affine")
    warm(envoy, stack)
    client = make_client(envoy.base_url, timeout=30)
    hot = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "the same opening for everyone"}]
    before = filter_stat(envoy, "affinity_spills")
    with ThreadPoolExecutor(max_workers=16) as pool:
        burst = list(pool.map(lambda i: converse(client, hot + [{"role": "assistant", "content": "ok"},
                                                                {"role": "user", "content": f"q{i}"}]), range(48)))
    errors = [r[2] for r in burst if r[2] is not None]
    served: dict[str, int] = {}
    for wid, _, _ in burst:
        served[wid] = served.get(wid, 0) + 1
    spills = filter_stat(envoy, "affinity_spills") - before
    top = max(served.values())
    report(f"hot prefix: 48 requests from 16 clients, per worker {served}, spills {spills}, errors {len(errors)}")
    assert not errors, errors[:3]
    assert spills > 0
    assert len(served) >= 2, served
    # Its own worker still takes the largest share (affinity, not a scatter).
    assert top >= 48 // 3, served
    # Every in-flight count ended with its request: one at a time, the key stays put. First a
    # frame of every worker taken after the burst (frames every 500 ms; each of Envoy's threads
    # polls every 250 ms): the burst's queues in older frames put its workers past the margin.
    wait_for(lambda: all(w.get("running") == 0 and w.get("waiting") == 0 for w in stack.fleet_workers().values()), 10,
             "frames of every worker showing the burst drained")
    polls = filter_stat(envoy, "fleet_polls")
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= polls + 8, 10, "eight fleet polls after them")
    spills = filter_stat(envoy, "affinity_spills")
    after = [converse(client, hot + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": f"later {i}"}])
             for i in range(12)]
    assert all(r[2] is None for r in after), [r[2] for r in after]
    report(f"after the burst, one at a time: {[r[0] for r in after]}, spills {filter_stat(envoy, 'affinity_spills') - spills}")
    # A worker whose latest frame still carries the burst's queued time to first token is outside
    # the margin until a new request measures it again, so the key may move while such stale
    # figures last; then it stays put. A worker's new figure reaches the picker with its next
    # frame (500 ms) and poll (250 ms): up to two of these requests (~350 ms each) later, so with
    # three workers the key may take up to eight requests to settle (seen: w3, w2, w1, w1, w1,
    # w1 under CI load; w3, w1, w1, w2, w2, w1, w1, w1 on an idle 2-core VM).
    assert len({r[0] for r in after[-4:]}) == 1, [r[0] for r in after]
