"""The rig the real-vLLM drills share, and a client that can tell responses apart.

`Rig` owns: a `harness.Stack` (dnsd, the sidecars, the Envoys a drill starts), two real vLLM
servers (`vllm_launcher.VllmServer`, each in its own process group), and the reference texts.
Servers are started in parallel once; a drill that kills one calls `Rig.ensure_up()` at its
start, which restarts only what is dead (on the same port, so Envoy's static cluster and the
sidecar's ``--serve-addr`` stay valid).

Telling workers and responses apart, with both workers serving the same model files:

- The SSE ``id`` of every chunk is collected: one client response must carry exactly one id.
  Through Envoy that id is ``chatcmpl-<x-request-id>``: Envoy generates ``x-request-id`` and
  vLLM adopts it (``_base_request_id``), and a retry carries the same header, so two workers
  serving one request give the SAME id. The id proves "one response", not "one worker".
- Which worker served a request comes from Envoy's access log (``%UPSTREAM_HOST%``): each
  request carries its drill number in the query string (``?drill=N``, which vLLM ignores), so its
  access-log line is found by ``%REQ(:PATH)%``.
- Generation is deterministic (``temperature: 0``, ``ignore_eos``, fixed ``max_tokens``, same
  weights): a complete answer must equal the reference text for its prompt, and a truncated one
  must be a prefix of it. A counterfeit resume (a second worker's bytes after the first's)
  would restart that text from its beginning, which breaks the prefix.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import harness
import vllm_launcher as vl
from harness import wait_for

CURRENT: Optional["Rig"] = None
T0 = 0.0  # a drill's reference instant (its kill) for the times in `Outcome.describe`
TIMES: list[tuple[str, str]] = []  # (what, measured) for the terminal summary
MODEL = vl.SERVED_MODEL
PROMPTS = [
    "Write a function that parses a config file.",
    "Explain what a socket timeout means.",
    "List three uses of a hash map.",
    "Describe the retry policy of a proxy.",
]


def record(what: str, value: str) -> None:
    TIMES.append((what, value))
    print(f"\nTIME {what}: {value}", flush=True)


def missing_install() -> Optional[str]:
    venv = vl.default_venv()
    if not (venv / ".gpuha-vllm-install").exists():
        return f"{venv}/.gpuha-vllm-install"
    m = vl.default_model(venv)
    if not (m / ".gpuha-model-ok").exists():
        return f"{m}/.gpuha-model-ok"
    return None


class Rig:
    def __init__(self, n: int = 2):
        global CURRENT
        self.stack = harness.Stack(name="real-vllm")
        self.n = n
        self.servers: dict[str, vl.VllmServer] = {}
        self.refs: dict[tuple[int, int], str] = {}  # (prompt index, max_tokens) -> text
        self.subreaper = vl.become_subreaper()
        self._envoy_seq = 0
        CURRENT = self

    # ---- lifecycle

    def start(self) -> None:
        t0 = time.monotonic()
        self.stack.start_dnsd()
        venv, model = vl.default_venv(), vl.default_model()
        for i in range(self.n):
            wid = f"v{i + 1}"
            self.servers[wid] = vl.VllmServer(name=wid, port=harness.free_port(), model=model,
                                              logdir=self.stack.logdir, venv=venv)
        times = vl.start_parallel(list(self.servers.values()))
        record(f"start of {self.n} servers " + ("one after another (GPU)" if vl.vllm_build() == "gpu" else "in parallel"), ", ".join(f"{k} healthy after {v:.1f}s" for k, v in times.items())
               + f"; wall {time.monotonic() - t0:.1f}s")
        for wid, s in self.servers.items():
            w = harness.Worker(id=wid, addr=s.addr, proc=None, opts={})  # type: ignore[arg-type]
            self.stack.workers[wid] = w
            self.stack.start_sidecar(w)
        self.stack.wait_fresh(self.servers, timeout=15)

    def close(self) -> None:
        global CURRENT
        errors = []
        for s in self.servers.values():
            try:
                s.kill_group()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{s.name}: {e}")
        self.stack.close()
        if not self.stack.keep_logs and not errors:
            import shutil

            shutil.rmtree(self.stack.logdir, ignore_errors=True)
        CURRENT = None
        assert not errors, "cleanup failed: " + "; ".join(errors)

    def ensure_up(self) -> None:
        """Restarts (in parallel) every server that is not healthy, then waits until dnsd sees
        all of them fresh. Only what a drill killed is restarted."""
        # A stopped member (SIGSTOP: a drill's hang left behind) is not healthy either, though its
        # API server answers /health: the whole group goes.
        dead = [s for s in self.servers.values() if not (s.alive() and s.healthy()) or s.stopped_members()]
        if dead:
            for s in dead:
                s.kill_group()  # leftovers of the dead one (orphans, shm) go first
            t0 = time.monotonic()
            times = vl.start_parallel(dead)
            record(f"restart of {','.join(s.name for s in dead)}",
                   ", ".join(f"{k} healthy after {v:.1f}s" for k, v in times.items()) + f"; wall {time.monotonic() - t0:.1f}s")
        self.stack.wait_fresh(self.servers, timeout=15)

    def dump_logs(self) -> str:
        parts = [self.stack.dump_logs(out=open(os.devnull, "w"))]
        for s in self.servers.values():
            parts.append(f"==== {s.name} (pid {s.popen.pid if s.popen else None}, exit {s.popen.poll() if s.popen else None})\n"
                         f"{s.log_tail(60)}")
        return "\n".join(parts)

    # ---- Envoy

    def envoy(self, rendered_patch: Optional[Callable[[str], str]] = None, **render_opts) -> harness.Envoy:
        """A fresh pool-router Envoy in front of every server (render.py flags as kwargs).
        `rendered_patch` rewrites the rendered YAML (a drill's own copy), for knobs render.py
        lacks; a drill that uses it says so."""
        self._envoy_seq += 1
        name = f"envoy{self._envoy_seq}"
        st = self.stack
        port = harness.free_port()
        access_log = st.logdir / f"{name}.access.log"
        cfg = st.render("pool-router", st.logdir / f"{name}.yaml", listen_port=port, admin_port=0,
                        workers=",".join(s.addr for s in self.servers.values()), fleet=st.dnsd.http,
                        wasm=harness.wasm_path(), access_log=access_log, **render_opts)
        if rendered_patch is not None:
            text = cfg.read_text()
            patched = rendered_patch(text)
            assert patched != text, "the patch of the rendered Envoy config changed nothing"
            cfg.write_text(patched)
        e = st.start_envoy(name, cfg, port, access_log=access_log)
        wait_for(lambda: harness.filter_stat(e, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
        return e

    @staticmethod
    def stop_envoy(e: harness.Envoy) -> None:
        e.proc.terminate(grace=2.0)

    def addr_to_id(self) -> dict[str, str]:
        return {s.addr: k for k, s in self.servers.items()}

    # ---- references

    def reference(self, prompt: int, max_tokens: int) -> str:
        """The deterministic text of `prompt` at `max_tokens`, from v1 directly (no Envoy)."""
        key = (prompt, max_tokens)
        if key not in self.refs:
            client = make_client(f"http://{self.servers['v1'].addr}/v1", timeout=600)
            o = chat(client, -1, prompt, max_tokens)
            assert o.error is None and o.finish_reason == "length", f"reference request failed: {o.describe()}"
            self.refs[key] = o.text
        return self.refs[key]

    # ---- vLLM /metrics

    def vllm_gauges(self, wid: str, timeout: float = 15.0) -> dict[str, float]:
        # 15 s: an API server busy streaming on 2 loaded CPU cores can take seconds to answer.
        text = vl.http_get(f"http://{self.servers[wid].addr}/metrics", timeout=timeout)[1].decode(errors="replace")
        return parse_metrics(text)

    def try_gauges(self, wid: str, timeout: float = 15.0) -> Optional[dict[str, float]]:
        """`vllm_gauges`, or None when this one scrape failed (a poll under load retries)."""
        try:
            return self.vllm_gauges(wid, timeout=timeout)
        except OSError:  # URLError, socket timeouts, resets
            return None


METRIC_RX = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", re.M)


def parse_metrics(text: str) -> dict[str, float]:
    """Sums vLLM samples by name (one engine here, so a sum is the value)."""
    out: dict[str, float] = {}
    for name, v in METRIC_RX.findall(text):
        try:
            out[name] = out.get(name, 0.0) + float(v)
        except ValueError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# Client


def make_client(base_url: str, timeout: float = 60.0):
    return harness.make_client(base_url, timeout=timeout)


@dataclass
class Outcome:
    idx: int
    prompt: int
    max_tokens: int
    started: float = 0.0
    first_token_at: Optional[float] = None
    ended: float = 0.0
    text: str = ""
    ids: list[str] = field(default_factory=list)  # distinct SSE ids, in order
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None
    error: Optional[BaseException] = None
    chunks: int = 0
    roles: int = 0  # chunks carrying `role: assistant`: vLLM sends exactly one, first
    content_chunks: int = 0
    text_matches_ref: Optional[bool] = None
    # Filled in from Envoy's access log afterwards.
    upstream: Optional[str] = None
    attempts: int = 0
    flags: str = ""
    guard: str = ""

    def describe(self) -> str:
        err = f" error={type(self.error).__name__}: {str(self.error)[:140]!r}" if self.error else ""
        t = lambda x: "-" if x is None else f"{x - T0:+.2f}"  # noqa: E731
        return (f"#{self.idx} t=[{t(self.started)},{t(self.first_token_at)},{t(self.ended)}] roles={self.roles} "
                f"content_chunks={self.content_chunks} ref={self.text_matches_ref} p{self.prompt} upstream={self.upstream} attempts={self.attempts} flags={self.flags} "
                f"guard={self.guard} ids={len(self.ids)} chars={len(self.text)} finish={self.finish_reason} "
                f"usage={self.completion_tokens}{err}")


def chat(client, idx: int, prompt: int, max_tokens: int, on_first_token: Optional[Callable[[Outcome], None]] = None,
         timeout: Optional[float] = None) -> Outcome:
    """One streaming chat completion through the official SDK; never raises."""
    o = Outcome(idx=idx, prompt=prompt, max_tokens=max_tokens, started=time.monotonic())
    c = client if timeout is None else client.with_options(timeout=timeout)
    try:
        s = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, extra_query={"drill": str(idx)})
        try:
            for chunk in s:
                o.chunks += 1
                if chunk.id and chunk.id not in o.ids:
                    o.ids.append(chunk.id)
                if chunk.usage is not None:
                    o.completion_tokens = chunk.usage.completion_tokens
                for ch in chunk.choices:
                    if ch.delta and ch.delta.role:
                        o.roles += 1
                    if ch.delta and ch.delta.content:
                        o.content_chunks += 1
                        o.text += ch.delta.content
                        if o.first_token_at is None:
                            o.first_token_at = time.monotonic()
                            if on_first_token:
                                on_first_token(o)
                    if ch.finish_reason:
                        o.finish_reason = ch.finish_reason
        finally:
            s.close()
    except Exception as e:  # noqa: BLE001 - every exception is an observation
        o.error = e
    o.ended = time.monotonic()
    return o


def is_transport_error(e: Optional[BaseException]) -> bool:
    import openai

    try:
        import httpx2 as httpx  # openai >= 3
    except ImportError:  # pragma: no cover
        import httpx  # type: ignore[no-redef]
    return isinstance(e, (httpx.TransportError, openai.APIConnectionError))


def is_inband_error(e: Optional[BaseException]) -> bool:
    """vLLM's ``data: {"error": ...}`` event inside a 200 stream: the SDK raises a plain APIError
    (not an APIStatusError: the status was 200)."""
    import openai

    return isinstance(e, openai.APIError) and not isinstance(e, (openai.APIStatusError, openai.APIConnectionError))


def classify(o: Outcome, ref: str) -> str:
    """completed | truncated (transport end after a token) | ended_error_event (vLLM's in-band
    error after a token) | aborted (vLLM's own clean end with ``finish_reason: "abort"`` after
    a token: vLLM 0.26 aborts its running requests this way on SIGTERM) | failed (the client saw
    an error and no token) | short (clean end, wrong length, or an abort before any token) | splice (a second response's structure inside one: more than one SSE id, a
    second `role` event — every vLLM response starts with one — or more content chunks than
    `max_tokens`).

    The text is compared with the reference (`text_matches_ref`) but only reported: on CPU in
    bf16 the argmax of this random model can change with the batch a request runs in, so the
    same prompt does not always give the same text under load (measured)."""
    o.text_matches_ref = (o.text == ref) if o.error is None else ref.startswith(o.text)
    if len(o.ids) > 1 or o.roles > 1 or o.content_chunks > o.max_tokens:
        return "splice"
    if o.error is None:
        if o.finish_reason == "length" and o.completion_tokens == o.max_tokens and o.roles == 1:
            return "completed"
        if o.finish_reason == "abort" and o.text and o.roles == 1 and o.content_chunks < o.max_tokens:
            return "aborted"
        return "short"
    if not o.text:
        return "failed"
    if is_inband_error(o.error):
        return "ended_error_event"
    if is_transport_error(o.error):
        return "truncated"
    return "failed"


def attach_access_log(envoy: harness.Envoy, outcomes: list[Outcome]) -> dict[int, dict]:
    """Joins each outcome with its Envoy access-log line (by ``?drill=N`` in the path)."""
    entries = harness.access_entries(envoy)
    by_idx: dict[int, dict] = {}
    for e in entries:
        m = re.search(r"[?&]drill=(-?\d+)", e["path"])
        if m:
            by_idx[int(m.group(1))] = e
    for o in outcomes:
        e = by_idx.get(o.idx)
        if e:
            o.upstream, o.attempts, o.flags, o.guard = e["upstream"], e["attempts"], e["flags"], e["guard"]
    return by_idx


def summarize(kinds: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return out


def run_concurrently(fn: Callable[[int], Outcome], n: int) -> tuple[list[threading.Thread], list[Optional[Outcome]]]:
    """Starts `n` client threads at once; returns them and the list they fill."""
    results: list[Optional[Outcome]] = [None] * n

    def body(i: int) -> None:
        results[i] = fn(i)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    assert alive == 0, f"{alive} client requests still running {timeout:.0f}s later"


def signal_pid(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def fleet_entry(rig: Rig, wid: str) -> Optional[dict]:
    try:
        return rig.stack.fleet_workers().get(wid)
    except (OSError, AssertionError, ValueError):
        return None


def dumps(d) -> str:
    return json.dumps(d, sort_keys=True)


__all__ = ["Rig", "Outcome", "chat", "classify", "attach_access_log", "summarize", "run_concurrently", "join_all",
           "record", "make_client", "signal_pid", "fleet_entry", "dumps", "is_transport_error", "is_inband_error",
           "signal", "wait_for", "PROMPTS"]
