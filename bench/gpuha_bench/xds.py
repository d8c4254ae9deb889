"""Bench section `xds`: what membership over EDS costs Envoy at 10 k workers, beside the fleet poll.

One dnsd tracks 10 k synthetic workers (`gpuha-bench keepalive`, busy numbers, 2 frames/s each,
as the `fleet` section); a router rendered without --workers takes its `gpuha_workers` cluster
from dnsd over REST-JSON EDS (`refresh_delay` 250 ms, render.py's default) while the picker polls
/v1/fleet every 500 ms. Envoy's CPU per second is measured with no requests, for:

- `static`: the fleet-poll figure: the same 10 k view polled by the picker, a STATIC cluster (no
  EDS), as the `fleet` section's "10 k busy" row;
- `eds`: the router as shipped (EDS + picker), and `eds, no picker` (the Wasm filters stripped:
  what EDS alone costs);
- membership stable (the same 10 k members: dnsd answers the same version) or churning: C
  workers per second stop sending and as many new ones start (`keepalive --churn C`), with
  dnsd's `[eds] leave_after_ms` at its 4 s minimum so the silent ones leave within the run.

Started by bench/run.py (`--only xds`).
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from . import common as h
from .markdown import Report, fmt

WORKERS = 10_000
LEAVE_AFTER_MS = 4_000
CHURN_RATES = (0, 10, 100)


def dnsd_eds(name):
    cfg = h.WORK / f"{name}.toml"
    cfg.write_text("\n".join([
        "[ingest]", 'listen = "127.0.0.1:0"', f'keys = [{{ id = 1, file = "{h.make_key()}" }}]',
        "[http]", 'listen = "127.0.0.1:0"',
        "[eds]", f"leave_after_ms = {LEAVE_AFTER_MS}", ""]))
    return h.dnsd(name=name, cpu=h.LOAD_CPU, config=cfg)


def eds_router(name, fleet, picker=True, pool=None):
    """A router rendered without --workers (EDS from dnsd at `fleet`; `pool`: scoped to one of
    the ten pools); returns (proc, admin)."""
    port, admin = h.free_port(), h.free_port()
    argv = [sys.executable, h.ROOT / "envoy" / "render.py", "pool-router", "--listen-port", port, "--admin-port", admin,
            "--fleet", fleet, "--wasm", h.WASM, "--access-log", "/dev/null",
            "--picker-config", json.dumps({"poll_interval_ms": 500}), "--filters", "picker,guard" if picker else "none",
            *(["--pool", pool] if pool else [])]
    text = subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout
    cfg = h.WORK / f"{name}.yaml"
    cfg.write_text(text)
    p, _ = h.PROCS.start(name, [h.envoy_bin(), "-c", cfg, "--concurrency", 1, "--log-level", "warn", "--base-id", port], cpu=h.SUT_CPU)
    h.wait_http(f"http://127.0.0.1:{admin}/ready", timeout=30)
    return p, admin


def members(admin):
    return h.envoy_stats(admin, "cluster.gpuha_workers.membership_total").get("cluster.gpuha_workers.membership_total", 0)


def wait_members(admin, n, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if members(admin) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Envoy's gpuha_workers never reached {n} members (has {members(admin)})")


def eds_answer_bytes(http, timeout=20.0):
    """The size of one EDS answer for every pool; waits out dnsd's warm-up (503 for 3 s)."""
    body = json.dumps({"node": {"id": "bench"}, "resource_names": ["gpuha_workers"],
                       "type_url": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}).encode()
    deadline = time.time() + timeout
    while True:
        req = urllib.request.Request(f"http://{http}/v3/discovery:endpoints", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return len(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.time() > deadline:
                raise
        time.sleep(0.1)


STATS = ("update_attempt", "update_success", "update_no_rebuild", "update_failure", "membership_change")


def measure(ep, admin, dp, dur):
    """Envoy's (and dnsd's) CPU per second over `dur` seconds with no requests, and the EDS and
    fleet-poll counters over the same time."""
    def stats():
        s = h.envoy_stats(admin, "cluster.gpuha_workers.")
        s.update(h.envoy_stats(admin, "wasmcustom.gpuha.fleet_polls"))
        return s
    s0, c0, d0, t0 = stats(), h.cpu_seconds_fine(ep.pid), h.cpu_seconds_fine(dp.pid), time.time()
    time.sleep(dur)  # the measurement window itself: Envoy runs on its own timers, nothing to wait for
    s1, c1, d1, el = stats(), h.cpu_seconds_fine(ep.pid), h.cpu_seconds_fine(dp.pid), time.time() - t0

    def rate(k):
        return (s1.get(k, 0) - s0.get(k, 0)) / el
    row = {"envoy_cpu_ms_per_s": (c1 - c0) / el * 1e3, "dnsd_cpu_ms_per_s": (d1 - d0) / el * 1e3,
           "fleet_polls_per_s": rate("wasmcustom.gpuha.fleet_polls"), "members": members(admin),
           "secs": el, "loadavg": os.getloadavg()[0]}
    for k in STATS:
        row[f"eds_{k}_per_s"] = rate(f"cluster.gpuha_workers.{k}")
    return row


def sec_xds(R, quick):
    dur = 4.0
    rows = []
    fw, waddr = h.fake_worker("xds-w")
    for churn in CHURN_RATES:
        dp, ingest, http, _ = dnsd_eds(f"dnsd-xds-{churn}")
        kp, _ = h.PROCS.start(f"keepalive-xds-{churn}", [h.TOOL, "keepalive", "--to", ingest, "--key-file", h.make_key(),
                                                         "--workers", WORKERS, "--hz", "2", "--model", "tiny", "--churn", churn],
                              cpu=h.LOAD_CPU, wait="READY")
        h.fleet_ready(http, WORKERS, timeout=30)
        answer = eds_answer_bytes(http) if churn == 0 else None
        # (cluster, picker, pool): the router scoped to one pool of ten (1 000 members) once.
        variants = [("static", True, None), ("eds", True, None), ("eds", False, None)] if churn == 0 else \
            [("eds", True, None), ("eds", False, None)] + ([("eds", True, "pool-000")] if churn == 10 else [])
        for cluster, picker, pool in variants:
            name = f"envoy-xds-{cluster}-{'picker' if picker else 'nopicker'}-{pool or 'all'}-{churn}"
            if cluster == "static":
                ep, _, admin, _ = h.envoy(name, [waddr], http, picker_config={"poll_interval_ms": 500},
                                          extra_render=["--access-log", "/dev/null"])
            else:
                ep, admin = eds_router(name, http, picker=picker, pool=pool)
                wait_members(admin, WORKERS // 10 if pool else WORKERS)
            time.sleep(1.0)  # past the first polls' one-off work (the first view, the first full assignment)
            row = {"cluster": cluster, "picker": picker, "scope": pool or "all", "churn_per_s": churn if cluster == "eds" else None,
                   "workers_sending": WORKERS, **measure(ep, admin, dp, dur)}
            if answer is not None and cluster == "eds":
                row["eds_answer_bytes"] = answer
            rows.append(row)
            h.note(f"xds: {row}")
            h.PROCS.stop(ep)
        h.PROCS.stop(kp)
        h.PROCS.stop(dp)
    h.PROCS.stop(fw)
    R["xds"] = {"rows": rows, "workers": WORKERS, "leave_after_ms": LEAVE_AFTER_MS, "eds_refresh": "0.25s",
                "fleet_poll_interval_ms": 500, "measure_s": dur}


def report_xds(R, rep: Report) -> None:
    md = rep.md
    x = R.get("xds")
    if not x:
        return
    md += ["", f"## 2c. Membership over EDS at {x['workers']:,} workers: Envoy CPU (no requests)", "",
           f"dnsd tracks {x['workers']:,} busy synthetic workers (2 frames/s each); EDS `refresh_delay` {x['eds_refresh']}, "
           f"picker fleet poll every {x['fleet_poll_interval_ms']} ms, `[eds] leave_after_ms` {x['leave_after_ms']}. "
           f"Churn C: C workers/s stop sending and C new ones start. One Envoy worker thread, {x['measure_s']} s per row.", "",
           "| cluster | picker | scope | churn /s | members | Envoy CPU ms/s | dnsd CPU ms/s | EDS polls/s | EDS updates/s | of which no rebuild /s | membership changes/s | fleet polls/s | load avg |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in x["rows"]:
        md.append(f"| {r['cluster']} | {'yes' if r['picker'] else 'no'} | {r.get('scope', 'all')} | {fmt(r['churn_per_s'])} | {fmt(r['members'])} | "
                  f"{fmt(r['envoy_cpu_ms_per_s'], 1)} | {fmt(r['dnsd_cpu_ms_per_s'], 1)} | {fmt(r['eds_update_attempt_per_s'], 2)} | {fmt(r['eds_update_success_per_s'], 2)} | "
                  f"{fmt(r['eds_update_no_rebuild_per_s'], 2)} | {fmt(r['eds_membership_change_per_s'], 2)} | {fmt(r['fleet_polls_per_s'], 2)} | {fmt(r['loadavg'], 1)} |")
    size = next((r["eds_answer_bytes"] for r in x["rows"] if r.get("eds_answer_bytes")), None)
    if size:
        md.append(f"\nOne EDS answer for every pool at {x['workers']:,} members: {size:,} bytes of JSON.")
