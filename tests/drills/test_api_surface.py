"""API-surface drills: the official `openai` SDK against every endpoint a vLLM worker serves,
through the pool router AND directly against a worker, with the same results (status, content
type, and the shape of every body or streamed event: keys, types and the values that name a
kind of thing; token text and ids differ per worker and per request, so they are compared by
type only). The guard judges only chat/completions and the Responses API; everything else must
pass through it unjudged, and none of it may cost a retry or open a circuit.

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 -m pytest -q -s tests/drills/test_api_surface.py
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gpuha_harness as harness
from gpuha_harness import chat, filter_stat, make_client, report, wait_for
from gpuha_harness.api_surface import compare, exercise

MODEL = "tiny"
def start(stack: harness.Stack, n: int = 2) -> tuple[list[harness.Worker], harness.Envoy]:
    stack.start_dnsd()
    workers = stack.start_workers(n, ttft_ms=20, tokens_per_s=500)
    envoy = stack.start_pool_router()
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    return workers, envoy


# --------------------------------------------------------------------------------------------


def test_every_endpoint_same_through_the_router_as_direct(stack):
    """Every endpoint, by the openai SDK: the router answers what the worker answers."""
    workers, envoy = start(stack)
    direct_worker = workers[0]
    direct = exercise(make_client(f"http://{direct_worker.addr}/v1", timeout=15), f"http://{direct_worker.addr}")
    routed = exercise(make_client(envoy.base_url, timeout=15), f"http://127.0.0.1:{envoy.port}")
    matched, differ = compare(direct, routed)
    not_ok = [f"{n}: {direct[n][0]}" for n in direct if direct[n][0] != 200]
    # The n=2 answers really carry two choices (streamed: one event per choice and step).
    assert len(routed["chat n=2"][2]["choices"]) == 2, routed["chat n=2"]
    assert {c["index"] for ev in routed["chat n=2 stream"][2] for c in ev["choices"]} == {"int"}
    assert sum(len(ev["choices"]) for ev in routed["chat n=2 stream"][2]) == 2 * (1 + 4), "2 roles + 2 x 4 tokens"
    retries, trips = filter_stat(envoy, "pre_token_retries"), filter_stat(envoy, "breaker_trips")
    report(f"api surface: {len(matched)}/{len(direct)} endpoints the same through the router as direct "
           f"({', '.join(matched)}); differ: {differ or 'none'}; non-200 direct: {not_ok or 'none'}; "
           f"pre_token_retries {retries}, breaker_trips {trips}, picks {filter_stat(envoy, 'picks')}")
    assert not not_ok, not_ok
    assert not differ, "\n".join(differ)
    assert retries == 0, f"{retries} pre-token retries for a fleet that never failed"
    assert trips == 0, f"{trips} circuits opened for a fleet that never failed"


def test_responses_streams_among_chat_never_open_a_circuit(stack):
    """A few streaming responses.create calls interleaved with chat calls: every one completes
    whole from one worker, and no circuit opens (a Responses stream ends with no `[DONE]`: a
    guard that judged it as chat would call it a failure)."""
    workers, envoy = start(stack)
    client = make_client(envoy.base_url, timeout=15)

    def responses_stream(i: int) -> tuple[str, str, list[str]]:
        types, text = [], ""
        s = client.responses.create(model=MODEL, input=f"responses {i}", max_output_tokens=5, stream=True)
        try:
            for ev in s:
                types.append(ev.type)
                if ev.type == "response.output_text.delta":
                    text += ev.delta
        finally:
            s.close()
        return "responses", text, types

    def one(i: int):
        if i % 4 == 1:
            return responses_stream(i)
        o = chat(client, i, 5, stream=i % 2 == 0)
        return "chat", o.text, [o.kind] + ([repr(o.error)] if o.error else [])

    n = 24
    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(one, range(n)))
    bad = []
    for i, (kind, text, seen) in enumerate(results):
        toks = harness.TOKEN_RX.findall(text)
        whole = len(toks) == 5 and len({w for w, _ in toks}) == 1 and [int(k) for _, k in toks] == list(range(5))
        if kind == "responses":
            whole = whole and seen[-1] == "response.completed" and "response.failed" not in seen
        elif seen[0] != "completed":
            whole = False
        if not whole:
            bad.append(f"#{i} {kind} {text!r} {seen[-3:]}")
    trips, retries = filter_stat(envoy, "breaker_trips"), filter_stat(envoy, "pre_token_retries")
    n_resp = sum(1 for k, _, _ in results if k == "responses")
    report(f"responses among chat: {n} requests ({n_resp} Responses streams), {n - len(bad)} whole; "
           f"breaker_trips {trips}, pre_token_retries {retries}")
    assert not bad, "\n".join(bad)
    assert trips == 0, f"{trips} circuits opened by healthy Responses streams"
    assert retries == 0, f"{retries} retries of healthy requests"
