"""What every bench section shares: where the builds are, the cores, the run's scratch dir and
notes, processes (the harness's `Proc`s, pinned with taskset), and the components (fake workers,
dnsd, sidecars, Envoy rendered by envoy/render.py, vllm-router, wrk)."""

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

import gpuha_harness as harness

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
TARGET = Path(os.environ.get("GPUHA_BENCH_TARGET", ROOT / "target-bench"))
REL = TARGET / "release"
WASM = TARGET / "wasm32-wasip1" / "release" / "gpuha_filter.wasm"
# The same filter as Envoy's native dynamic module (native/): ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
NATIVE_DIR = TARGET / "release"
# Optional: an older build of the filter measured side by side with WASM in the same run
# (`l7` variant "envoy+filter (baseline)", `fleet` rows with filter "baseline").
BASELINE_WASM = os.environ.get("GPUHA_BENCH_BASELINE_WASM")
# The same for the native filter: a directory holding an older libgpuha_native.so (`l7` and
# `l7_paced` variant "envoy+filter (native, baseline)").
BASELINE_NATIVE = os.environ.get("GPUHA_BENCH_BASELINE_NATIVE")
# The native filter built with profile-guided optimisation (native/pgo.sh; bench/run.sh builds it
# when GPUHA_BENCH_PGO=1): a directory holding that libgpuha_native.so (`l7`, `l7_paced` and
# `l7_instr` variant "envoy+filter (native, PGO)").
NATIVE_PGO = os.environ.get("GPUHA_BENCH_NATIVE_PGO")
# A previous gpuha-sidecar build, measured beside the current one in the sidecar section.
BASELINE_SIDECAR = os.environ.get("GPUHA_BENCH_BASELINE_SIDECAR")
# A previous gpuha-dnsd build, measured beside the current one in the dnsperf and ingest sections.
BASELINE_DNSD = os.environ.get("GPUHA_BENCH_BASELINE_DNSD")
TOOL = Path(os.environ.get("GPUHA_BENCH_TOOL", TARGET / "release" / "gpuha-bench"))
VENV = Path(os.environ.get("GPUHA_BENCH_VENV", Path.home() / ".cache" / "gpuha-bench" / "venv"))
NCPU = os.cpu_count() or 1
SUT_CPU = "0"
LOAD_CPU = "1" if NCPU > 1 else "0"

# Scratch dir of this run: every process's logs, configs, keys.
WORK = Path(tempfile.mkdtemp(prefix="gpuha-bench-"))
LOG = []     # human-readable notes that go into the report


def note(msg):
    print(f"[bench] {msg}", flush=True)
    LOG.append(msg)


# --------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process the bench starts, as the harness's `Proc`s (each in its own process group,
    logging to WORK/NAME.{out,err}); stopped by PID and group, never by name."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, cpu=None, env=None, wait=None, timeout=20.0):
        """Starts argv (pinned to `cpu`). `wait`: regex to find in stdout before returning (the
        match is returned). Returns the Popen (with `.name`) and the match."""
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + list(argv)
        # A name the bench reuses (wrk-bg, a section's workers) starts with fresh logs: the
        # sections read them whole (the harness's own Proc appends, for restarts).
        for suffix in (".out", ".err"):
            (WORK / f"{name}{suffix}").unlink(missing_ok=True)
        proc = harness.Proc(name, argv, WORK, env=env)
        proc.popen.name = name
        self.procs.append(proc)
        if wait is None:
            return proc.popen, None
        try:
            m = proc.wait_line(wait, timeout=timeout)
        except AssertionError as e:
            raise RuntimeError(f"{name} did not print {wait!r}: {e}") from None
        return proc.popen, m

    def stop(self, p, timeout=5.0):
        """SIGTERM to `p`'s group (SIGCONT first), SIGKILL after `timeout`."""
        for proc in list(self.procs):
            if proc.popen is p:
                proc.terminate(grace=timeout)
                self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            proc.terminate(grace=3.0)
        self.procs.clear()


PROCS = Procs()


def free_port(kind=socket.SOCK_STREAM):
    if kind == socket.SOCK_STREAM:
        return harness.free_port()
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(url, timeout=5.0):
    """(status, body); an HTTP error status raises, as the sections expect."""
    status, body = harness.http_get(url, timeout=timeout)
    if status >= 400:
        raise urllib.error.HTTPError(url, status, body[:200].decode(errors="replace"), None, None)
    return status, body


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


def cpu_split_seconds(pid):
    """(user, kernel) CPU time of a process and all its threads (utime, stime), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid):
    """utime+stime of a process and all its threads, in seconds."""
    return sum(cpu_split_seconds(pid))


def cpu_seconds_fine(pid):
    """On-CPU time of a process's live threads in seconds, with nanosecond resolution
    (/proc/PID/task/*/schedstat); `cpu_seconds` counts 10 ms ticks, too coarse for a cost of
    about 1 ms per second. Falls back to `cpu_seconds` where schedstat is missing."""
    try:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)


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
    """The bench venv's Envoy first, else the harness's rule (deploy/find_envoy.py)."""
    for cand in (VENV / "lib").glob("python3*/site-packages/envoy/_bin/envoy"):
        return str(cand)
    return str(harness.envoy_bin())


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


# A variant's gpuha filters (render.py --filters): the same rendered config, every other line
# (override_host with its round-robin fallback included) as it is.
VARIANT_FILTERS = {"filter": "picker,guard", "nowasm": "none", "picker-only": "picker", "guard-only": "guard", "native": "picker,guard"}


def worker_pair(prefix, tokens_per_s=0, dnsd_name="dnsd"):
    """Two fake workers (`PREFIX1`, `PREFIX2`), their sidecars and a dnsd whose fleet view holds
    both, ready: returns the two worker addresses and the dnsd's HTTP address (the fleet view)."""
    ws = [fake_worker(f"{prefix}{i}", tokens_per_s=tokens_per_s)[1] for i in (1, 2)]
    _, ingest, http, _ = dnsd(name=dnsd_name, cpu=LOAD_CPU)
    for i, w in enumerate(ws, 1):
        sidecar(f"{prefix}{i}", w, ingest)
    fleet_ready(http, 2)
    return ws[0], ws[1], http


def envoy(name, workers, fleet, variant="filter", picker_config=None, guard_config=None, extra_render=(),
          cpu=SUT_CPU, concurrency=1, wasm=None, edit=None, native_dir=None, wrap=(), ready_s=30):
    """An Envoy rendered by envoy/render.py (`edit`: a function of the rendered text, for the
    floor section's extra filter; `native_dir`: where the native filter is, when not the
    build's; `wrap`: a command Envoy runs under, such as valgrind, with `ready_s` to get ready);
    returns (process, port, admin port, access log)."""
    port, admin = free_port(), free_port()
    cfg = WORK / f"{name}.yaml"
    log = WORK / f"{name}.access.log"
    argv = [sys.executable, ROOT / "envoy" / "render.py", "pool-router", "--listen-port", port, "--admin-port", admin,
            "--workers", ",".join(workers), "--fleet", fleet, "--wasm", wasm or WASM, "--access-log", log,
            "--filters", VARIANT_FILTERS[variant], *extra_render]
    if variant == "native":
        argv += ["--filter-build", "native"]
    if picker_config:
        argv += ["--picker-config", json.dumps(picker_config)]
    if guard_config:
        argv += ["--guard-config", json.dumps(guard_config)]
    text = subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout
    cfg.write_text(edit(text) if edit else text)
    # File access logs are flushed every 10 s by default; the failover figures read them live.
    p, _ = PROCS.start(name, [*wrap, envoy_bin(), "-c", cfg, "--concurrency", concurrency, "--log-level", "warn",
                              "--file-flush-interval-msec", "100", "--base-id", port], cpu=cpu,
                       env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(native_dir or NATIVE_DIR)})
    wait_http(f"http://127.0.0.1:{admin}/ready", timeout=ready_s)
    return p, port, admin, log


def envoy_stats(admin, prefix="wasmcustom.gpuha"):
    """Envoy's stats under `prefix`. The native filter's counters (`dynamicmodulescustom.gpuha.X`)
    are read under the Wasm filter's names (`wasmcustom.gpuha.X`), so sections read either."""
    _, body = http_get(f"http://127.0.0.1:{admin}/stats?filter={prefix.replace('wasmcustom.', '(wasm|dynamicmodules)custom.')}")
    out = {}
    for line in body.decode().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            try:
                k = re.sub(r"^(cluster\.[^.]+\.)?dynamicmodulescustom\.", "wasmcustom.", k.strip())
                out[k] = out.get(k, 0) + int(v.strip())
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




def machine():
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"nproc": NCPU, "cpu": cpu, "mem_gib": round(int(mem) / 2**20, 1), "kernel": platform.release(),
            "hostname": socket.gethostname(), "loadavg_at_start": os.getloadavg()}


