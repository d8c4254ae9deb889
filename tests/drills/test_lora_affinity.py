"""LoRA affinity drill: fake vLLM workers serving two LoRA adapters (`--lora-modules`, one GPU slot
each: `--max-loras 1`, 300 ms to load an adapter that is not loaded), sidecars that read vLLM's
`vllm:lora_requests_info` into the frames, and two routers over the same workers: one with LoRA
affinity (the default), one with it disabled by config.

Adapter loads are read from the workers' own metrics: the base time to first token is 20 ms, so
every first token over 250 ms (`vllm:time_to_first_token_seconds` above its 0.25 bucket) paid a
load. The routers' `lora_hits`/`lora_misses` counters say what the picker did.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

import gpuha_harness as harness
from gpuha_harness import binary, chat, filter_stat, make_client, wait_for

ADAPTERS = ("sql", "chat")
LORA = ["--lora-modules", "sql=/adapters/sql", "chat=/adapters/chat", "--max-loras", "1", "--lora-load-ms", "300"]


def report(line: str) -> None:
    print(f"\n[lora] {line}")


def start_lora_workers(stack, n: int, **kw) -> list:
    """`n` fake workers serving `tiny` and the adapters, each with a sidecar that announces the
    adapters as served models (vLLM labels its metrics with the base model only)."""
    ws = []
    for i in range(n):
        w = stack.start_worker(f"w{i + 1}", extra=LORA, sidecar=False, **kw)
        argv = [binary("gpuha-sidecar"), "--metrics-url", f"http://{w.addr}/metrics", "--ingest", stack.dnsd.ingest,
                "--worker-id", w.id, "--pool", "p1", "--serve-addr", w.addr, "--key-file", stack.key_file,
                "--key-id", str(stack.key_id), "--interval-ms", "250", "--verbose",
                "--model", "tiny", *[a for m in ADAPTERS for a in ("--model", m)]]
        w.sidecar = stack.spawn(f"sidecar-{w.id}", argv)
        ws.append(w)
    stack.wait_fresh([w.id for w in ws])
    return ws


def cold_starts(workers) -> dict[str, int]:
    """Per worker: first tokens slower than 0.25 s (each paid an adapter load), from its /metrics."""
    out = {}
    for w in workers:
        text = w.metrics()
        count = sum(float(v) for v in re.findall(r"^vllm:time_to_first_token_seconds_count\{[^}]*\} (\S+)$", text, re.M))
        fast = sum(float(v) for v in re.findall(r'^vllm:time_to_first_token_seconds_bucket\{[^}]*le="0.25"[^}]*\} (\S+)$', text, re.M))
        out[w.id] = int(count - fast)
    return out


def holders(stack, adapter: str) -> set[str]:
    """Workers whose last frame, as dnsd's fleet view shows it, lists `adapter` as loaded."""
    return {i for i, w in stack.fleet_workers().items() if adapter in w.get("adapters", [])}


def warm(envoy) -> None:
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, f"{envoy.name}'s first fleet poll")
    client = make_client(envoy.base_url)
    wait_for(lambda: chat(client, 0, 2, model="tiny").error is None and filter_stat(envoy, "picks") > 0,
             10, f"{envoy.name} routing a request", interval=0.1)


def alternate(envoy, n: int, tag: int) -> list:
    """`n` sequential requests alternating between the adapters, one per fresh frame: the
    picker counts its own sends since a worker's last frame as queued, finished or not (the
    known limit in README.md), so back-to-back requests to one worker would spill after two.
    Envoy's picker polls every 250 ms and the sidecars send every 250 ms: three polls take in
    a frame of every worker taken after the previous request ended."""
    client = make_client(envoy.base_url)
    out = []
    for i in range(n):
        polls = filter_stat(envoy, "fleet_polls")
        out.append(chat(client, tag + i, 2, model=ADAPTERS[i % 2]))
        wait_for(lambda: filter_stat(envoy, "fleet_polls") >= polls + 3, 10, "three fleet polls")
    return out


@pytest.mark.slow
def test_lora_requests_go_to_their_adapters_worker_spill_and_fail_over(stack):
    stack.start_dnsd()
    # 50 tokens/s: a 40-token answer holds a slot 0.8 s, so a burst really queues.
    workers = start_lora_workers(stack, 3, ttft_ms=20, tokens_per_s=50, max_num_seqs=2)
    plain = stack.start_pool_router(name="plain", picker_config=json.dumps({"pick": {"lora": {"enabled": False}}}))
    lora = stack.start_pool_router(name="lora")
    warm(plain)
    warm(lora)

    # 1. Hit rate: the same alternating sequence through each router.
    n = 24
    c0 = cold_starts(workers)
    off = alternate(plain, n, 1000)
    c1 = cold_starts(workers)
    on = alternate(lora, n, 2000)
    c2 = cold_starts(workers)
    errors = [o.describe() for o in off + on if o.kind != "completed"]
    assert not errors, errors[:3]
    loads_off = sum(c1[w] - c0[w] for w in c1)
    loads_on = sum(c2[w] - c1[w] for w in c2)
    hits, misses = filter_stat(lora, "lora_hits"), filter_stat(lora, "lora_misses")
    served_on = {a: sorted({o.worker for o in on[i::2]}) for i, a in enumerate(ADAPTERS)}
    report(f"{n} requests alternating {ADAPTERS} (max_loras 1, 3 workers): adapter loads (workers' TTFT > 0.25 s) "
           f"affinity off {loads_off}, on {loads_on}; lora_hits {hits}, lora_misses {misses}; "
           f"served on {served_on}; plain router hits {filter_stat(plain, 'lora_hits')}")
    assert filter_stat(plain, "lora_hits") + filter_stat(plain, "lora_misses") == 0, "disabled by config"
    # Without affinity each request lands on one of three workers holding one adapter: about two
    # in three load (16 of 24 expected). With it, only an adapter nobody holds yet loads.
    assert loads_on <= 4, loads_on
    assert loads_off >= 2 * loads_on + 6, (loads_off, loads_on)
    assert hits >= n - 4, (hits, misses)

    # 2. Spill: a burst for one adapter, two slots per worker and slow decoding: its holder
    # takes it until its predicted time to first token is over the margin, then the requests
    # spill (loading the adapter on another worker) instead of queueing.
    sql_workers = harness.per_worker(on[0::2])
    holder = max(sql_workers, key=sql_workers.get)
    wait_for(lambda: holder in holders(stack, "sql"), 5, f"{holder} announcing sql")
    client = make_client(lora.base_url, timeout=30)
    m0 = filter_stat(lora, "lora_misses")
    with ThreadPoolExecutor(max_workers=12) as pool:
        burst = list(pool.map(lambda i: chat(client, 3000 + i, 40, model="sql"), range(24)))
    errors = [o.describe() for o in burst if o.kind != "completed"]
    assert not errors, errors[:3]
    served = harness.per_worker(burst)
    spills = filter_stat(lora, "lora_misses") - m0
    report(f"spill: 24 concurrent sql requests (holder {holder}): per worker {served}, lora_misses {spills}")
    assert spills > 0
    assert len(served) >= 2, served
    assert served.get(holder, 0) >= 4, (holder, served)

    # 3. Failover: kill the adapter's first worker while sql requests keep coming: no client
    # error (the picker still lists it until its frames are 3 s old; the retry takes the next
    # endpoint), and sql is served by the survivors.
    survivors = {w.id for w in workers} - {holder}
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = [pool.submit(chat, client, 4000 + i, 20, model="sql") for i in range(4)]
        stack.workers[holder].proc.kill9()
        after = [pool.submit(chat, client, 4100 + i, 4, model="sql") for i in range(24)]
        outcomes = [f.result() for f in first + after]
    # The requests in flight on a killed worker past their first token are truncated (the
    # first-token contract); every other one completes on a survivor.
    bad = [o.describe() for o in outcomes if o.kind not in ("completed", "truncated")]
    truncated = [o for o in outcomes if o.kind == "truncated"]
    late = outcomes[len(first):]
    report(f"failover: killed {holder} (sql's first worker): {len(outcomes)} sql requests, client errors {len(bad)}, "
           f"truncated in flight {len(truncated)}, later ones served by {harness.per_worker(late)}")
    assert not bad, bad[:3]
    assert all(o.kind == "completed" and o.worker in survivors for o in late), [o.describe() for o in late][:3]
    wait_for(lambda: holders(stack, "sql") & survivors, 5, "sql announced by a survivor")
