"""A worker's answer in a content coding (gzip), as a compressing proxy in front of a worker, or a
provider, sends it to a client that accepts it: the guard cannot read such a body, so it passes it
through unjudged. Judged, a gzip'd event stream held no readable event: it "ended without
output", was retried on every worker and ended as a 503.

    python3 -m pytest -q -s tests/drills/test_coded_answers.py
"""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpuha_harness import filter_stat, free_port, make_client, wait_for, wasm_path

TEXT = "coded answers pass"


def sse_answer(model: str) -> bytes:
    """A chat stream as vLLM sends it: a role event, one event per word, the finish, `[DONE]`."""
    base = {"id": "chatcmpl-coded", "object": "chat.completion.chunk", "created": 1, "model": model}
    deltas = [{"role": "assistant", "content": ""}] + [{"content": w + " "} for w in TEXT.split()]
    events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def json_answer(model: str) -> bytes:
    return json.dumps({"id": "chatcmpl-coded", "object": "chat.completion", "created": 1, "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}).encode()


class CodingWorker(BaseHTTPRequestHandler):
    """Answers every chat request in gzip when the request accepts it (and only then)."""

    protocol_version = "HTTP/1.1"
    seen_codings: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        stream = bool(req.get("stream"))
        body = sse_answer(req.get("model", "tiny")) if stream else json_answer(req.get("model", "tiny"))
        coded = "gzip" in self.headers.get("accept-encoding", "")
        CodingWorker.seen_codings.append("gzip" if coded else "identity")
        if coded:
            body = gzip.compress(body)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream" if stream else "application/json")
        if coded:
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_gzip_answer_passes_unjudged(stack):
    worker = ThreadingHTTPServer(("127.0.0.1", 0), CodingWorker)
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    try:
        addr = f"127.0.0.1:{worker.server_address[1]}"
        # No fleet view (dnsd not started): the picker fails open to the configured worker.
        port = free_port()
        cfg = stack.render("pool-router", stack.logdir / "coded.yaml", listen_port=port, admin_port=0, workers=addr,
                           fleet=f"127.0.0.1:{free_port()}", wasm=wasm_path())
        envoy = stack.start_envoy("coded", cfg, port)
        # The openai SDK (httpx) asks for gzip and decodes it.
        client = make_client(envoy.base_url, timeout=10)
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
                           if c.choices)
        whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
        wait_for(lambda: filter_stat(envoy, "guard_passed") >= 2, 10, "the guard's two passed answers counted")
        retries = filter_stat(envoy, "pre_token_retries")
        print(f"\ncoded answers: worker saw {CodingWorker.seen_codings}; stream {streamed!r}, json {whole!r}, pre-token retries {retries}")
        assert CodingWorker.seen_codings[:2] == ["gzip", "gzip"], "the client did not ask for gzip: the drill tested nothing"
        assert streamed.split() == TEXT.split()
        assert whole == TEXT
        assert retries == 0, "a coded answer was judged a failure"
    finally:
        worker.shutdown()
        worker.server_close()
        thread.join(timeout=5)
