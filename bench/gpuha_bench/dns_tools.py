"""DNS clients for the bench: one query by hand (no resolver library), the time until a name
stops answering an address, and dnsperf."""

import os
import re
import signal
import socket
import struct
import subprocess
import time

from .common import LOAD_CPU, PROCS, REL, WORK, session_cpu_seconds


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
