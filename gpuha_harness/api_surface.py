"""The API surface of a vLLM worker as the official `openai` SDK sees it: every endpoint called
once (`exercise`), each answer reduced to what must be the same through the router as directly
(status, content type, the shape of every body or streamed event: keys, types and the values
that name a kind of thing; token text and ids differ per worker and per request, so they are
compared by type only), and two such surveys compared (`compare`). Used by the fake-worker drill
(tests/drills/test_api_surface.py) and the real-vLLM drill."""

from __future__ import annotations

import io
import json
import math
import struct
import wave

try:  # the openai SDK's HTTP stack: httpx2 in openai >= 3, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "api surface"}]
# Values that name a kind of thing, compared exactly; every other string is compared by type.
KIND_KEYS = {"object", "finish_reason", "role", "type", "model", "status", "owned_by", "encoding_format"}


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
