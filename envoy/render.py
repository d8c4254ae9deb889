#!/usr/bin/env python3
"""Renders the GPU HA Envoy config templates (pool-router.yaml, failwhale.yaml).

Stdlib only. The templates use ${VAR} placeholders (string.Template); this script fills them
from command-line arguments, so tests and demos can bind their own ports and worker addresses.

    python3 envoy/render.py pool-router --out /tmp/r.yaml --listen-port 10000 --admin-port 9901 \
        --workers 127.0.0.1:8001,127.0.0.1:8002 --fleet 127.0.0.1:8080
    python3 envoy/render.py failwhale --out /tmp/fw.yaml --listen-port 10001 --admin-port 9902

Without --workers the worker cluster's members come from dnsd over EDS (envoy/README.md,
"Membership over EDS"): workers join with their sidecar's first frame, nothing is re-rendered.

    python3 envoy/render.py pool-router --out /tmp/r.yaml --listen-port 10000 --admin-port 9901 \
        --fleet 127.0.0.1:8080 --pool eu-1

A fallback chain (envoy/README.md, "Fallback chain") adds tiers after the router's own workers:

    ... --spill b=10.0.2.1:10000 \
        --degraded '{"name":"small","port":10101,"workers":["127.0.0.1:8101"],"model":"small","max_tokens":256}' \
        --provider '{"name":"openai","port":10102,"url":"https://api.openai.com/v1","model":"gpt-4o-mini",
                     "api_key_file":"/etc/gpuha/openai.key"}'

See envoy/README.md for every option. Exit status 2 on bad arguments. (A little over 500 lines:
the one argument parser of both templates; the TLS pieces live in dnsd_tls.py.)
"""

import argparse
import ipaddress
import json
import os
import re
import string
import sys
import urllib.parse

import dnsd_tls

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


TIER_NAME_RX = re.compile(r"^[a-z0-9_-]{1,32}$")
# The system trust store on Debian/Ubuntu: a provider's certificate is checked against it.
DEFAULT_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


def tier_name(s, what):
    if not TIER_NAME_RX.match(s):
        raise argparse.ArgumentTypeError(f"{what}: tier name {s!r} must be 1-32 characters of a-z, 0-9, _ and -")
    return s


def spill_tier(s):
    """NAME=IP:PORT[,IP:PORT...]: another pool's router(s)."""
    name, sep, addrs = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--spill: expected NAME=ip:port[,ip:port], got {s!r}")
    return {"name": tier_name(name, "--spill"), "kind": "spill",
            "endpoints": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in worker_list(addrs)]}


ADAPT_KEYS = {"model", "max_tokens", "set"}


def adapted_tier(kind):
    """JSON for a degraded tier or a provider (keys in envoy/README.md)."""
    required = {"degraded": {"name", "port", "workers"}, "provider": {"name", "port", "url"}}[kind]
    allowed = required | ADAPT_KEYS | {"degraded": set(), "provider": {"api_key_file", "ca_file", "address", "sni"}}[kind]
    flag = f"--{kind}"

    def parse(s):
        t = json_object(s)
        missing = required - t.keys()
        if missing:
            raise argparse.ArgumentTypeError(f"{flag}: missing {sorted(missing)}")
        unknown = t.keys() - allowed
        if unknown:
            raise argparse.ArgumentTypeError(f"{flag}: unknown keys {sorted(unknown)} (known: {sorted(allowed)})")
        tier_name(t["name"], flag)
        if not isinstance(t["port"], int) or not 0 < t["port"] < 65536:
            raise argparse.ArgumentTypeError(f"{flag}: port must be a TCP port (the tier's adapter listener on 127.0.0.1)")
        t["kind"] = kind
        if kind == "degraded":
            if not isinstance(t["workers"], list):
                raise argparse.ArgumentTypeError(f"{flag}: workers must be a list of ip:port")
            t["workers"] = worker_list(",".join(t["workers"]))
        else:
            u = urllib.parse.urlsplit(t["url"])
            if u.scheme not in ("https", "http") or not u.hostname:
                raise argparse.ArgumentTypeError(f"{flag}: url must be https://host[:port][/path] (http:// only for tests)")
            t["tls"] = u.scheme == "https"
            t["host"] = u.hostname
            t["host_port"] = u.port or (443 if t["tls"] else 80)
            t["path"] = u.path.rstrip("/") or "/v1"
            if "api_key_file" in t and not os.path.isfile(t["api_key_file"]):
                raise argparse.ArgumentTypeError(f"{flag}: api_key_file {t['api_key_file']!r} does not exist")
        return t

    return parse


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
    p.add_argument("--filter-build", default="wasm", choices=["wasm", "native"],
                   help="the gpuha filters as Proxy-Wasm (default) or as the native dynamic module libgpuha_native.so "
                        "(same filter and configuration; Envoy needs ENVOY_DYNAMIC_MODULES_SEARCH_PATH, envoy/README.md)")
    p.add_argument("--access-log", default="/dev/stdout", help="access log path (default /dev/stdout)")
    p.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted (default 32 MiB); larger ones get an OpenAI-shaped 413. "
                        "Sets the filter's max_body_bytes and Envoy's buffer limits together")


FILTERS = ("picker", "guard")


def filter_set(s):
    """--filters: a comma-separated subset of picker,guard, or none."""
    if s == "none":
        return set()
    names = {n.strip() for n in s.split(",") if n.strip()}
    bad = names - set(FILTERS)
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected picker, guard, picker,guard or none, got {s!r}")
    return names


def select_filters(text, keep):
    """Drops the `# begin gpuha.NAME` .. `# end gpuha.NAME` block of each filter not in `keep`,
    and the marker lines of those kept: every other line of the config stays as it is."""
    out, dropping = [], None
    for line in text.splitlines(keepends=True):
        mark = line.strip()
        if mark.startswith("# begin gpuha."):
            name = mark.split()[2].removeprefix("gpuha.")
            dropping = None if name in keep else name
            continue
        if mark.startswith("# end gpuha."):
            dropping = None
            continue
        if dropping is None:
            out.append(line)
    return "".join(out)


WASM_TYPE = '"@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm'
NATIVE_TYPE = '"@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter'


def to_native(text):
    """--filter-build native: each gpuha Wasm filter becomes the same filter in the native
    dynamic module (`native/`, libgpuha_native.so), with the same plugin configuration. Envoy
    finds the module on ENVOY_DYNAMIC_MODULES_SEARCH_PATH (envoy/README.md, "Native filter")."""
    lines = text.splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != WASM_TYPE:
            out.append(line)
            i += 1
            continue
        indent = line[:len(line) - len(line.lstrip())]
        block = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) >= len(indent)):
            block.append(lines[i])
            i += 1
        name = next((b.split(":", 1)[1].strip() for b in block if b.strip().startswith("name: ")), "gpuha")
        value = next((b.strip() for b in block if b.strip().startswith("value: ")), None)
        if value is None:
            raise ValueError(f"native: no plugin configuration in the Wasm filter {name}")
        out += [f"{indent}{NATIVE_TYPE}\n",
                f"{indent}dynamic_module_config: {{ name: gpuha_native, do_not_close: true }}\n",
                f"{indent}filter_name: {name}\n",
                f"{indent}filter_config:\n",
                f'{indent}  "@type": type.googleapis.com/google.protobuf.StringValue\n',
                f"{indent}  {value}\n"]
    return "".join(out)


def fill(template, values):
    with open(os.path.join(HERE, template), encoding="utf-8") as fh:
        return string.Template(fh.read()).substitute({k: str(v) for k, v in values.items()})


def render_tiers(a, values, guard, ap):
    """The chain for the plugins, and the YAML of the tiers' adapter listeners, clusters and
    secrets (tier-listener.yaml, tier-cluster.yaml)."""
    tiers = list(a.spill)
    listeners, clusters, secrets = [], [], []
    names = [a.tier_name]
    for t in a.spill + a.degraded + a.provider:
        if t["name"] in names:
            ap.error(f"tier name {t['name']!r} is used twice")
        names.append(t["name"])
    for t in a.degraded + a.provider:
        addr = f"127.0.0.1:{t['port']}"
        tiers.append({"name": t["name"], "kind": t["kind"], "endpoints": [addr]})
        adapt = {k: t[k] for k in ("model", "max_tokens", "set") if k in t}
        tier_cfg = {"role": "tier", "name": t["name"], "kind": t["kind"], "adapt": adapt, "max_body_bytes": a.max_body_bytes}
        # The tier's own guard: its candidates are not in the fleet view (nothing to rescue on).
        tier_guard = {**guard, "rescue": False}
        tier_guard.pop("tiers", None)
        rewrites, credential, transport, prefix = [], "", "", "/"
        if t["kind"] == "degraded":
            workers = t["workers"]
            ctype = "STATIC"
        else:
            host, port = t.get("address", t["host"]), t["host_port"]
            workers = [(host, port)]
            ctype = "STATIC" if is_ip(host) else "STRICT_DNS"
            authority = t["host"] if port == (443 if t["tls"] else 80) else f"{t['host']}:{port}"
            rewrites.append(f"                  host_rewrite_literal: \"{authority}\"")
            if t["path"] != "/v1":
                # The provider's base URL has its own path: /v1/X is sent as <path>/X.
                prefix = "/v1/"
                rewrites.append(f"                  prefix_rewrite: \"{t['path']}/\"")
            if t["tls"]:
                sni = t.get("sni", t["host"])
                ca = os.path.abspath(t.get("ca_file", DEFAULT_CA_FILE))
                transport = "\n".join([
                    "    transport_socket:",
                    "      name: envoy.transport_sockets.tls",
                    "      typed_config:",
                    "        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    f"        sni: \"{sni}\"",
                    "        common_tls_context:",
                    "          validation_context:",
                    f"            trusted_ca: {{ filename: \"{ca}\" }}",
                    f"            match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: \"{sni}\" }} }}]",
                ])
            if "api_key_file" in t:
                secret = f"gpuha_tier_{t['name']}_api_key"
                secrets.append("\n".join([
                    f"  - name: {secret}",
                    "    generic_secret:",
                    f"      secret: {{ filename: \"{os.path.abspath(t['api_key_file'])}\" }}",
                ]))
                # Stock Envoy reads the key from the file; the client's own Authorization is replaced.
                credential = "\n".join([
                    "          - name: envoy.filters.http.credential_injector",
                    "            typed_config:",
                    "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                    "              overwrite: true",
                    "              credential:",
                    "                name: envoy.http.injected_credentials.generic",
                    "                typed_config:",
                    "                  \"@type\": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                    f"                  credential: {{ name: {secret} }}",
                    "                  header: Authorization",
                    "                  header_value_prefix: \"Bearer \"",
                ])
        common_values = {**values, "NAME": t["name"], "KIND": t["kind"], "ADDR": addr, "PORT": t["port"]}
        listeners.append(fill("tier-listener.yaml", {
            **common_values,
            "STREAM_IDLE_TIMEOUT": a.stream_idle_timeout,
            "PER_TRY_TIMEOUT": a.per_try_timeout,
            "TIER_RETRIES": len(workers) - 1,
            "ROUTE_REWRITES": "\n".join(rewrites),
            "ROUTE_PREFIX": prefix,
            "CREDENTIAL_FILTER": credential,
            "TIER_CONFIG": yaml_single_quoted(json.dumps(tier_cfg, separators=(",", ":"))),
        }).rstrip("\n"))
        clusters.append(fill("tier-cluster.yaml", {
            **common_values,
            "CLUSTER_TYPE": ctype,
            "CONNECT_TIMEOUT": a.connect_timeout,
            "UPSTREAM_IDLE_TIMEOUT": a.upstream_idle_timeout,
            "MAX_RETRIES": a.max_retries,
            "TRANSPORT_SOCKET": transport,
            "GUARD_CONFIG": yaml_single_quoted(json.dumps(tier_guard, separators=(",", ":"))),
            "ENDPOINTS": endpoints_yaml(workers),
        }).rstrip("\n"))
    chain = {"own": a.tier_name, "own_endpoints": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in a.workers or []], "tiers": tiers}
    out = {
        "TIER_LISTENERS": "\n".join(listeners),
        "TIER_CLUSTERS": "\n".join(clusters),
        "SECRETS": ("  secrets:\n" + "\n".join(secrets) + "\n") if secrets else "",
    }
    return chain, out


def membership(a, tier_endpoints):
    """The worker cluster's members: static (--workers, tiers at priority 1), or EDS from dnsd,
    which lists this router's pools' workers and puts the tier endpoints named in the node's
    metadata at priority 1 (it cannot know them otherwise)."""
    if a.workers:
        tiers = ("      - priority: 1\n        lb_endpoints:\n" + endpoints_yaml([split_hostport(e, "tier") for e in tier_endpoints])) if tier_endpoints else ""
        return {
            "NODE": "",
            "WORKERS_CLUSTER_TYPE": "STATIC",
            "WORKER_MEMBERSHIP": "\n".join(["    load_assignment:", "      cluster_name: gpuha_workers", "      endpoints:", "      - lb_endpoints:",
                                            endpoints_yaml(a.workers), tiers]).rstrip("\n"),
        }
    meta = {"pools": a.pool, "tiers": tier_endpoints}
    node = "\n".join([
        "node:",
        f"  id: \"{a.node_id}\"",
        "  cluster: gpuha-router",
        # Read by dnsd on every poll: which pools' workers this router gets, and its tiers.
        f"  metadata: {{ gpuha: {json.dumps(meta, separators=(',', ':'))} }}",
    ]) + "\n"
    return {
        "NODE": node,
        "WORKERS_CLUSTER_TYPE": "EDS",
        "WORKER_MEMBERSHIP": "\n".join([
            "    eds_cluster_config:",
            "      service_name: gpuha_workers",
            "      eds_config:",
            "        resource_api_version: V3",
            "        api_config_source:",
            "          api_type: REST",
            "          transport_api_version: V3",
            "          cluster_names: [gpuha_fleet]",
            f"          refresh_delay: {a.eds_refresh}",
            "          request_timeout: 1s",
        ]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)

    r = sub.add_parser("pool-router", help="listener + picker + retrying router + guarded worker cluster")
    common(r)
    r.add_argument("--workers", type=worker_list, default=None,
                   help="ip:port,ip:port,...: static cluster members. Without it the members come from dnsd over EDS (--fleet)")
    r.add_argument("--eds-refresh", default="0.25s", help="EDS: how often Envoy polls dnsd for the members (Envoy duration)")
    r.add_argument("--node-id", default="gpuha-router", help="EDS: this Envoy's node id (dnsd logs it; the cluster's name is gpuha-router)")
    r.add_argument("--fleet", required=True, help="dnsd HTTP address host:port serving /v1/fleet")
    r.add_argument("--dnsd-tls", default=None, metavar="DIR",
                   help="mutual TLS to dnsd (fleet poll and EDS): DIR holds ca.crt, client.crt, client.key; "
                        "rotated over SDS from files written beside --out (or in --sds-dir). See deploy/tls/README.md")
    r.add_argument("--sds-dir", default=None, help="with --dnsd-tls: where the SDS files go (default: the directory of --out)")
    r.add_argument("--remote-paths", action="store_true", help="with --dnsd-tls: it and --sds-dir (required, absolute) are paths on the machine "
                   "that runs Envoy (Kubernetes mounts): not checked or written here; dnsd_tls.sds_texts() gives the SDS files")
    r.add_argument("--num-retries", type=int, default=2)
    r.add_argument("--per-try-timeout", default="5s", help="time-to-first-token budget per attempt (Envoy duration)")
    r.add_argument("--hedge", action="store_true", help="hedge_on_per_try_timeout: start the next attempt without cancelling a stalled one")
    r.add_argument("--connect-timeout", default="0.5s")
    r.add_argument("--upstream-idle-timeout", default="4s",
                   help="Envoy closes a connection to a worker or tier idle this long (Envoy duration); keep it below the "
                        "workers' own keep-alive (vLLM: 5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE), or a request can meet a connection "
                        "the worker is closing")
    r.add_argument("--max-retries", type=int, default=10000, help="cluster circuit breaker max_retries")
    r.add_argument("--pool", action="append", default=[], help="telemetry pool id of this router's workers (repeat for several); the picker only picks workers of these pools (default: every pool dnsd reports)")
    r.add_argument("--stream-idle-timeout", default="300s", help="HCM stream_idle_timeout: a stream with no bytes for this long ends (a stalled worker after the first token)")
    r.add_argument("--filters", type=filter_set, default=set(FILTERS),
                   help="which gpuha filters the config has: picker,guard (default), picker, guard or none "
                        "(the same Envoy without Wasm, for side-by-side benchmarks)")
    r.add_argument("--picker-config", type=json_object, default={}, help="JSON merged into the picker plugin config")
    r.add_argument("--guard-config", type=json_object, default={}, help="JSON merged into the guard plugin config")
    r.add_argument("--tier-name", type=lambda v: tier_name(v, "--tier-name"), default="primary",
                   help="name of this router's own workers' tier (x-gpuha-tier, stats)")
    r.add_argument("--spill", type=spill_tier, action="append", default=[],
                   help="NAME=IP:PORT[,IP:PORT]: another pool's router, tried after this router's own workers (repeat; in order)")
    r.add_argument("--degraded", type=adapted_tier("degraded"), action="append", default=[],
                   help="JSON: a degraded tier (smaller model, CPU vLLM), tried after the spill tiers (repeat; in order)")
    r.add_argument("--provider", type=adapted_tier("provider"), action="append", default=[],
                   help="JSON: an external OpenAI-compatible provider, tried last")
    r.add_argument("--spill-share", type=float, default=0.5,
                   help="share of this pool's capacity that requests spilled from other routers may hold (0..1)")
    r.add_argument("--spill-slots", type=float, default=64,
                   help="concurrent requests one of this pool's workers takes (vLLM --max-num-seqs), for the spill budget")

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
        chain, tier_values = render_tiers(a, values, guard, ap)
        # The chain's own_endpoints are the cluster's static members: the picker counts its
        # retries past a request's list over them as well as over dnsd's view (which knows only
        # the workers whose frames it has had: after its restart, maybe one).
        if chain["tiers"] or a.tier_name != "primary" or chain["own_endpoints"]:
            picker["tiers"] = chain
            guard["tiers"] = chain
        if not 0.0 <= a.spill_share <= 1.0:
            ap.error("--spill-share: must be in 0..1")
        if a.spill_slots < 1:
            ap.error("--spill-slots: must be at least 1")
        picker["spill_budget"] = {"share": a.spill_share, "slots_per_worker": a.spill_slots}
        own = {f"{h}:{p}" for h, p in a.workers or []}
        clash = own & {e for t in chain["tiers"] for e in t["endpoints"]}
        if clash:
            ap.error(f"tier endpoints {sorted(clash)} are also --workers")
        tier_endpoints = [e for t in chain["tiers"] for e in t["endpoints"]]
        values.update(tier_values)
        values.update(membership(a, tier_endpoints))
        if a.dnsd_tls and not values["NODE"]:
            # Envoy's SDS needs a node id and cluster even with static members.
            values["NODE"] = f"node:\n  id: \"{a.node_id}\"\n  cluster: gpuha-router\n"
        if a.remote_paths and not a.dnsd_tls:
            ap.error("--remote-paths: only with --dnsd-tls (it says where --dnsd-tls and --sds-dir are)")
        try:
            fleet_tls = dnsd_tls.transport_socket(a.dnsd_tls, fhost, a.out, a.sds_dir, a.remote_paths) if a.dnsd_tls else ""
        except dnsd_tls.TlsError as e:
            ap.error(str(e))
        values.update({
            "FLEET_TRANSPORT_SOCKET": fleet_tls,
            "FLEET_HOST": f"\"{fhost}\"",
            "FLEET_PORT": fport,
            "FLEET_CLUSTER_TYPE": "STATIC" if is_ip(fhost) else "STRICT_DNS",
            # Every tier endpoint is one more attempt after the own workers'.
            "NUM_RETRIES": a.num_retries + len(tier_endpoints),
            "STREAM_IDLE_TIMEOUT": a.stream_idle_timeout,
            "PER_TRY_TIMEOUT": a.per_try_timeout,
            "HEDGE_ON_PER_TRY_TIMEOUT": "true" if a.hedge else "false",
            "CONNECT_TIMEOUT": a.connect_timeout,
            "UPSTREAM_IDLE_TIMEOUT": a.upstream_idle_timeout,
            "MAX_RETRIES": a.max_retries,
            "PICKER_CONFIG": yaml_single_quoted(json.dumps(picker, separators=(",", ":"))),
            "GUARD_CONFIG": yaml_single_quoted(json.dumps(guard, separators=(",", ":"))),
        })
        template = "pool-router.yaml"
    else:
        values.update({"SECRETS": ""})
        if "max_body_bytes" in a.failwhale_config:
            ap.error("--failwhale-config: set max_body_bytes with --max-body-bytes (it sets Envoy's buffer limits too)")
        fw = {"role": "failwhale", "max_body_bytes": a.max_body_bytes}
        fw.update(a.failwhale_config)
        values["FAILWHALE_CONFIG"] = yaml_single_quoted(json.dumps(fw, separators=(",", ":")))
        template = "failwhale.yaml"

    text = fill(template, values)
    if a.which == "pool-router":
        text = select_filters(text, a.filters)
    if a.filter_build == "native":
        text = to_native(text)
    if a.out == "-":
        sys.stdout.write(text)
    else:
        with open(a.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
