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

import io
import json
import math
import struct
import wave
from concurrent.futures import ThreadPoolExecutor

try:  # the openai SDK's HTTP stack: httpx2 in openai >= 3, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

import harness
from harness import chat, filter_stat, make_client, wait_for

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "api surface"}]
# Values that name a kind of thing, compared exactly; every other string is compared by type.
KIND_KEYS = {"object", "finish_reason", "role", "type", "model", "status", "owned_by", "encoding_format"}


def report(line: str) -> None:
    print(f"\n{line}", flush=True)


def skeleton(v, key: str = ""):
    """The structure of a JSON value: dict keys, list lengths, scalar types, kind values."""
    if isinstance(v, dict):
        return {k: skeleton(x, k) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [skeleton(x, key) for x in v]
    if isinstance(v, str):
        return v if key in KIND_KEYS else "<str>"
    if isinstance(v, bool) or v is None:
        return v
    return type(v).__name__


def small_wav(seconds: float = 0.25, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV with a 440 Hz tone."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(int(seconds * rate)))
        w.writeframes(frames)
    return buf.getvalue()


def status_error(e) -> tuple[int, str, object]:
    """An error answer as the SDK raised it: (status, content type, skeleton of the body)."""
    resp = e.response
    try:
        body = skeleton(resp.json())
    except ValueError:
        body = "<not json>"
    return resp.status_code, resp.headers.get("content-type", ""), body


def raw(call) -> tuple[int, str, object]:
    """A non-streaming SDK call made `with_raw_response`: (status, content type, skeleton of the
    JSON); an error answer the same way (a worker that does not serve an API answers 4xx, and
    the router must answer the same)."""
    import openai

    try:
        r = call()
    except openai.APIStatusError as e:
        return status_error(e)
    r.parse()  # the SDK must be able to read it
    return r.status_code, r.headers.get("content-type", ""), skeleton(r.http_response.json())


def streamed(open_stream) -> tuple[int, str, object]:
    """An SDK stream read to its end: (status, content type, skeletons of its events)."""
    import openai

    try:
        stream = open_stream()
    except openai.APIStatusError as e:
        return status_error(e)
    try:
        events = [skeleton(e.to_dict()) for e in stream]
    finally:
        stream.close()
    resp = stream.response
    return resp.status_code, resp.headers.get("content-type", ""), events


def exercise(client, base: str, model: str = MODEL, repeatable: bool = False) -> dict[str, tuple[int, str, object]]:
    """Every endpoint once, by the SDK (tokenize/detokenize, vLLM extensions, by plain httpx).
    `base` is the server's root URL (without `/v1`). `repeatable`: a real model samples, and
    its answers (so their event counts) differ per request: a seed for chat and completions
    (vLLM refuses greedy decoding with n > 1), greedy decoding for the Responses API."""
    c, cc = client, client.chat.completions
    out: dict[str, tuple[int, str, object]] = {}
    sampling = {"seed": 7} if repeatable else {}
    chat_kw = dict(model=model, messages=MESSAGES, max_tokens=4, **sampling)
    out["chat"] = raw(lambda: cc.with_raw_response.create(**chat_kw))
    out["chat stream"] = streamed(lambda: cc.create(**chat_kw, stream=True))
    out["chat n=2"] = raw(lambda: cc.with_raw_response.create(**chat_kw, n=2))
    out["chat n=2 stream"] = streamed(lambda: cc.create(**chat_kw, n=2, stream=True))
    out["chat stream include_usage"] = streamed(lambda: cc.create(**chat_kw, stream=True, stream_options={"include_usage": True}))
    out["chat logprobs"] = raw(lambda: cc.with_raw_response.create(**chat_kw, logprobs=True, top_logprobs=2))
    out["chat logprobs stream"] = streamed(lambda: cc.create(**chat_kw, logprobs=True, top_logprobs=2, stream=True))
    out["chat json_object"] = raw(lambda: cc.with_raw_response.create(**chat_kw, response_format={"type": "json_object"}))
    comp_kw = dict(model=model, prompt="api surface", max_tokens=4, **sampling)
    out["completions"] = raw(lambda: c.completions.with_raw_response.create(**comp_kw))
    out["completions stream"] = streamed(lambda: c.completions.create(**comp_kw, stream=True))
    out["completions n=2 logprobs"] = raw(lambda: c.completions.with_raw_response.create(**comp_kw, n=2, logprobs=2))
    out["completions stream include_usage"] = streamed(lambda: c.completions.create(**comp_kw, stream=True, stream_options={"include_usage": True}))
    resp_kw = dict(model=model, input="api surface", max_output_tokens=4, **({"temperature": 0} if repeatable else {}))
    out["responses"] = raw(lambda: c.responses.with_raw_response.create(**resp_kw))
    out["responses stream"] = streamed(lambda: c.responses.create(**resp_kw, stream=True))
    out["embeddings float"] = raw(lambda: c.embeddings.with_raw_response.create(model=model, input=["a b", "c"], encoding_format="float"))
    out["embeddings base64"] = raw(lambda: c.embeddings.with_raw_response.create(model=model, input="a b", encoding_format="base64"))
    out["models"] = raw(lambda: c.models.with_raw_response.list())
    wav = small_wav()
    out["audio transcription"] = raw(lambda: c.audio.transcriptions.with_raw_response.create(model=model, file=("drill.wav", wav, "audio/wav")))
    with httpx.Client(trust_env=False, timeout=10) as h:
        for path, body in (("/tokenize", {"model": model, "prompt": "api surface"}),
                           ("/detokenize", {"model": model, "tokens": [1, 100, 115]})):
            r = h.post(base + path, json=body)
            out[path] = (r.status_code, r.headers.get("content-type", ""), skeleton(r.json()))
    return out


def distinct_items(v):
    """A skeleton with every list cut to its distinct items (in first-seen order)."""
    if isinstance(v, dict):
        return {k: distinct_items(x) for k, x in v.items()}
    if isinstance(v, list):
        out = []
        for x in map(distinct_items, v):
            if x not in out:
                out.append(x)
        return out
    return v


def canonical(name: str, answer: tuple[int, str, object]) -> tuple[int, str, object]:
    """A stream's events as shapes: lists inside an event cut to their distinct items, each
    run of same-shaped events counted once, an `n=2` stream's in a canonical order. Two
    requests to a real vLLM need not stream alike: it interleaves two choices' events
    differently from one request to the next (seen directly: choice 0 twice then choice 1, or
    alternating), sends the same greedy Responses answer as 11 or 12 events, and under load
    coalesces two steps' tokens into one event (a logprobs stream of 5 events came as 4, one
    event carrying two tokens' logprobs). The kinds of event and their order are what the
    router must keep; the guard's byte-split tests check that it passes every byte."""
    status, ct, body = answer
    if isinstance(body, list) and "stream" in name:
        body = [distinct_items(e) for e in body]
        if "n=2" in name:
            body = sorted(body, key=lambda e: json.dumps(e, sort_keys=True))
        body = [e for i, e in enumerate(body) if i == 0 or e != body[i - 1]]
    return status, ct, body


def compare(direct: dict, routed: dict) -> tuple[list[str], list[str]]:
    """(endpoints answered the same, one line per endpoint that differs)."""
    assert direct.keys() == routed.keys()
    matched, differ = [], []
    for name in direct:
        d, r = canonical(name, direct[name]), canonical(name, routed[name])
        if d == r:
            matched.append(name)
        else:
            what = (f"status {d[0]} vs {r[0]}" if d[0] != r[0] else f"content-type {d[1]!r} vs {r[1]!r}" if d[1] != r[1]
                    else first_difference(d[2], r[2]))
            differ.append(f"{name}: direct vs router: {what}")
    return matched, differ


def first_difference(a, b, path: str = "$") -> str:
    if type(a) is not type(b):
        return f"{path}: {json.dumps(a)[:80]} vs {json.dumps(b)[:80]}"
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a.keys() ^ b.keys())} only on one side"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{path}.{k}"))), "")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), "")
    return "" if a == b else f"{path}: {a!r} vs {b!r}"


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
