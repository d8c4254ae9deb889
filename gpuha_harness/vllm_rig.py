"""The rig the real-vLLM drills share, and a client that can tell responses apart.

`Rig` owns: a `Stack` (dnsd, the sidecars, the Envoys a drill starts), two real vLLM
servers (`gpuha_harness.vllm.VllmServer`, each in its own process group), and the reference texts.
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
import time
from typing import Callable, Optional

from . import vllm as vl
from .client import Outcome, is_inband_error, is_transport_error, join_all, make_client as _make_client, run_concurrently, summarize
from .client import chat as _chat
from .envoy_log import access_entries, filter_stat
from .stack import Envoy, Stack, Worker
from .wait import free_port, wait_for

CURRENT: Optional["Rig"] = None
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
        self.stack = Stack(name="real-vllm")
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
            self.servers[wid] = vl.VllmServer(name=wid, port=free_port(), model=model,
                                              logdir=self.stack.logdir, venv=venv)
        times = vl.start_parallel(list(self.servers.values()))
        record(f"start of {self.n} servers " + ("one after another (GPU)" if vl.vllm_build() == "gpu" else "in parallel"), ", ".join(f"{k} healthy after {v:.1f}s" for k, v in times.items())
               + f"; wall {time.monotonic() - t0:.1f}s")
        for wid, s in self.servers.items():
            w = Worker(id=wid, addr=s.addr, proc=None, opts={})  # type: ignore[arg-type]
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

    def envoy(self, rendered_patch: Optional[Callable[[str], str]] = None, only: Optional[list[str]] = None,
              **render_opts) -> Envoy:
        """A fresh pool-router Envoy in front of every server, or of the servers `only` names
        (render.py flags as kwargs). `rendered_patch` rewrites the rendered YAML (a drill's own
        copy), for knobs render.py lacks; a drill that uses it says so."""
        self._envoy_seq += 1
        ids = only if only is not None else list(self.servers)
        e = self.stack.start_pool_router(f"envoy{self._envoy_seq}", workers=[self.stack.workers[k] for k in ids],
                                         rendered_patch=rendered_patch, **render_opts)
        wait_for(lambda: filter_stat(e, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
        return e

    @staticmethod
    def stop_envoy(e: Envoy) -> None:
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
    return _make_client(base_url, timeout=timeout)


def chat(client, idx: int, prompt: int, max_tokens: int, on_first_token: Optional[Callable[[Outcome], None]] = None,
         timeout: Optional[float] = None) -> Outcome:
    """One streaming chat completion of `PROMPTS[prompt]`, greedy, exactly `max_tokens` long
    (``ignore_eos``), with usage, tagged ``?drill=N`` for the access log; never raises."""
    return _chat(client, idx, max_tokens, model=MODEL, on_first_token=on_first_token, timeout=timeout,
                 messages=[{"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]}], prompt=prompt,
                 temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                 extra_query={"drill": str(idx)})


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


def attach_access_log(envoy: Envoy, outcomes: list[Outcome]) -> dict[int, dict]:
    """Joins each outcome with its Envoy access-log line (by ``?drill=N`` in the path)."""
    entries = access_entries(envoy)
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
