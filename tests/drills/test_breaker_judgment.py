"""The breaker judges workers, not requests (issue 11): a worker that fails where others serve
is charged and its circuit opens; a failure that follows the request — the same failure on
every worker it tried — charges nobody; and the panic threshold never leaves the model with no
worker while fresh ones exist.

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 -m pytest tests/drills/test_breaker_judgment.py -v -s
"""

from __future__ import annotations

import json

import openai

from gpuha_harness import access_entries, chat, filter_stat, make_client, per_worker, wait_for
from gpuha_harness import assert_whole_and_single_worker, report, summarize, warm_up

ERROR_BEFORE_TOKEN = ["--error-before-token"]


def test_worker_failing_where_others_serve_is_charged(stack):
    """A worker that fails every request in band (vLLM's engine-death event) while two others
    serve: its failures are noted, charged when the retry is served, and its circuit opens."""
    stack.start_dnsd()
    for i in (1, 2):
        stack.start_worker(f"w{i}", ttft_ms=20, tokens_per_s=500)
    stack.start_worker("wbad", ttft_ms=20, tokens_per_s=500, extra=ERROR_BEFORE_TOKEN)
    stack.wait_fresh(["w1", "w2", "wbad"])
    breaker = {"failure_threshold": 3, "cooldown_ms": 30000}
    envoy = stack.start_pool_router(picker_config=json.dumps({"breaker": breaker}), guard_config=json.dumps({"breaker": breaker}))
    warm_up(stack, envoy)
    client = make_client(envoy.base_url, timeout=10)
    outcomes = [chat(client, i, 3, stream=i % 2 == 0) for i in range(40)]
    trips, follows = filter_stat(envoy, "breaker_trips"), filter_stat(envoy, "request_failures")
    report(f"one failing worker: {summarize(outcomes)}, per worker {per_worker(outcomes)}, breaker_trips {trips}, request_failures {follows}")
    assert_whole_and_single_worker(outcomes)
    assert all(o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes if o.kind != "completed"][:5]
    assert trips >= 1, "the failing worker's circuit never opened: its failures were not charged"
    assert follows == 0


def test_failure_following_the_request_charges_nobody(stack):
    """Every worker fails every request the same way (here: each one's engine-death event; in
    life a request no worker can serve): the failure follows the request, no circuit opens, and
    each client gets an OpenAI-shaped error (the guard's 503 for a stream, the worker's own 500 for a whole answer) after all its attempts, never a 0-attempt refusal."""
    stack.start_dnsd()
    for i in (1, 2, 3):
        stack.start_worker(f"w{i}", ttft_ms=20, tokens_per_s=500, extra=ERROR_BEFORE_TOKEN)
    stack.wait_fresh(["w1", "w2", "w3"])
    envoy = stack.start_pool_router()
    client = make_client(envoy.base_url, timeout=10)
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    outcomes = [chat(client, i, 3, stream=i % 2 == 0) for i in range(20)]
    trips, follows = filter_stat(envoy, "breaker_trips"), filter_stat(envoy, "request_failures")
    entries = access_entries(envoy)
    attempts = [int(e["attempts"] or 0) for e in entries if e["path"].startswith("/v1/chat")]
    report(f"request-shaped failure: {summarize(outcomes)}, breaker_trips {trips}, request_failures {follows}, attempts {sorted(set(attempts))}")
    # The last attempt's error reaches the client whole: the SDK parses it as an OpenAI error.
    def openai_5xx(o) -> bool:
        return o.kind == "error" and isinstance(o.error, openai.APIStatusError) and o.error.status_code in (500, 503)

    bad = [f"{o.describe()} ({type(o.error).__name__})" for o in outcomes if not openai_5xx(o)]
    assert not bad, bad[:3]
    assert trips == 0, "a failure that follows the request opened circuits"
    assert follows >= len(outcomes) - 2
    assert attempts and min(attempts) == 3, f"every request must have been tried on 3 workers: {attempts}"
