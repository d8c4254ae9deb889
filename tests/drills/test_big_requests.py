"""Big-request drills: request bodies of 1, 10 and 30 MB (long contexts; multimodal requests with
base64 images are often several MB) pass the pool router with the pre-token retry intact, bodies
above the limit get an OpenAI-shaped 413 that names the limit and the option that raises it,
and multipart bodies (audio transcriptions) get a pick.

The whole stack on 127.0.0.1 (fake vLLM workers, sidecars, dnsd, stock Envoy with the gpuha
filter), driven by the official `openai` SDK with `max_retries=0`. Each drill prints what it
measured (run with `-s`).

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \
        python3 -m pytest -q -s tests/drills/test_big_requests.py
"""

from __future__ import annotations

import json
import statistics
import time

import openai
import pytest

import gpuha_harness as harness
from gpuha_harness import access_entries, filter_stat, make_client, wait_for

MB = 1_000_000
MiB = 1 << 20
SIZES = [1 * MB, 10 * MB, 30 * MB]


def report(line: str) -> None:
    print(f"\n{line}", flush=True)


def warm_up(envoy: harness.Envoy) -> None:
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    client = make_client(envoy.base_url)
    before = filter_stat(envoy, "picks")

    def one_pick():
        big_chat(client, 10)
        return filter_stat(envoy, "picks") > before

    wait_for(one_pick, 10, "a request routed by the picker (gpuha.picks rising)", interval=0.1)


def big_chat(client, body_bytes: int, stream: bool = True, idx: int = 0) -> tuple[str, float]:
    """One chat completion whose JSON body is about `body_bytes` long (one long user message, in
    the SDK's order: `messages` before `model`, so the picker must walk past it). Returns the
    text and the seconds from the call to the end of the answer."""
    content = "x" * max(1, body_bytes - 100)
    t0 = time.monotonic()
    if stream:
        s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=4,
                                           stream=True, extra_headers={"x-drill-request": str(idx)})
        text = "".join(ch.delta.content or "" for chunk in s for ch in chunk.choices if ch.delta)
    else:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=4,
                                           extra_headers={"x-drill-request": str(idx)})
        text = r.choices[0].message.content or ""
    return text, time.monotonic() - t0


def workers_of(text: str) -> set[str]:
    # Every fake-vllm token names its worker: " w1:0 w1:1 ...".
    return {t.split(":")[0] for t in text.split() if ":" in t}


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


# --------------------------------------------------------------------------------------------


def test_big_bodies_pass_and_what_they_cost(stack):
    """1, 10 and 30 MB bodies pass the router (200, a normal completion, a real pick); the
    added latency over a direct call to the worker is printed per size."""
    stack.start_dnsd()
    workers = stack.start_workers(2, ttft_ms=10, tokens_per_s=0)
    envoy = stack.start_pool_router()
    warm_up(envoy)
    via = make_client(envoy.base_url, timeout=60)
    direct = make_client(f"http://{workers[0].addr}/v1", timeout=60)

    rows = []
    for size in [200, *SIZES]:
        picks, fail_open = filter_stat(envoy, "picks"), filter_stat(envoy, "fail_open")
        t_via, t_direct = [], []
        for i in range(3):
            text, dt = big_chat(via, size, idx=i)
            assert len(text.split()) == 4 and len(workers_of(text)) == 1, f"{size} B: not one clean answer: {text!r}"
            t_via.append(dt)
            _, dt = big_chat(direct, size)
            t_direct.append(dt)
        assert filter_stat(envoy, "picks") - picks == 3, f"{size} B: the picker did not pick every request"
        assert filter_stat(envoy, "fail_open") == fail_open, f"{size} B: the picker failed open"
        rows.append((size, median_ms(t_direct), median_ms(t_via)))

    entries = [e for e in access_entries(envoy) if e["path"].endswith("/chat/completions")]
    assert entries and all(e["code"] == "200" for e in entries), [e["code"] for e in entries]
    tiny_added = rows[0][2] - rows[0][1]
    lines = [f"{size / MB:6.1f} MB: direct {d:7.1f} ms, via router {v:7.1f} ms, added {v - d:6.1f} ms "
             f"({v - d - tiny_added:+6.1f} ms vs a tiny body)" for size, d, v in rows]
    report("big bodies (median of 3, streaming chat, 4 tokens):\n" + "\n".join(lines))


def test_big_body_retried_before_first_token_on_another_worker(stack):
    """A 30 MB body whose first attempt lands on a worker that dies before its first token is
    retried on another worker: the client sees one clean completion. Also measures what a
    retry costs (tiny and 30 MB bodies) now that the back-off is 1 ms."""
    stack.start_dnsd()
    good = stack.start_worker("w1", ttft_ms=10, tokens_per_s=0)
    # Two of three workers drop the connection right after their 200 headers, before the first
    # token (TTFT 0: the failure costs no wait of its own, what is measured is the retry).
    bad = [stack.start_worker(f"w{i}", ttft_ms=0, tokens_per_s=0, extra=["--reset-after-tokens", "0"]) for i in (2, 3)]
    stack.wait_fresh(["w1", "w2", "w3"])
    # Breakers that never trip here: every request may still be sent to a failing worker first.
    no_trip = {"breaker": {"failure_threshold": 1000}}
    # Every idle worker predicted as fast as the others: the picker spreads first attempts over
    # all three (otherwise w1's measured 10 ms beats the failing workers' unknown TTFT).
    # Affinity off: every body here has the same prompt, which would pin them to one worker.
    picker = {**no_trip, "pick": {"default_ttft_ms": 1, "affinity": {"enabled": False}}}
    envoy = stack.start_pool_router(picker_config=json.dumps(picker), guard_config=json.dumps(no_trip))
    warm_up(envoy)
    client = make_client(envoy.base_url, timeout=60)
    bad_addrs = {w.addr for w in bad}

    def run(size: int, n: int) -> dict[int, list[float]]:
        """n requests of `size`; latencies by the attempt count in the access log."""
        out: dict[int, list[float]] = {1: [], 2: [], 3: []}
        for i in range(n):
            before = len(access_entries(envoy))
            text, dt = big_chat(client, size, idx=i)
            assert workers_of(text) == {"w1"} and len(text.split()) == 4, f"{size} B: not one clean answer from w1: {text!r}"
            e = access_entries(envoy)[before:]
            e = [x for x in e if x["path"].endswith("/chat/completions")]
            assert len(e) == 1 and e[0]["code"] == "200" and e[0]["upstream"] == good.addr, e
            assert e[0]["attempts"] in out, e[0]
            if e[0]["attempts"] >= 2:
                assert e[0]["endpoints"][0] in bad_addrs, e[0]
            out[e[0]["attempts"]].append(dt)
        return out

    retries_before = filter_stat(envoy, "pre_token_retries")
    big = run(30 * MB, 8)
    # 2 of 3 workers fail: 8 requests all landing first on w1 has odds of 1 in 6561.
    retried = len(big[2]) + len(big[3])
    assert retried, "no 30 MB request was first sent to a failing worker"
    assert filter_stat(envoy, "pre_token_retries") - retries_before == len(big[2]) + 2 * len(big[3])
    abandoned = envoy.stats(r"retry_or_shadow_abandoned").get("cluster.gpuha_workers.retry_or_shadow_abandoned", 0)
    assert abandoned == 0, f"Envoy gave up retrying {abandoned} requests: the body did not fit its retry buffer"
    tiny = run(200, 40)
    assert tiny[1] and (tiny[2] or tiny[3]), tiny

    def line(name: str, d: dict[int, list[float]]) -> str:
        parts = []
        for k in (1, 2, 3):
            if d[k]:
                added = f", {(median_ms(d[k]) - median_ms(d[1])) / (k - 1):+.1f} ms per retry" if k > 1 and d[1] else ""
                parts.append(f"{len(d[k])} in {k} attempt(s): median {median_ms(d[k]):.1f} ms{added}")
        return f"{name}: " + "; ".join(parts)

    report("pre-token retry of big bodies (w2, w3 reset before the first token; back-off 1 ms):\n"
           + line("  30 MB", big) + "\n" + line("  tiny ", tiny))


def test_above_the_limit_gets_an_openai_413_that_names_the_option(stack):
    """Bodies above --max-body-bytes get the picker's OpenAI-shaped 413, naming the limit and
    the render.py option; just below it they pass. The default limit is 32 MiB."""
    stack.start_dnsd()
    stack.start_workers(1, ttft_ms=10, tokens_per_s=0)
    small = stack.start_pool_router(name="envoy-4m", max_body_bytes=4 * MiB)
    default = stack.start_pool_router(name="envoy-default")
    warm_up(small)
    warm_up(default)

    text, _ = big_chat(make_client(small.base_url), 4 * MiB - 1024)
    assert len(text.split()) == 4

    for envoy, size, limit in [(small, 4 * MiB + 1024, 4 * MiB), (default, 32 * MiB + 1024, 32 * MiB)]:
        for stream in (False, True):
            before = filter_stat(envoy, "body_too_large")
            with pytest.raises(openai.APIStatusError) as ei:
                big_chat(make_client(envoy.base_url, timeout=60), size, stream=stream)
            e = ei.value
            assert e.status_code == 413, (e.status_code, e.body)
            err = e.body if isinstance(e.body, dict) else {}
            err = err.get("error", err)
            assert err.get("type") == "RequestTooLargeError" and err.get("code") == 413, e.body
            assert str(limit) in err.get("message", "") and "--max-body-bytes" in err["message"], err
            assert filter_stat(envoy, "body_too_large") == before + 1
    report(f"above the limit: 413 {err['message']!r}")


def test_multipart_transcription_gets_a_pick(stack):
    """An audio transcription (multipart/form-data) is routed by the picker: a pick, not the
    fallback load balancer."""
    stack.start_dnsd()
    stack.start_workers(2, ttft_ms=10, tokens_per_s=0)
    envoy = stack.start_pool_router()
    warm_up(envoy)
    client = make_client(envoy.base_url)
    picks, fail_open = filter_stat(envoy, "picks"), filter_stat(envoy, "fail_open")
    audio = b"RIFF" + bytes(range(256)) * 4096  # 1 MB of "audio" (httpx sends the fields first)
    r = client.audio.transcriptions.create(model="tiny", file=("a.wav", audio, "audio/wav"))
    assert r.text
    events = list(client.audio.transcriptions.create(model="tiny", file=("a.wav", audio, "audio/wav"), stream=True))
    assert events
    assert filter_stat(envoy, "picks") - picks == 2 and filter_stat(envoy, "fail_open") == fail_open
    report(f"multipart: 2 transcriptions (JSON and SSE), 2 picks, {filter_stat(envoy, 'fail_open') - fail_open} fail-open")
