"""The whole stack on 127.0.0.1: one `Stack` owns every process it starts (fake vLLM workers,
one sidecar per worker, dnsd, Envoy). Each process runs in its own process group so that a kill
really kills it and whatever it spawned; its stdout/stderr go to files in the stack's log
directory, and `Stack.dump_logs()` prints their tails when a drill fails.

Readiness is always observed, never slept for: the ``LISTENING``/``READY`` line a binary prints
once bound, Envoy's admin ``/ready``, or dnsd's ``/v1/fleet`` showing a worker fresh.
``GPUHA_DRILL_LOGS``: keep logs under this directory instead of a temp dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from .env import REPO, START_TIMEOUT_S, binary, envoy_bin, envoy_env, filter_build, wasm_path
from .proc import Proc
from .wait import free_port, http_get, port_accepts, wait_for


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


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
        return parse_metrics(body.decode(errors="replace"))

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
        wait_for(lambda: succeeds(lambda: self.dnsd.fleet()), 10, "dnsd /v1/fleet to answer")
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
        if filter_build() == "native" and "filter_build" not in params:
            params = {**params, "filter_build": "native"}
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
        proc = self.spawn(name, argv, env=envoy_env())

        def admin_addr():
            if not proc.alive():
                raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.tail()}\n{tail_file(self.logdir / f'{name}.log')}")
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

    # ---- Envoy configs rendered by envoy/render.py (CLI in envoy/README.md)

    def start_pool_router(self, name: str = "envoy", workers: Optional[Iterable[Worker]] = None,
                          port: Optional[int] = None, eds: bool = False,
                          rendered_patch: Optional[Callable[[str], str]] = None, **render_opts) -> Envoy:
        """Renders pool-router.yaml for `workers` (default: every worker started so far) and dnsd,
        starts Envoy and waits for it to be ready. `render_opts` are render.py flags
        (per_try_timeout="1s", picker_config=json.dumps({...}), ...). `port`: the listener's port
        (default: a free one), for routers that must know each other's address before they start.
        `eds`: no static workers; the cluster's members come from dnsd over EDS. `rendered_patch`
        rewrites the rendered YAML, for knobs render.py lacks (a drill that uses it says so)."""
        assert self.dnsd is not None, "start dnsd before Envoy"
        ws = [] if eds else list(workers if workers is not None else self.workers.values())
        port = port or free_port()
        access_log = self.logdir / f"{name}.access.log"
        cfg = self.render("pool-router", self.logdir / f"{name}.yaml", listen_port=port, admin_port=0,
                          workers=",".join(w.addr for w in ws) or None, fleet=self.dnsd.http, wasm=wasm_path(),
                          access_log=access_log, **render_opts)
        if rendered_patch is not None:
            text = cfg.read_text()
            patched = rendered_patch(text)
            assert patched != text, "the patch of the rendered Envoy config changed nothing"
            cfg.write_text(patched)
        return self.start_envoy(name, cfg, port, access_log=access_log)

    def start_failwhale(self, name: str = "failwhale", **render_opts) -> Envoy:
        port = free_port()
        access_log = self.logdir / f"{name}.access.log"
        cfg = self.render("failwhale", self.logdir / f"{name}.yaml", listen_port=port, admin_port=0, wasm=wasm_path(),
                          access_log=access_log, **render_opts)
        return self.start_envoy(name, cfg, port, access_log=access_log)


class FleetSamples:
    """dnsd's view of every worker (`Stack.fleet_workers`), sampled every 0.2 s while a drill runs,
    as ``(time.monotonic(), {worker id: its entry})`` in `samples`. A drill whose figures rest on
    what the routers saw (fresh, stalled, queues, TTFT) reads them here when it reports.

        with FleetSamples(stack) as view:
            ...  # the run
        view.samples
    """

    def __init__(self, stack: "Stack", interval: float = 0.2):
        self.stack, self.interval = stack, interval
        self.samples: list[tuple[float, dict[str, dict]]] = []
        # Reads of the view that failed (dnsd did not answer in time, or garbled): a starved
        # dnsd shows here, and in the gaps between samples.
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):  # a sampling interval, not a wait for readiness
            try:
                self.samples.append((time.monotonic(), self.stack.fleet_workers()))
            except (OSError, AssertionError, ValueError) as e:
                self.failures.append((time.monotonic(), type(e).__name__))

    def __enter__(self) -> "FleetSamples":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def succeeds(fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except (OSError, AssertionError, ValueError):
        return False


def tail_file(p: Path, lines: int = 40) -> str:
    try:
        text = p.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f"---- {p.name}\n" + "\n".join(text[-lines:])


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
