"""Sidecar footprint on large /metrics pages (and a previous build beside it)."""

import socket
import sys
import time

from .common import BASELINE_SIDECAR, LOAD_CPU, PROCS, ROOT, SUT_CPU, WORK, cpu_seconds, note, rss_kib, sidecar
from .markdown import Report, Target, fmt


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
    secs = 5 if quick else 6
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



def report_sidecar(R, rep: Report) -> None:
    md, targets = rep.md, rep.targets
    sc = R.get("sidecar")
    if sc:
        md += ["", "## 5. Sidecar footprint (scrape every 100 ms, static server)", "",
               "| build | /metrics bytes | engines | scrapes/s | CPU ms/scrape | RSS KiB | peak RSS KiB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sc:
            md.append(f"| {r.get('variant', 'current')} | {fmt(r['page_bytes'])} | {r['series']} | {r['scrapes_per_s']:.1f} | {fmt(r['cpu_ms_per_scrape'], 2)} | {fmt(r['rss_kib'])} | {fmt(r['hwm_kib'])} |")
        sc = [r for r in sc if r.get("variant", "current") == "current"]
        worst = max(r["hwm_kib"] for r in sc)
        targets.append(Target("sidecar ≤ 8 MiB RSS", worst <= 8192, f"peak {worst} KiB at {max(r['page_bytes'] for r in sc):,} B pages"))
        big = max(sc, key=lambda r: r["page_bytes"])
        ms = big["cpu_ms_per_scrape"]  # None: no frame came (no scrape finished)
        targets.append(Target("sidecar ≤ 30 ms CPU per scrape of the largest page", ms is not None and ms <= 30,
                              f"{ms:.1f} ms at {big['page_bytes']:,} B" if ms is not None else f"no frame at {big['page_bytes']:,} B"))
