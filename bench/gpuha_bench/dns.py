"""The DNS tier: failover time beside gdnsd and PowerDNS, throughput beside gdnsd, NSD and Knot (dnsperf), and answers during config reloads."""

import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time

from .common import BASELINE_DNSD, LOAD_CPU, PROCS, REL, SUT_CPU, TOOL, WORK, dnsd, fleet_ready, free_port, http_get, make_key, note, sidecar
from .dns_peers import gdnsd_conf, gdnsd_failover, pdns_conf, pdns_failover, start_knot, start_nsd
from .dns_tools import dns_workers, dnsperf, kill_and_time, wait_dns
from .markdown import Report, Target, fmt, svg_bars


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


def sec_dnsperf(R, quick):
    secs = 3 if quick else 6
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

    # dnsd, its baseline build and gdnsd alternately (a b c a b c ...), then the static-only
    # peers once: dnsd against gdnsd is the row that must hold, and the loopback's kernel work is
    # >95 % of every server's CPU here (perf), so one sample of each is within the machine's noise.
    # The dynamic name in every repeat (the row), the static one in the first only.
    reps = 1 if quick else 3
    for rep in range(reps):
        names = ["api.bench.test", "static.bench.test"] if rep == 0 else ["api.bench.test"]
        if ok:
            run("dnsd", names, dnsd_start)
        if ok and BASELINE_DNSD:
            run("dnsd (baseline)", names, lambda: dnsd_start(BASELINE_DNSD))
        if shutil.which("gdnsd"):
            run("gdnsd", names, gdnsd_start)
    if not ok:
        rows.append({"server": "dnsd", "name": "-", "qps": None, "error": f"no DNS in this build: {why[:200]}"})
    if shutil.which("nsd"):
        run("nsd", ["static.bench.test"], nsd_start)
    if shutil.which("knotd"):
        run("knot", ["static.bench.test"], knot_start)
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


def report_dns_failover(R, rep: Report) -> None:
    md = rep.md
    dfo = R.get("dns_failover")
    if dfo:
        md += ["", "DNS tier: pool's only worker SIGKILLed → first answer without the pool's router (polled every 50 ms).", "",
               "| server | seconds | notes |", "|---|---:|---|"]
        for k, r in dfo.items():
            md.append(f"| {k} | {fmt(r.get('seconds'), 2)} | {r.get('config') or r.get('skipped') or r.get('error') or ''} |")


def report_dnsperf(R, rep: Report) -> None:
    md, targets, outdir = rep.md, rep.targets, rep.outdir
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
            targets.append(Target("dnsd dynamic ≥ 50 % of NSD static", dyn >= 0.5 * nsd_q, f"{dyn:,.0f} vs {nsd_q:,.0f} q/s = {dyn/nsd_q*100:.0f} %"))
        gd = q.get(("gdnsd", "api.bench.test"))
        if dyn and gd:
            targets.append(Target("dnsd dynamic ≥ gdnsd dynamic", dyn >= gd, f"{dyn:,.0f} vs {gd:,.0f} q/s = {dyn/gd:.2f}× (best of each)"))
            pairs = [(a["qps"], b["qps"]) for a, b in zip(
                [r for r in dp["rows"] if r["server"] == "dnsd" and r["name"] == "api.bench.test" and r.get("qps")],
                [r for r in dp["rows"] if r["server"] == "gdnsd" and r["name"] == "api.bench.test" and r.get("qps")])]
            if pairs:
                md += ["", "dnsd / gdnsd, dynamic name, each repeat (run one after the other): " +
                       ", ".join(f"{a / b:.2f}×" for a, b in pairs) + f"; median {statistics.median(a / b for a, b in pairs):.2f}×."]
        base = q.get(("dnsd (baseline)", "api.bench.test"))
        if dyn and base:
            md += ["", f"dnsd dynamic, this build / baseline build (best of 2 each, same run): {dyn:,.0f} / {base:,.0f} q/s = {dyn/base:.2f}×."]
        svg_bars("DNS queries/s (dnsperf, same core)", [(f"{r['server']} {r['name'].split('.')[0]}", r.get("qps")) for r in dp["rows"]], "q/s", outdir / "dnsperf.svg")
        md += ["", "![](dnsperf.svg)", ""]


def report_reload(R, rep: Report) -> None:
    md, targets = rep.md, rep.targets
    rl = R.get("reload")
    if rl:
        md += ["", "## 3b. DNS during config reloads (SIGHUP every 200 ms, dnsperf)", ""]
        if "error" in rl:
            md.append(f"not measured: {rl['error']}")
        else:
            md += ["| reloads applied | reloads refused (bad config) | queries/s | lost | response codes |", "|---:|---:|---:|---:|---|",
                   f"| {fmt(rl.get('reloads_ok'))} | {fmt(rl.get('reloads_refused'))} | {fmt(rl.get('qps'))} | {rl.get('lost')} | {rl.get('rcodes')} |"]
            targets.append(Target("0 DNS queries lost during reloads", rl.get("lost") == 0 and (rl.get("reloads_ok") or 0) > 0,
                            f"{rl.get('lost')} lost over {rl.get('secs')} s, {fmt(rl.get('reloads_ok'))} reloads applied, {fmt(rl.get('reloads_refused'))} refused"))
