"""The breaker judges workers, not requests (issue 11): a worker that fails where others serve
is charged and its circuit opens; a failure that follows the request — the same failure on
every worker it tried — charges nobody; and the panic threshold never leaves the model with no
worker while fresh ones exist. And the breaker's own cycle: a worker that resets every request is
skipped after `failure_threshold` failures and probed once after the cool-down; clients that hang
up during a healthy worker's time to first token never open its circuit.

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 -m pytest tests/drills/test_breaker_judgment.py -v -s
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from gpuha_harness import Outcome, access_entries, chat, filter_stat, make_client, per_worker, wait_for
from gpuha_harness import assert_whole_and_single_worker, report, summarize, warm_up

ERROR_BEFORE_TOKEN = ["--error-before-token"]


def router_with_breaker(stack, threshold: int = 3, cooldown_ms: int = 30000, **render_opts):
    """A pool router whose picker and guard share one breaker configuration. With a
    `per_try_timeout`, that budget applies to every request: requests that do not stream too
    (`non_stream_timeout_ms: 0`; by default they get the picker's own budget, which covers their
    whole answer), so that the drills of per-try timeouts judge both kinds."""
    breaker = {"failure_threshold": threshold, "cooldown_ms": cooldown_ms}
    picker = {"breaker": breaker, **({"non_stream_timeout_ms": 0} if "per_try_timeout" in render_opts else {})}
    return stack.start_pool_router(picker_config=json.dumps(picker), guard_config=json.dumps({"breaker": breaker}), **render_opts)


def test_worker_failing_where_others_serve_is_charged(stack):
    """A worker that fails every request in band (vLLM's engine-death event) while two others
    serve: its failures are noted, charged when the retry is served, and its circuit opens."""
    stack.start_dnsd()
    for i in (1, 2):
        stack.start_worker(f"w{i}", ttft_ms=20, tokens_per_s=500)
    stack.start_worker("wbad", ttft_ms=20, tokens_per_s=500, extra=ERROR_BEFORE_TOKEN)
    stack.wait_fresh(["w1", "w2", "wbad"])
    envoy = router_with_breaker(stack)
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


def test_slow_prompts_open_no_circuit(stack):
    """A prompt whose time to first token exceeds the per-try timeout on every worker (a huge
    prefill, in life) fails the same way everywhere: the failure follows the request, so it
    opens no circuit, and the next such request is tried on every worker again, not refused.
    Envoy flags a per-try timeout only on a request's last attempt; the guard knows the others
    by their budget (`x-envoy-expected-rq-timeout-ms`). One slow worker among fast ones is
    still charged: its timeouts are not the request's."""
    stack.start_dnsd()
    for i in (1, 2, 3):
        stack.start_worker(f"w{i}", ttft_ms=1500, tokens_per_s=500)
    stack.wait_fresh(["w1", "w2", "w3"])
    threshold = 3
    envoy = router_with_breaker(stack, threshold, per_try_timeout="0.4s")
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    client = make_client(envoy.base_url, timeout=10)
    outcomes = [chat(client, i, 3, stream=i % 2 == 0) for i in range(2 * threshold)]
    trips, follows = filter_stat(envoy, "breaker_trips"), filter_stat(envoy, "request_failures")
    attempts = [int(e["attempts"] or 0) for e in access_entries(envoy) if e["path"].startswith("/v1/chat")]
    report(f"slow prompts everywhere: {summarize(outcomes)}, breaker_trips {trips}, request_failures {follows}, "
           f"pre_token_retries {filter_stat(envoy, 'pre_token_retries')}, attempts {attempts}")
    # Honest: nothing could serve it in time; each client gets an OpenAI-shaped error.
    assert all(o.kind == "error" for o in outcomes), [o.describe() for o in outcomes]
    assert trips == 0, f"slow prompts opened {trips} circuits of workers that were only slow for them"
    assert follows >= len(outcomes) - 1, f"only {follows} of {len(outcomes)} requests judged as failing everywhere"
    assert attempts and min(attempts) == 3, f"every request must still be tried on the 3 workers: {attempts}"


def test_one_slow_worker_is_still_charged(stack):
    """The other side of `test_slow_prompts_open_no_circuit`: a worker that misses the per-try
    timeout where two others answer in time is charged, and its circuit opens."""
    stack.start_dnsd()
    for i in (1, 2):
        stack.start_worker(f"w{i}", ttft_ms=20, tokens_per_s=500)
    stack.start_worker("wslow", ttft_ms=1500, tokens_per_s=500)
    stack.wait_fresh(["w1", "w2", "wslow"])
    envoy = router_with_breaker(stack, per_try_timeout="0.4s")
    warm_up(stack, envoy)
    client = make_client(envoy.base_url, timeout=10)
    outcomes = [chat(client, i, 3, stream=i % 2 == 0) for i in range(30)]
    trips, follows = filter_stat(envoy, "breaker_trips"), filter_stat(envoy, "request_failures")
    report(f"one slow worker: {summarize(outcomes)}, per worker {per_worker(outcomes)}, breaker_trips {trips}, request_failures {follows}")
    assert_whole_and_single_worker(outcomes)
    assert all(o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes if o.kind != "completed"][:5]
    assert "wslow" not in per_worker(outcomes)
    assert trips >= 1, "the slow worker's circuit never opened: its timeouts were not charged"
    assert follows == 0


def test_breaker_opens_and_probes(stack):
    """A worker that resets every request (its sidecar still reports it fresh) is skipped
    after `failure_threshold` failures, then probed once after the cool-down."""
    stack.start_dnsd()
    good = [stack.start_worker(f"w{i}", ttft_ms=20, tokens_per_s=500) for i in (1, 2)]
    bad = stack.start_worker("wbad", ttft_ms=20, tokens_per_s=500, extra=["--reset-after-tokens", "0"])
    stack.wait_fresh(["w1", "w2", "wbad"])
    threshold, cooldown_ms = 3, 3000
    envoy = router_with_breaker(stack, threshold, cooldown_ms)
    warm_up(stack, envoy)
    client = make_client(envoy.base_url, timeout=10)

    def bad_attempts() -> int:
        s = envoy.host_stats("gpuha_workers").get(bad.addr, {})
        return int(s.get("rq_total", 0))

    outcomes: list[Outcome] = []
    wait_for(lambda: filter_stat(envoy, "breaker_trips") >= 1 or (outcomes.append(chat(client, len(outcomes), 3)) and False),
             15, "the breaker of wbad to open", interval=0.0)
    tripped = time.monotonic()
    at_trip = bad_attempts()
    # Open: wbad gets nothing for the cool-down.
    open_outcomes = []
    while time.monotonic() < tripped + cooldown_ms / 1000 * 0.8:
        open_outcomes.append(chat(client, 1000 + len(open_outcomes), 3))
    during_open = bad_attempts() - at_trip
    # Half-open: exactly one probe goes through, fails, the circuit opens again (doubled).
    probes0 = filter_stat(envoy, "breaker_probes")
    probe_outcomes: list[Outcome] = []
    wait_for(lambda: filter_stat(envoy, "breaker_probes") > probes0 or (probe_outcomes.append(chat(client, 2000 + len(probe_outcomes), 3)) and False),
             cooldown_ms / 1000 + 5, "a half-open probe to wbad", interval=0.0)
    probed_after = time.monotonic() - tripped
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        probe_outcomes.append(chat(client, 2000 + len(probe_outcomes), 3))
    after_probe = bad_attempts() - at_trip - during_open
    everything = outcomes + open_outcomes + probe_outcomes
    report(f"breaker: {len(everything)} requests, {sum(o.kind == 'completed' for o in everything)} completed, "
           f"{sum(o.kind == 'error' for o in everything)} client errors; wbad attempts before the trip {at_trip} "
           f"(threshold {threshold}), while open {during_open} ({len(open_outcomes)} requests), probed "
           f"{probed_after:.1f}s after the trip (cool-down {cooldown_ms / 1000:.0f}s), attempts after the probe {after_probe}; "
           f"trips {filter_stat(envoy, 'breaker_trips')}, per worker {per_worker(everything)}")
    assert_whole_and_single_worker(everything)
    assert all(o.kind == "completed" for o in everything), [o.describe() for o in everything if o.kind != "completed"][:5]
    assert "wbad" not in per_worker(everything)
    # Two Envoy threads may each send one more before the trip is visible to both.
    assert threshold <= at_trip <= threshold + 2, f"wbad got {at_trip} attempts before its breaker opened"
    assert during_open == 0, f"wbad got {during_open} attempts while its circuit was open"
    assert probed_after >= cooldown_ms / 1000 * 0.9, f"probed {probed_after:.1f}s after the trip, before the cool-down"
    assert 1 <= after_probe <= 2, f"{after_probe} attempts in half-open; expected one probe"


def test_client_cancels_do_not_open_the_breaker(stack):
    """Clients that hang up before their first token (a user pressing stop, an SDK timeout) say
    nothing about the worker: its circuit stays closed and the next request is served."""
    stack.start_dnsd()
    slow = stack.start_worker("w1", ttft_ms=1500, tokens_per_s=200)
    stack.wait_fresh(["w1"])
    threshold = 3
    envoy = router_with_breaker(stack, threshold)
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    impatient = make_client(envoy.base_url, timeout=0.3)
    cancelled = [chat(impatient, i, 3) for i in range(2 * threshold)]
    assert all(o.kind == "error" for o in cancelled), [o.describe() for o in cancelled]
    wait_for(lambda: filter_stat(envoy, "client_cancels") >= 2 * threshold, 5, "the guard to count the cancels")
    patient = make_client(envoy.base_url, timeout=10)
    after = chat(patient, 100, 3)
    report(f"cancels: {len(cancelled)} clients hung up before the first token; client_cancels "
           f"{filter_stat(envoy, 'client_cancels')}, breaker_trips {filter_stat(envoy, 'breaker_trips')}, "
           f"pre_token_retries {filter_stat(envoy, 'pre_token_retries')}; next request: {after.describe()}")
    assert filter_stat(envoy, "breaker_trips") == 0, "client cancels opened the worker's circuit"
    assert after.kind == "completed" and after.worker == slow.id, after.describe()


def test_a_request_id_a_client_reuses_charges_no_other_request(stack):
    """The notes of a request's failed attempts were keyed by its `x-request-id`, which Envoy keeps
    as the client sent it (a request it counts as internal). A long prompt that timed out on every
    worker (a failure that follows the request: charged to nobody) then had its timeouts charged at
    the success of a short request that reused its id: a client that sends one id with everything
    could open every circuit. The picker now keys them with a random value of its own."""
    stack.start_dnsd()
    # Prefill time grows with the prompt, no prefix cache: a 4 000-word prompt takes 0.8 s on
    # every worker, past the 0.4 s per-try budget; a short one, 20 ms.
    slow_prefill = ["--prefill-us-per-token", "200", "--prefix-cache-tokens", "0"]
    for i in (1, 2, 3):
        stack.start_worker(f"w{i}", ttft_ms=20, tokens_per_s=500, extra=slow_prefill)
    stack.wait_fresh(["w1", "w2", "w3"])
    threshold = 3
    envoy = router_with_breaker(stack, threshold, per_try_timeout="0.4s")
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    client = make_client(envoy.base_url, timeout=10)
    # The picker's own key too, which it must not take from a client.
    same_id = {"x-request-id": "one-id-for-everything", "x-gpuha-request": "one-key-for-everything"}
    long_prompt = [{"role": "user", "content": "word " * 4000}]
    rounds, short = 4, []
    for r in range(rounds):
        retries = filter_stat(envoy, "pre_token_retries")
        with ThreadPoolExecutor(max_workers=1) as ex:
            long = ex.submit(chat, client, 100 + r, 2, False, extra_headers=same_id, messages=long_prompt)
            # Once the long request's first attempt has failed (a note is written), short
            # requests with the same id are served.
            for k in (1, 2):
                wait_for(lambda: filter_stat(envoy, "pre_token_retries") >= retries + k or long.done(), 10,
                         f"round {r}: the long prompt's attempt {k} failed")
                short.append(chat(client, 10 * r + k, 2, stream=False, extra_headers=same_id))
            long_outcome = long.result(timeout=30)
        assert long_outcome.kind == "error", f"round {r}: the long prompt was served: the drill tested nothing"
    trips, follows = filter_stat(envoy, "breaker_trips"), filter_stat(envoy, "request_failures")
    report(f"one x-request-id for a long prompt failing everywhere and short ones served: {summarize(short)}; "
           f"breaker_trips {trips}, request_failures {follows}")
    assert all(o.kind == "completed" for o in short), [o.describe() for o in short if o.kind != "completed"][:3]
    assert follows >= rounds - 1, "the long prompt's failures were not judged as following the request"
    assert trips == 0, "another request's failures were charged at a short request's success"
