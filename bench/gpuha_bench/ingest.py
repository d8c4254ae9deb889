"""Ingest scale: frames/s dnsd accepts per core."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .common import (BASELINE_DNSD, LOAD_CPU, PROCS, SUT_CPU, TOOL, cpu_seconds, cpu_seconds_fine, dnsd, http_get, make_key, note,
                     udp_rcvbuf_errors)

# Kernel memory one queued ~200-byte datagram takes from a socket's receive buffer (skb
# truesize; 1 280 B measured on Linux 6.18): sizes the drain bursts below.
QUEUED_FRAME_BYTES = 1280
# dnsd asks for this receive buffer (config `ingest.recv_buffer_bytes`); the kernel caps it at
# net.core.rmem_max and doubles it.
DNSD_RCVBUF = 8 << 20


def udp_rx_queue(port):
    """Bytes queued on the IPv4 UDP socket bound to `port` (0 when none)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port:
            return int(f[4].split(":")[1], 16)
    return 0


def burst_frames():
    """Frames a burst may hold: 60 % of the receive buffer the kernel gives dnsd, at most 5 000."""
    try:
        rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        rmem_max = 212_992
    return max(100, min(5_000, int(0.6 * 2 * min(DNSD_RCVBUF, rmem_max) / QUEUED_FRAME_BYTES)))


def drain(procs, builds, bursts, per):
    """Per-core capacity with a full queue: dnsd is stopped (SIGSTOP), a burst of `per` frames is
    queued on its socket, then it is resumed and its CPU time (all threads, ns resolution) is
    summed until the queue is empty. Every `recvmmsg` then takes a full batch, as on a core that
    ingest saturates; the blaster, slower than dnsd on the other core, cannot saturate it any
    other way. Builds alternate burst by burst. A build whose HTTP address is None is the
    receive floor (`gpuha-bench sink`): it has no counter, so what it took is what was offered
    less the kernel's drops."""
    def taken(b):
        http = procs[b][2]
        return accepted_of(http)[0] if http else 0

    res = {b: {"cpu_s": 0.0, "offered": 0, "rcvbuf_drops": 0, "wall_s": 0.0} for b, _ in builds}
    start = {b: taken(b) for b, _ in builds}
    for _ in range(bursts):
        for b, _ in builds:
            dp, ingest, _ = procs[b]
            port = int(ingest.rsplit(":", 1)[1])
            rb0 = udp_rcvbuf_errors()
            os.kill(dp.pid, signal.SIGSTOP)
            try:
                subprocess.run(["taskset", "-c", LOAD_CPU, TOOL, "blast", "--to", ingest, "--key-file", make_key(), "--workers", "10000",
                                "--rate", "1000000", "--secs", str(per / 1e6)], check=True, capture_output=True, text=True)
                c0, t0 = cpu_seconds_fine(dp.pid), time.perf_counter()
            finally:
                os.kill(dp.pid, signal.SIGCONT)
            deadline = t0 + 10
            while udp_rx_queue(port) > 0 and time.perf_counter() < deadline:
                time.sleep(0.0005)
            r = res[b]
            r["cpu_s"] += cpu_seconds_fine(dp.pid) - c0
            r["wall_s"] += time.perf_counter() - t0
            r["offered"] += per
            r["rcvbuf_drops"] += udp_rcvbuf_errors() - rb0
    for b, _ in builds:
        r = res[b]
        r["accepted"] = taken(b) - start[b] if procs[b][2] else r["offered"] - r["rcvbuf_drops"]
        r["accepted_frac"] = r["accepted"] / r["offered"]
        r["cpu_us_per_frame"] = r["cpu_s"] / r["accepted"] * 1e6 if r["accepted"] else None
        r["frames_per_s_per_core"] = r["accepted"] / r["cpu_s"] if r["cpu_s"] else None
        r["burst"] = per
        note(f"ingest drain {b}: {r}")
    return res


def accepted_of(http):
    _, body = http_get(f"http://{http}/metrics")
    txt = body.decode()
    acc = int(re.search(r"^gpuha_dnsd_frames_accepted_total (\d+)", txt, re.M).group(1))
    drops = {m.group(1): int(m.group(2)) for m in re.finditer(r'frames_dropped_total\{reason="(\w+)"\} (\d+)', txt)}
    return acc, drops
from .markdown import Report, Target, fmt, svg_lines


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

    accepted = accepted_of

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

    # The receive floor beside dnsd in the drain: the same bursts into a socket whose reader
    # only takes them (`gpuha-bench sink`): the kernel's receive and the syscalls, per frame.
    sp, m = PROCS.start("ingest-sink", [TOOL, "sink", "--bind", "127.0.0.1:0", "--rcvbuf", str(DNSD_RCVBUF)], cpu=SUT_CPU,
                        wait=r"READY sink=(\S+)")
    procs["floor"] = (sp, m.group(1), None)
    dr = drain(procs, builds + [("floor", None)], 10 if quick else 30, burst_frames())
    out.update(summary(steps["current"]))
    out["drain"] = dr["current"]
    out["drain_floor"] = dr["floor"]
    if BASELINE_DNSD:
        out["baseline"] = summary(steps["baseline"])
        out["baseline"]["drain"] = dr["baseline"]
    R["ingest"] = out
    PROCS.stop_all()


def report_ingest(R, rep: Report) -> None:
    md, targets, outdir = rep.md, rep.targets, rep.outdir
    ing = R.get("ingest")
    if ing:
        md += ["", "## 4. Ingest scale", "",
               f"In-process (one core, no socket): decode+HMAC {ing['micro']['decode_hmac_ns']:.0f} ns/frame, "
               f"accept+order+fleet update {ing['micro']['accept_observe_ns']:.0f} ns/frame "
               + (f"(CPU time: decode+HMAC {ing['micro']['cpu_decode_hmac_ns']:.0f}, accept+order+fleet update "
                  f"{ing['micro']['cpu_accept_observe_ns']:.0f} ns/frame) " if "cpu_accept_observe_ns" in ing["micro"] else "")
               + f"(→ {1e9/ing['micro']['accept_observe_ns']:,.0f} frames/s/core), frame {ing['micro']['frame_bytes_avg']:.0f} B.", "",
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
        dr = ing.get("drain")
        if dr:
            md += ["", f"Per-core capacity with a full queue (dnsd stopped while a burst of {fmt(dr['burst'])} frames is queued, then "
                   "resumed; its CPU time until the queue is empty; builds alternate burst by burst):", "",
                   "| build | frames offered | accepted % | kernel rcvbuf drops | dnsd CPU µs/frame | frames/s per core |", "|---|---:|---:|---:|---:|---:|"]
            floor = ing.get("drain_floor")
            rows = [("this", dr)] + ([("baseline", bi["drain"])] if bi and bi.get("drain") else [])
            rows += [("receive floor: `recvmmsg` only, nothing done with the frames", floor)] if floor else []
            for name, d in rows:
                md.append(f"| {name} | {fmt(d['offered'])} | {d['accepted_frac']*100:.1f} | {fmt(d['rcvbuf_drops'])} | "
                          f"{fmt(d['cpu_us_per_frame'], 2)} | {fmt(d['frames_per_s_per_core'])} |")
            if floor and floor.get("cpu_us_per_frame") and dr.get("cpu_us_per_frame"):
                md += ["", f"Of dnsd's {dr['cpu_us_per_frame']:.2f} µs per frame, {floor['cpu_us_per_frame']:.2f} µs is the receive "
                       "floor (the kernel's receive and the syscalls, which no receiver of one datagram per frame avoids), "
                       f"{dr['cpu_us_per_frame'] - floor['cpu_us_per_frame']:.2f} µs its own work. At the floor alone one core "
                       f"takes {fmt(floor['frames_per_s_per_core'])} frames/s."]
        # Per core: the blaster on the other core cannot saturate dnsd, so the full-queue drain is
        # the measured figure (with ≥ 99 % accepted and no kernel drops) when there is one.
        drained = dr["frames_per_s_per_core"] if dr and dr["accepted_frac"] >= 0.99 and not dr["rcvbuf_drops"] else 0
        per_core = max(ing["max_rate_no_drop"] or 0, drained or 0)
        targets.append(Target("ingest ≥ 600 k frames/s per core", per_core >= 600_000,
                        f"{per_core:,.0f} frames/s per core with ≥ 99 % accepted (full-queue drain {fmt(drained)}; "
                        f"paced: {ing['max_rate_no_drop']:,.0f} frames/s without drops, CPU-bound estimate {fmt(cap)}"
                        + (f"; receive floor {fmt(ing['drain_floor']['frames_per_s_per_core'])}" if ing.get("drain_floor") else "") + ")"))
        svg_lines("dnsd ingest: accepted vs offered (frames/s)",
                  [("accepted", [(s["offered_rate"], s["accepted_rate"]) for s in ing["steps"]]),
                   ("offered", [(s["offered_rate"], s["offered_rate"]) for s in ing["steps"]])],
                  "offered frames/s", "frames/s", outdir / "ingest.svg")
        md += ["", "![](ingest.svg)", ""]
