"""Fallback-chain drills (envoy/README.md, "Fallback chain"): the whole stack on 127.0.0.1 with
two pools and their routers, a degraded tier and a fake provider behind TLS, driven by the
official `openai` SDK with `max_retries=0`.

  spill     every worker of pool A killed → A's router keeps answering 200 through pool B's
            router until dnsd evicts A (what DNS then answers); B never sends a spilled request
            back (B's router spills to A too: no ping-pong)
  degraded  every full-size worker dead → the degraded tier serves: x-gpuha-tier, the response's
            `model`, max_tokens capped; a normal completion for the SDK
  whale     everything dead → the typed, OpenAI-shaped 503 as without tiers
  provider  a fake OpenAI-compatible provider (TLS on 127.0.0.1, self-signed certificate made
            here) as the last tier: API key sent (the provider refuses any other), model name
            rewritten, a pre-token failure of the degraded tier retried on it invisibly, a
            post-token death a clean truncation

Each drill prints its figures (run with `-s`): the share of answers per tier, and the extra
latency of a spilled or degraded request over one served by the pool's own workers.

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 -m pytest tests/drills/test_tier_drills.py -v -s
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import gpuha_harness as harness
from gpuha_harness import Load, Outcome, access_entries, chat, filter_stat, free_port, make_client, wait_for
from gpuha_harness import is_transport_error, summarize, warm_up

MODEL = "tiny"


def report(line: str) -> None:
    print(f"\n{line}", flush=True)


def shares(entries: list[dict]) -> dict[str, str]:
    """Share of answered requests per tier (access log `tier=`), as percentages."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["tier"] or f"none({e['code']})"] = counts.get(e["tier"] or f"none({e['code']})", 0) + 1
    total = sum(counts.values()) or 1
    return {k: f"{100 * v / total:.0f}% ({v})" for k, v in sorted(counts.items())}


def chat_entries(envoy: harness.Envoy) -> list[dict]:
    return [e for e in access_entries(envoy) if e["path"].endswith("/chat/completions")]


def raw_chat(client, max_tokens: int, stream: bool = False, model: str = MODEL):
    """One request through the SDK's raw-response API: (headers, parsed completion or the
    streamed chunks)."""
    r = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "tier"}],
                                                          max_tokens=max_tokens, stream=stream)
    parsed = r.parse()
    return r.headers, (list(parsed) if stream else parsed)


def ms(xs: list[float]) -> str:
    return f"{1000 * statistics.median(xs):.1f} ms" if xs else "n/a"


def kill_worker(w: harness.Worker) -> None:
    """The machine dies: the worker and its sidecar (silence)."""
    w.proc.kill9()
    if w.sidecar is not None:
        w.sidecar.kill9()



# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_spill_to_another_pool_until_dns_evacuates(stack):
    """Every worker of pool A killed: A's router answers through B's router with 0 client
    errors until dnsd evicts pool A; B never spills back."""
    stack.start_dnsd()
    a = [stack.start_worker(f"a{i}", pool="a") for i in (1, 2)]
    b = [stack.start_worker(f"b{i}", pool="b") for i in (1, 2)]
    stack.wait_fresh([w.id for w in a + b])
    port_a, port_b = free_port(), free_port()
    # Symmetric regions: each router spills to the other; the mark stops a second hop.
    ra = stack.start_pool_router("router-a", workers=a, port=port_a, pool="a", tier_name="a",
                                 spill=[f"b=127.0.0.1:{port_b}"])
    rb = stack.start_pool_router("router-b", workers=b, port=port_b, pool="b", tier_name="b",
                                 spill=[f"a=127.0.0.1:{port_a}"])
    warm_up(stack, ra)
    warm_up(stack, rb)
    client = make_client(ra.base_url)
    max_tokens = 8

    with Load(client, 4, max_tokens) as load:
        wait_for(lambda: len(load.outcomes) >= 40, 20, "40 requests served by pool A")
        kill_mono, kill_wall = time.monotonic(), time.time()
        for w in a:
            kill_worker(w)

        def evicted():
            pools = {p["pool"]: p for p in stack.dnsd.fleet().get("pools", [])}
            return pools.get("a", {}).get("in_window", 1) == 0
        wait_for(evicted, 20, "dnsd to evict pool a (its eviction window)")
        evicted_mono, evicted_wall = time.monotonic(), time.time()
    outcomes = load.outcomes
    after_kill = [o for o in outcomes if o.started > kill_mono]
    before = [o for o in outcomes if o.ended < kill_mono]
    kinds = summarize(after_kill)
    entries = [e for e in chat_entries(ra) if e["start"] and e["start"] >= kill_wall]
    b_entries = chat_entries(rb)
    spilled_in_b = [e for e in b_entries if e["spilled"] == "a"]
    came_back = [e for e in chat_entries(ra) if e["spilled"] == "b"]
    # After the gate: A lists no own worker any more, B's router is the first attempt.
    gated = [o for o in after_kill if o.started > kill_mono + 3.5]
    extra = [o.first_token_at - o.started for o in gated if o.first_token_at]
    own = [o.first_token_at - o.started for o in before if o.first_token_at]
    # Before the gate the dead workers are still listed first: each spill follows their refusals.
    pre_gate = [o.first_token_at - o.started for o in after_kill if kill_mono + 0.3 < o.started < kill_mono + 2.5 and o.first_token_at]
    all_entries = chat_entries(ra)

    # What DNS answers next: B. A client following it reaches B's router directly.
    direct = [chat(make_client(rb.base_url), 9000 + i, max_tokens) for i in range(4)]

    report(f"spill: {len(outcomes)} requests, {len(after_kill)} after the kill of every pool-A worker "
           f"({evicted_mono - kill_mono:.1f} s until dnsd evicted pool a): {kinds}; "
           f"share per tier: whole drill {shares(all_entries)}, after the kill {shares(entries)}; B admitted {filter_stat(rb, 'spill_received')} spilled "
           f"(refused {filter_stat(rb, 'spill_refused')}), sent back to A: {len(came_back)}; "
           f"time to first token: own {ms(own)}, spilled before the 3 s gate (after the dead workers' refusals) {ms(pre_gate)}, "
           f"spilled after it {ms(extra)}, extra {1000 * (statistics.median(extra) - statistics.median(own)):.1f} ms; "
           f"after eviction, direct to B: {summarize(direct)}")

    assert before and len(after_kill) >= 20, f"too little traffic: {len(before)} before, {len(after_kill)} after the kill"
    bad = [o.describe() for o in after_kill if o.kind != "completed"]
    assert not bad, "client errors after the kill:\n" + "\n".join(bad[:10])
    assert all(o.worker in ("b1", "b2") for o in after_kill if o.started > kill_mono + 0.5), \
        "a request sent after the kill was not served by pool B: " + "; ".join(o.describe() for o in after_kill if o.worker not in ("b1", "b2"))[:500]
    assert entries and all(e["tier"] == "b" for e in entries if e["code"] == "200" and e["upstream"] == f"127.0.0.1:{port_b}")
    assert filter_stat(ra, "spilled") >= len(gated) > 0
    assert len(spilled_in_b) >= len(gated), f"B's access log shows {len(spilled_in_b)} spilled requests"
    # No ping-pong: B listed only its own workers for spilled requests, and never spilled one back.
    for e in spilled_in_b:
        assert f"127.0.0.1:{port_a}" not in e["endpoints"], f"B listed A for a spilled request: {e}"
    assert not came_back and filter_stat(rb, "spilled") == 0
    assert all(o.kind == "completed" and o.worker in ("b1", "b2") for o in direct)
    assert evicted_wall > kill_wall


@pytest.mark.slow
def test_spill_budget_refuses_beyond_its_share(stack):
    """B's router admits spilled requests up to its share of B's capacity; beyond it an
    immediate 503 sends them on down A's chain (here: A's degraded tier)."""
    stack.start_dnsd()
    a = [stack.start_worker("a1", pool="a")]
    # B: 1 worker x 2 slots x share 0.5 = 1 spilled request at a time; slow tokens keep it busy.
    b = [stack.start_worker("b1", pool="b", tokens_per_s=20)]
    small = stack.start_worker("s1", model="small", sidecar=False)
    stack.wait_fresh(["a1", "b1"])
    port_b = free_port()
    rb = stack.start_pool_router("router-b", workers=b, port=port_b, pool="b", tier_name="b", spill_share=0.5, spill_slots=2)
    small_port = free_port()
    ra = stack.start_pool_router("router-a", workers=a, pool="a", tier_name="a", spill=[f"b=127.0.0.1:{port_b}"],
                                 degraded=json.dumps({"name": "small", "port": small_port, "workers": [small.addr], "model": "small"}))
    warm_up(stack, ra)
    warm_up(stack, rb)
    kill_worker(a[0])
    stack.wait_stale(["a1"])
    client = make_client(ra.base_url)
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda i: chat(client, i, 10, timeout=20), range(6)))
    by = {}
    for o in outcomes:
        by[o.worker] = by.get(o.worker, 0) + 1
    report(f"spill budget: 6 concurrent requests with pool A dead and B's budget at 1: served by {by}; "
           f"B admitted {filter_stat(rb, 'spill_received')}, refused {filter_stat(rb, 'spill_refused')}")
    assert all(o.error is None and o.finish_reason for o in outcomes), [o.describe() for o in outcomes]
    assert by.get("b1", 0) >= 1 and by.get("s1", 0) >= 1, by
    assert filter_stat(rb, "spill_refused") >= 1


def degraded_tier(port: int, worker: harness.Worker, max_tokens: int = 5) -> str:
    return json.dumps({"name": "small", "port": port, "workers": [worker.addr], "model": "small",
                       "max_tokens": max_tokens, "set": {"temperature": 0}})


@pytest.mark.slow
def test_degraded_tier_serves_when_every_full_size_worker_is_dead(stack):
    stack.start_dnsd()
    a = [stack.start_worker(f"a{i}", pool="a") for i in (1, 2)]
    small = stack.start_worker("s1", model="small", sidecar=False)
    stack.wait_fresh([w.id for w in a])
    ra = stack.start_pool_router("router-a", workers=a, pool="a", tier_name="a",
                                 degraded=degraded_tier(free_port(), small, max_tokens=5))
    warm_up(stack, ra)
    client = make_client(ra.base_url)
    max_tokens = 20

    own = [chat(client, i, max_tokens) for i in range(10)]
    h_own, c_own = raw_chat(client, max_tokens)
    with Load(client, 4, max_tokens) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 20, "20 requests before the kill")
        kill_mono, kill_wall = time.monotonic(), time.time()
        for w in a:
            kill_worker(w)
        wait_for(lambda: sum(o.started > kill_mono + 3.5 for o in load.outcomes) >= 20, 30,
                 "20 requests after the freshness gate")
    after = [o for o in load.outcomes if o.started > kill_mono]
    h_deg, c_deg = raw_chat(client, max_tokens)
    h_stream, chunks = raw_chat(client, max_tokens, stream=True)
    all_entries = chat_entries(ra)
    entries = [e for e in all_entries if e["start"] and e["start"] >= kill_wall]
    degraded = [o for o in after if o.worker == "s1"]
    pre_gate = [o.first_token_at - o.started for o in degraded if kill_mono + 0.3 < o.started < kill_mono + 2.5 and o.first_token_at]
    # Same load, before the kill: the own workers' time to first token.
    own_ttft = [o.first_token_at - o.started for o in load.outcomes if o.ended < kill_mono and o.first_token_at]
    deg_ttft = [o.first_token_at - o.started for o in degraded if o.started > kill_mono + 3.5 and o.first_token_at]

    report(f"degraded: {len(after)} requests after every full-size worker died: {summarize(after)} "
           f"(completed = {max_tokens} tokens asked; degraded answers are capped at 5); served by "
           f"{ {w: sum(o.worker == w for o in after) for w in ('a1', 'a2', 's1')} }; share per tier: whole drill "
           f"{shares(all_entries)}, after the kill {shares(entries)}; time to first token own {ms(own_ttft)}, "
           f"degraded before the 3 s gate {ms(pre_gate)}, after it {ms(deg_ttft)}, "
           f"extra {1000 * (statistics.median(deg_ttft) - statistics.median(own_ttft)):.1f} ms; "
           f"gpuha.degraded={filter_stat(ra, 'degraded')} tier_adapted={filter_stat(ra, 'tier_adapted')}")

    assert all(o.kind == "completed" for o in own)
    assert h_own.get("x-gpuha-tier") == "a" and c_own.model == MODEL
    # No client error at all; every answer whole, from one worker.
    bad = [o.describe() for o in after if o.error is not None or o.spliced or not o.finish_reason]
    assert not bad, "client errors after the kill:\n" + "\n".join(bad[:10])
    assert len(degraded) >= 20
    for o in degraded:
        assert len(o.tokens) == 5 and o.finish_reason == "length", f"not capped at 5: {o.describe()}"
    # What the SDK user sees without headers: the served model's name.
    assert h_deg.get("x-gpuha-tier") == "small" and c_deg.model == "small"
    assert c_deg.choices[0].finish_reason == "length" and len(harness.TOKEN_RX.findall(c_deg.choices[0].message.content)) == 5
    assert h_stream.get("x-gpuha-tier") == "small" and chunks and all(ch.model == "small" for ch in chunks)
    assert filter_stat(ra, "degraded") >= len(degraded) and filter_stat(ra, "tier_adapted") >= len(degraded)
    assert all(e["tier"] in ("a", "small") for e in entries if e["code"] == "200")

    # Everything dead: the typed OpenAI-shaped 503, as without tiers.
    kill_worker(small)
    for stream in (False, True):
        try:
            raw_chat(client, max_tokens, stream=stream)
            raise AssertionError("everything dead, yet an answer")
        except openai.APIStatusError as e:
            body = e.response.json() if not stream else None
            report(f"whale (stream={stream}): {e.status_code} {e.response.headers.get('content-type')} "
                   f"retry-after={e.response.headers.get('retry-after')}")
            assert e.status_code == 503 and e.response.headers.get("retry-after")
            assert e.response.headers.get("x-gpuha-tier") is None
            if body is not None:
                assert body["error"]["code"] == 503 or body["error"].get("type"), body


# --------------------------------------------------------------------------------------------
# The fake provider: fake-vllm behind a TLS-terminating Envoy that demands one API key.

PROVIDER_HOST = "provider.test"
PROVIDER_MODEL = "gpt-fake"

PROVIDER_YAML = """
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: tls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    # Reads the SNI the router sent (%REQUESTED_SERVER_NAME% in the log below).
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: provider
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{log}"
              log_format: {{ text_format_source: {{ inline_string: "%RESPONSE_CODE% host=%REQ(:AUTHORITY)% sni=%REQUESTED_SERVER_NAME%\\n" }} }}
          route_config:
            virtual_hosts:
            - name: provider
              domains: ["*"]
              routes:
              - match:
                  prefix: "/"
                  headers: [{{ name: authorization, string_match: {{ exact: "Bearer {api_key}" }} }}]
                route: {{ cluster: backend, timeout: 0s }}
              - match: {{ prefix: "/" }}
                direct_response:
                  status: 401
                  body: {{ inline_string: '{{"error":{{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}}}' }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 0.5s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backend_port} }} }} }}
"""


def start_provider(stack: harness.Stack, api_key: str) -> tuple[harness.Envoy, harness.Worker, str]:
    """The fake provider: (its TLS Envoy, the fake-vllm behind it, the CA file to trust)."""
    d = stack.logdir
    cert, key = d / "provider.crt", d / "provider.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={PROVIDER_HOST}",
                    "-addext", f"subjectAltName=DNS:{PROVIDER_HOST}"], check=True, capture_output=True, timeout=30)
    backend = stack.start_worker("p1", model=PROVIDER_MODEL, sidecar=False, tokens_per_s=50)
    port = free_port()
    cfg = d / "provider.yaml"
    log = d / "provider.access.log"
    cfg.write_text(PROVIDER_YAML.format(port=port, cert=cert, key=key, log=log, api_key=api_key, backend_port=backend.port))
    envoy = stack.start_envoy("provider", cfg, port, access_log=log)
    return envoy, backend, str(cert)


@pytest.mark.slow
def test_provider_over_tls_is_the_last_tier(stack):
    stack.start_dnsd()
    a = [stack.start_worker("a1", pool="a")]
    # The degraded tier fails every request before its first token (vLLM's in-band engine error).
    small = stack.start_worker("s1", model="small", sidecar=False, extra=["--error-before-token"])
    stack.wait_fresh(["a1"])
    api_key = "sk-test-" + "x" * 24
    key_file = stack.logdir / "provider.api-key"
    key_file.write_text(api_key + "\n")  # as `echo KEY > file` writes it
    provider, backend, ca = start_provider(stack, api_key)
    provider_tier = json.dumps({"name": "prov", "port": free_port(), "url": f"https://{PROVIDER_HOST}:{provider.port}/v1",
                                "address": "127.0.0.1", "model": PROVIDER_MODEL, "max_tokens": 50,
                                "api_key_file": str(key_file), "ca_file": ca})
    ra = stack.start_pool_router("router-a", workers=a, pool="a", tier_name="a",
                                 degraded=degraded_tier(free_port(), small), provider=provider_tier)
    warm_up(stack, ra)
    client = make_client(ra.base_url)

    # Without the router: the provider refuses a wrong key (so the key the router sends is checked).
    wrong = openai.OpenAI(base_url=f"https://127.0.0.1:{provider.port}/v1", api_key="sk-wrong", max_retries=0,
                          http_client=openai.DefaultHttpxClient(verify=False, trust_env=False))
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=PROVIDER_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)

    own = [chat(client, i, 10) for i in range(5)]
    kill_worker(a[0])
    stack.wait_stale(["a1"])
    polls = filter_stat(ra, "fleet_polls")
    wait_for(lambda: filter_stat(ra, "fleet_polls") >= polls + 2, 5, "two more fleet polls")
    t_wall = time.time()
    served = [chat(client, 100 + i, 10) for i in range(10)]
    h, c = raw_chat(client, 10)
    entries = [e for e in chat_entries(ra) if e["start"] and e["start"] >= t_wall]
    provider_log = provider.access_log_entries()
    own_ttft = [o.first_token_at - o.started for o in own if o.first_token_at]
    prov_ttft = [o.first_token_at - o.started for o in served if o.first_token_at]

    # After the first token: the provider dies mid-stream → a clean truncation, nothing spliced.
    def die(o: Outcome) -> None:
        backend.proc.kill9()
    cut = chat(client, 500, 200, on_first_token=die)

    report(f"provider: {len(served)} requests with a1 dead and the degraded tier failing before its first token: "
           f"{summarize(served)}, served by {sorted({o.worker for o in served})}; share per tier: whole drill "
           f"{shares(chat_entries(ra))}, after a1 died {shares(entries)}; "
           f"provider calls {filter_stat(ra, 'provider_calls')}; time to first token own {ms(own_ttft)}, "
           f"via degraded failure + provider (TLS) {ms(prov_ttft)}; provider log {provider_log[-1:]}; "
           f"post-token death: {cut.describe()}")

    assert all(o.kind == "completed" and o.worker == "a1" for o in own)
    for o in served:
        # Pre-token failure on the degraded tier's last candidate → the provider, invisibly.
        assert o.kind == "completed" and o.worker == "p1", o.describe()
    assert h.get("x-gpuha-tier") == "prov" and c.model == PROVIDER_MODEL
    assert entries and all(e["tier"] == "prov" and e["attempts"] >= 2 for e in entries if e["code"] == "200"), entries[:3]
    # The provider saw our key (its route matched: 200s), its own host name and SNI.
    ok = [line for line in provider_log if line.startswith("200 ")]
    assert len(ok) >= len(served) and all(f"host={PROVIDER_HOST}:{provider.port}" in line and f"sni={PROVIDER_HOST}" in line for line in ok)
    assert filter_stat(ra, "provider_served") >= len(served)
    assert cut.kind == "truncated" and cut.worker == "p1" and is_transport_error(cut.error), cut.describe()
