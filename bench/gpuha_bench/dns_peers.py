"""The DNS peers the bench runs beside dnsd on 127.0.0.1, each with its own config: gdnsd and
PowerDNS (failover by health checks), NSD and Knot (static answers, for throughput)."""

import socket
import time

from .common import PROCS, SUT_CPU, WORK, free_port
from .dns_tools import dns_query, kill_and_time, wait_dns


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
