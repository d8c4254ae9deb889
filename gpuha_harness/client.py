"""Clients: one request through the official openai SDK, never raising, classified; and a load
of such requests in threads."""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Optional

TOKEN_RX = re.compile(r" (\S+?):(\d+)")


@dataclass
class Outcome:
    """What one client request saw. Times are `time.monotonic()`.

    Fake workers (tests/fake-vllm) write their tokens as ``<worker id>:<n>``, so `kind` can tell
    a whole answer, a truncation and a splice from the text alone. Against real vLLM the text is
    the model's: `gpuha_harness.vllm_rig.classify` judges by the stream's structure instead
    (`ids`, `roles`, `content_chunks`, `completion_tokens`), and the access-log fields are
    filled in afterwards (`vllm_rig.attach_access_log`)."""

    idx: int
    stream: bool
    max_tokens: int
    prompt: Optional[int] = None  # which of a fixed set of prompts (real vLLM drills)
    started: float = 0.0
    first_token_at: Optional[float] = None
    ended: float = 0.0
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    chunks: int = 0
    ids: list[str] = field(default_factory=list)  # distinct SSE ids, in order
    roles: int = 0  # chunks carrying `role: assistant`: vLLM sends exactly one, first
    content_chunks: int = 0
    completion_tokens: Optional[int] = None  # from the usage chunk, when asked for
    text_matches_ref: Optional[bool] = None
    # From the router's access log, when joined (`vllm_rig.attach_access_log`).
    upstream: Optional[str] = None
    attempts: int = 0
    flags: str = ""
    guard: str = ""

    # The instant `describe` prints times relative to (a drill's kill), when set.
    t0: ClassVar[Optional[float]] = None

    @property
    def tokens(self) -> list[tuple[str, int]]:
        return [(w, int(n)) for w, n in TOKEN_RX.findall(self.text)]

    @property
    def worker_ids(self) -> set[str]:
        return {w for w, _ in self.tokens}

    @property
    def worker(self) -> Optional[str]:
        ids = self.worker_ids
        return next(iter(ids)) if len(ids) == 1 else None

    @property
    def spliced(self) -> bool:
        """More than one worker in one response, or token numbers that are not 0, 1, 2, ...:
        either would be a counterfeit resume."""
        toks = self.tokens
        return len({w for w, _ in toks}) > 1 or [n for _, n in toks] != list(range(len(toks)))

    @property
    def kind(self) -> str:
        """completed | truncated (after its first token) | error (before any token) | splice |
        short (a clean end with the wrong number of tokens)."""
        if self.spliced:
            return "splice"
        if self.error is None and self.finish_reason is not None:
            return "completed" if len(self.tokens) == self.max_tokens else "short"
        if self.tokens:
            return "truncated"
        return "error"

    def describe(self) -> str:
        err = f" error={type(self.error).__name__}: {str(self.error)[:160]!r}" if self.error else ""
        if self.prompt is None:
            return (f"#{self.idx} {self.kind} worker={sorted(self.worker_ids)} tokens={len(self.tokens)} "
                    f"finish={self.finish_reason}{err}")
        t0 = Outcome.t0 or 0.0
        t = lambda x: "-" if x is None else f"{x - t0:+.2f}"  # noqa: E731
        return (f"#{self.idx} t=[{t(self.started)},{t(self.first_token_at)},{t(self.ended)}] roles={self.roles} "
                f"content_chunks={self.content_chunks} ref={self.text_matches_ref} p{self.prompt} upstream={self.upstream} "
                f"attempts={self.attempts} flags={self.flags} guard={self.guard} ids={len(self.ids)} chars={len(self.text)} "
                f"finish={self.finish_reason} usage={self.completion_tokens}{err}")


def make_client(base_url: str, timeout: float = 30.0):
    import openai

    # max_retries=0: the SDK must never hide an error by retrying it.
    # trust_env=False: a proxy from the environment must not sit between the drill and Envoy.
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=timeout,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def chat(client, idx: int, max_tokens: int, stream: bool = True, model: str = "tiny",
         on_first_token: Optional[Callable[[Outcome], None]] = None, timeout: Optional[float] = None,
         extra_headers: Optional[dict] = None, messages: Optional[list[dict]] = None, prompt: Optional[int] = None,
         **create) -> Outcome:
    """One chat completion; never raises: the exception, if any, is in `Outcome.error`.
    `messages` default to one user turn naming `idx`; `create` is passed to the SDK's
    ``chat.completions.create`` (temperature, stream_options, extra_body, extra_query...)."""
    o = Outcome(idx=idx, stream=stream, max_tokens=max_tokens, prompt=prompt, started=time.monotonic())
    c = client if timeout is None else client.with_options(timeout=timeout)
    headers = {"x-drill-request": str(idx), **(extra_headers or {})}
    msgs = messages if messages is not None else [{"role": "user", "content": f"drill {idx}"}]
    try:
        r = c.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, stream=stream,
                                      extra_headers=headers, **create)
        if stream:
            try:
                for chunk in r:
                    o.chunks += 1
                    if chunk.id and chunk.id not in o.ids:
                        o.ids.append(chunk.id)
                    if getattr(chunk, "usage", None) is not None:
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
                r.close()
        else:
            o.text = r.choices[0].message.content or ""
            o.finish_reason = r.choices[0].finish_reason
            o.first_token_at = time.monotonic()
            if r.usage is not None:
                o.completion_tokens = r.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - every exception is an observation here
        o.error = e
    o.ended = time.monotonic()
    return o


def is_transport_error(e: Optional[BaseException]) -> bool:
    """How a truncated stream surfaces in the SDK: the connection ends without the last chunk
    (httpx raises, possibly wrapped as APIConnectionError), or a read timeout on a stall."""
    import openai

    try:
        import httpx2 as httpx  # openai >= 3
    except ImportError:
        import httpx  # type: ignore[no-redef]
    return isinstance(e, (httpx.TransportError, openai.APIConnectionError))


def is_inband_error(e: Optional[BaseException]) -> bool:
    """vLLM's ``data: {"error": ...}`` event inside a 200 stream: the SDK raises a plain APIError
    (not an APIStatusError: the status was 200)."""
    import openai

    return isinstance(e, openai.APIError) and not isinstance(e, (openai.APIStatusError, openai.APIConnectionError))


def summarize(items: Iterable) -> dict[str, int]:
    """How many of each kind: outcomes (by `Outcome.kind`) or kind names."""
    out: dict[str, int] = {}
    for o in items:
        k = o if isinstance(o, str) else o.kind
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


class ChildLoad:
    """`run_concurrently` in a forked child process, for streams the drill reads but does not
    time: their events are parsed through the SDK under the child's own interpreter lock, so
    they do not starve the clients this process times (one Python process parsing two real
    vLLM streams at ~750 events/s each started its other requests seconds late and read their
    first tokens seconds after they came). `client()` is called once in the child (one SDK
    client for its `n` requests: building one per request cost the 40-stream drills their
    queue) and `fn(client, i)` makes request `i`. `join` returns the outcomes; an exception in
    `error` comes back as an instance of its own class (for `is_transport_error` and friends)
    with its message."""

    def __init__(self, client: Callable[[], object], fn: Callable[[object, int], Outcome], n: int):
        ctx = multiprocessing.get_context("fork")
        self._queue = ctx.Queue()
        self._proc = ctx.Process(target=self._child, args=(client, fn, n, self._queue), daemon=True)
        self._proc.start()

    @staticmethod
    def _child(client: Callable[[], object], fn: Callable[[object, int], Outcome], n: int, out) -> None:
        c = client()
        threads, results = run_concurrently(lambda i: fn(c, i), n)
        for t in threads:
            t.join()
        out.put([None if o is None else dataclasses.replace(o, error=_portable(o.error)) for o in results])

    def join(self, timeout: float) -> list[Optional[Outcome]]:
        try:
            results = self._queue.get(timeout=timeout)
        except queue.Empty:
            self._proc.kill()
            raise AssertionError(f"client requests in the child process still running {timeout:.0f}s later") from None
        self._proc.join(10)
        return [None if o is None else dataclasses.replace(o, error=_restored(o.error)) for o in results]


def _portable(e: Optional[BaseException]) -> Optional[tuple[str, str, str]]:
    return None if e is None else (type(e).__module__, type(e).__qualname__, str(e))


def _restored(e) -> Optional[BaseException]:
    if e is None:
        return None
    module, name, message = e
    cls = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    err = cls.__new__(cls)  # SDK exceptions need the request to construct; the class is what is judged
    err.args = (message,)
    return err


def per_worker(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        w = o.worker
        if w is not None:
            counts[w] = counts.get(w, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------


class Load:
    """`n` client threads sending chat requests back to back until stopped (a context manager);
    `outcomes` collects them. `stream=False`: a killed worker's requests are all before their
    first token, so every one of them is retried (a drill about membership, not truncation)."""

    def __init__(self, client, n: int, max_tokens: int = 10, stream: bool = True):
        self.client, self.max_tokens, self.stream = client, max_tokens, stream
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.idx = 0
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.idx += 1
                i = self.idx
            o = chat(self.client, i, self.max_tokens, stream=self.stream, timeout=20)
            with self.lock:
                self.outcomes.append(o)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
