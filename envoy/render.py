#!/usr/bin/env python3
"""Renders the GPU HA Envoy config templates (pool-router.yaml, failwhale.yaml).

Stdlib only. The templates use ${VAR} placeholders (string.Template); this script fills them
from command-line arguments, so tests and demos can bind their own ports and worker addresses.

    python3 envoy/render.py pool-router --out /tmp/r.yaml --listen-port 10000 --admin-port 9901 \
        --workers 127.0.0.1:8001,127.0.0.1:8002 --fleet 127.0.0.1:8080
    python3 envoy/render.py failwhale --out /tmp/fw.yaml --listen-port 10001 --admin-port 9902

See envoy/README.md for every option. Exit status 2 on bad arguments.
"""

import argparse
import ipaddress
import json
import os
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WASM_CANDIDATES = [
    os.path.join(REPO, "target", "wasm32-wasip1", "release", "gpuha_filter.wasm"),
    os.path.join(REPO, "target-filter", "wasm32-wasip1", "release", "gpuha_filter.wasm"),
]


def default_wasm():
    env = os.environ.get("GPUHA_WASM")
    if env:
        return env
    found = [p for p in WASM_CANDIDATES if os.path.exists(p)]
    if found:
        return max(found, key=os.path.getmtime)
    return WASM_CANDIDATES[0]


def split_hostport(s, what):
    """'1.2.3.4:80' or '[::1]:80' or 'name:80' -> (host, port)."""
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
    else:
        host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{what}: expected ip:port, got {s!r}")
    return host, int(port)


def is_ip(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def worker_list(s):
    out = []
    for item in s.split(","):
        item = item.strip()
        if not item:
            continue
        host, port = split_hostport(item, "--workers")
        if not is_ip(host):
            # override_host matches ip:port literally against cluster members.
            raise argparse.ArgumentTypeError(f"--workers: {item!r}: workers must be IP addresses")
        out.append((host, port))
    if not out:
        raise argparse.ArgumentTypeError("--workers: at least one ip:port")
    return out


# vLLM sets no body limit; long contexts and base64 images make multi-MB requests ordinary.
DEFAULT_MAX_BODY_BYTES = 32 << 20
# Envoy's buffer limits sit this far above max_body_bytes: Envoy adds each read to the buffered
# body before the filter sees it, so the filter's own OpenAI-shaped 413 must come first, and a
# body the filter accepted must always fit the router's retry buffer. One read is at most the
# listener's per_connection_buffer_limit_bytes (LISTENER_BUFFER_BYTES).
BUFFER_HEADROOM_BYTES = 1 << 20
# Per-connection read/write buffering (Envoy's default): it bounds one read, and is not a body
# limit here because the route's request_body_buffer_limit raises the stream's limit.
LISTENER_BUFFER_BYTES = 1 << 20


def positive_int(s):
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}")
    if v <= 0 or v > (4 << 30):
        raise argparse.ArgumentTypeError(f"must be between 1 and 4 GiB, got {v}")
    return v


def json_object(s):
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}")
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def yaml_single_quoted(s):
    return s.replace("'", "''")


def endpoints_yaml(workers, indent=8):
    pad = " " * indent
    lines = []
    for host, port in workers:
        lines.append(f"{pad}- endpoint:")
        lines.append(f"{pad}    address:")
        lines.append(f"{pad}      socket_address: {{ address: \"{host}\", port_value: {port} }}")
    return "\n".join(lines)


def common(p):
    p.add_argument("--out", default="-", help="output file (default: stdout)")
    p.add_argument("--listen-addr", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--admin-addr", default="127.0.0.1")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--wasm", default=None, help="path to gpuha_filter.wasm (default: $GPUHA_WASM or the newest build under target*/)")
    p.add_argument("--wasm-runtime", default="v8", choices=["v8", "wamr"])
    p.add_argument("--access-log", default="/dev/stdout", help="access log path (default /dev/stdout)")
    p.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted (default 32 MiB); larger ones get an OpenAI-shaped 413. "
                        "Sets the filter's max_body_bytes and Envoy's buffer limits together")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)

    r = sub.add_parser("pool-router", help="listener + picker + retrying router + guarded worker cluster")
    common(r)
    r.add_argument("--workers", type=worker_list, required=True, help="ip:port,ip:port,... (static cluster members)")
    r.add_argument("--fleet", required=True, help="dnsd HTTP address host:port serving /v1/fleet")
    r.add_argument("--num-retries", type=int, default=2)
    r.add_argument("--per-try-timeout", default="5s", help="time-to-first-token budget per attempt (Envoy duration)")
    r.add_argument("--hedge", action="store_true", help="hedge_on_per_try_timeout: start the next attempt without cancelling a stalled one")
    r.add_argument("--connect-timeout", default="0.5s")
    r.add_argument("--max-retries", type=int, default=10000, help="cluster circuit breaker max_retries")
    r.add_argument("--pool", action="append", default=[], help="telemetry pool id of this router's workers (repeat for several); the picker only picks workers of these pools (default: every pool dnsd reports)")
    r.add_argument("--stream-idle-timeout", default="300s", help="HCM stream_idle_timeout: a stream with no bytes for this long ends (a stalled worker after the first token)")
    r.add_argument("--picker-config", type=json_object, default={}, help="JSON merged into the picker plugin config")
    r.add_argument("--guard-config", type=json_object, default={}, help="JSON merged into the guard plugin config")

    f = sub.add_parser("failwhale", help="answers every request with an OpenAI-shaped 503")
    common(f)
    f.add_argument("--failwhale-config", type=json_object, default={}, help="JSON merged into the fail-whale plugin config")

    a = ap.parse_args(argv)
    wasm = a.wasm or default_wasm()
    values = {
        "LISTEN_ADDR": a.listen_addr,
        "LISTEN_PORT": a.listen_port,
        "ADMIN_ADDR": a.admin_addr,
        "ADMIN_PORT": a.admin_port,
        "WASM": os.path.abspath(wasm),
        "WASM_RUNTIME": a.wasm_runtime,
        "ACCESS_LOG": a.access_log,
        "LISTENER_BUFFER_BYTES": LISTENER_BUFFER_BYTES,
        "BODY_BUFFER_BYTES": a.max_body_bytes + BUFFER_HEADROOM_BYTES,
    }
    if a.which == "pool-router":
        fhost, fport = split_hostport(a.fleet, "--fleet")
        if "max_body_bytes" in a.picker_config:
            ap.error("--picker-config: set max_body_bytes with --max-body-bytes (it sets Envoy's buffer limits too)")
        picker = {"role": "picker", "fleet_cluster": "gpuha_fleet", "fleet_authority": a.fleet, "max_body_bytes": a.max_body_bytes}
        if a.pool:
            picker["pick"] = {"pools": a.pool}
        for k, v in a.picker_config.items():
            if k == "pick" and isinstance(v, dict):
                picker.setdefault("pick", {}).update(v)
            else:
                picker[k] = v
        guard = {"role": "guard"}
        guard.update(a.guard_config)
        values.update({
            "WORKER_ENDPOINTS": endpoints_yaml(a.workers),
            "FLEET_HOST": f"\"{fhost}\"",
            "FLEET_PORT": fport,
            "FLEET_CLUSTER_TYPE": "STATIC" if is_ip(fhost) else "STRICT_DNS",
            "NUM_RETRIES": a.num_retries,
            "STREAM_IDLE_TIMEOUT": a.stream_idle_timeout,
            "PER_TRY_TIMEOUT": a.per_try_timeout,
            "HEDGE_ON_PER_TRY_TIMEOUT": "true" if a.hedge else "false",
            "CONNECT_TIMEOUT": a.connect_timeout,
            "MAX_RETRIES": a.max_retries,
            "PICKER_CONFIG": yaml_single_quoted(json.dumps(picker, separators=(",", ":"))),
            "GUARD_CONFIG": yaml_single_quoted(json.dumps(guard, separators=(",", ":"))),
        })
        template = "pool-router.yaml"
    else:
        if "max_body_bytes" in a.failwhale_config:
            ap.error("--failwhale-config: set max_body_bytes with --max-body-bytes (it sets Envoy's buffer limits too)")
        fw = {"role": "failwhale", "max_body_bytes": a.max_body_bytes}
        fw.update(a.failwhale_config)
        values["FAILWHALE_CONFIG"] = yaml_single_quoted(json.dumps(fw, separators=(",", ":")))
        template = "failwhale.yaml"

    with open(os.path.join(HERE, template), encoding="utf-8") as fh:
        text = string.Template(fh.read()).substitute({k: str(v) for k, v in values.items()})
    if a.out == "-":
        sys.stdout.write(text)
    else:
        with open(a.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
