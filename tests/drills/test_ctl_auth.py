"""The control channel over mutual TLS (issue 14, part 2): dnsd's HTTP side ([http.tls]) and
the routers' gpuha_fleet cluster (render.py --dnsd-tls), certificates from
deploy/tls/make-certs.sh. dnsd's /metrics is read on its plain metrics listener.

  refused    clients without a certificate (python, curl), with one from another CA, and
             plain HTTP are refused in the handshake and counted by reason in dnsd's /metrics;
             a client with the CA's certificate is served.
  wrong      two routers under traffic whose credentials are wrong: one with static workers
             and a client certificate of another CA (dnsd refuses it from the start), one over
             EDS whose CA is replaced by another one's and dnsd restarted (it cannot verify dnsd
             any more). Both fail open: 0 client errors, the EDS one on its last membership;
             Envoy counts the TLS failures and the picker logs why its polls fail.
  rotation   a new CA rolled out under traffic, as deploy/tls/README.md says (trust both; new
             certificates; trust only the new): dnsd reloaded (SIGHUP and POST
             /v1/admin/reload), Envoy picks the files up over SDS, no restart of either; 0
             client errors, the fleet view fresh after, and dnsd restarted at the end takes only
             the new certificates.

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 -m pytest tests/drills/test_ctl_auth.py -v -s
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import gpuha_harness as harness
from gpuha_harness import Load, make_client, wait_for
from gpuha_harness import summarize, warm_up

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "drill-admin-token-0123456789"


def report(line: str) -> None:
    print(f"\n{line}", flush=True)


def make_certs(*args: str) -> None:
    r = subprocess.run(["bash", str(REPO / "deploy" / "tls" / "make-certs.sh"), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"make-certs.sh {args}: {r.stderr}"


def tls_context(ca: Path, cert_dir: Optional[Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "client.crt"), str(cert_dir / "client.key"))
    return ctx


def https_get(url: str, ctx: ssl.SSLContext, timeout: float = 2.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy then rename into place: what Envoy's SDS watch (and make-certs.sh) expects."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class TlsDnsd(harness.Dnsd):
    """A dnsd whose HTTP side is TLS: the harness' fleet() with a client certificate, metrics
    from the plain metrics listener."""
    ctx: ssl.SSLContext
    metrics_addr: str
    config: Path

    def fleet(self) -> dict:
        status, body = https_get(f"https://{self.http}/v1/fleet", self.ctx)
        if status != 200:
            raise AssertionError(f"/v1/fleet answered {status}: {body[:200]!r}")
        return json.loads(body)

    def metrics(self) -> dict[str, float]:
        status, body = harness.http_get(f"http://{self.metrics_addr}/metrics")
        assert status == 200, body[:200]
        return harness.parse_metrics(body.decode(errors="replace"))

    def refused(self) -> dict[str, int]:
        out = {}
        for k, v in self.metrics().items():
            m = re.fullmatch(r'gpuha_dnsd_http_tls_refused_total\{reason="([^"]+)"\}', k)
            if m:
                out[m.group(1)] = int(v)
        return out


def write_config(stack: harness.Stack, certs: Path, http: str = "127.0.0.1:0", metrics: str = "127.0.0.1:0") -> Path:
    """dnsd's config with [http.tls] from `certs` (dnsd.crt, dnsd.key, client-ca.crt)."""
    token = stack.logdir / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    cfg = stack.logdir / "dnsd.toml"
    cfg.write_text(
        f'[ingest]\nlisten = "127.0.0.1:0"\nkeys = [{{ id = {stack.key_id}, file = "{stack.key_file}" }}]\n'
        f'[http]\nlisten = "{http}"\nmetrics_listen = "{metrics}"\n'
        f'tls = {{ cert_file = "{certs}/dnsd.crt", key_file = "{certs}/dnsd.key", client_ca_file = "{certs}/client-ca.crt" }}\n'
        f'[eds]\nleave_after_ms = 4000\n[admin]\ntoken_file = "{token}"\n')
    return cfg


def start_dnsd(stack: harness.Stack, cfg: Path, ctx: ssl.SSLContext, ingest: str = "127.0.0.1:0") -> TlsDnsd:
    proc = stack.spawn("dnsd", [harness.binary("gpuha-dnsd"), "--config", str(cfg), "--ingest", ingest])
    m = proc.wait_line(r"^READY ingest=(\S+) http=(\S+) dns=(\S+) metrics=(\S+)")
    d = TlsDnsd(ingest=m.group(1), http=m.group(2), proc=proc, dns=m.group(3))
    d.ctx, d.metrics_addr, d.config = ctx, m.group(4), cfg
    stack.dnsd = d
    wait_for(lambda: harness.succeeds(d.fleet), 10, "dnsd /v1/fleet over TLS")
    return d


def restart_dnsd(stack: harness.Stack, d: TlsDnsd) -> TlsDnsd:
    """Same ports (the routers' config names them)."""
    d.proc.terminate()
    cfg = write_config(stack, Path(re.search(r'cert_file = "([^"]+)/dnsd.crt"', d.config.read_text()).group(1)),
                       http=d.http, metrics=d.metrics_addr)
    return wait_for(lambda: _try_start(stack, cfg, d), 15, "dnsd restarted on its ports")


def _try_start(stack, cfg, d):
    try:
        return start_dnsd(stack, cfg, d.ctx, ingest=d.ingest)
    except AssertionError:
        return None  # the old sockets not yet released


def pki(root: Path) -> dict[str, Path]:
    """Two independent CAs, each with dnsd's and a router's certificate; `dnsd` and `router` are
    the directories each reads, filled from CA `a`."""
    dirs = {name: root / name for name in ("a", "b", "dnsd", "router")}
    make_certs("all", str(dirs["a"]))
    make_certs("all", str(dirs["b"]))
    for d in ("dnsd", "router"):
        dirs[d].mkdir(parents=True, exist_ok=True)
    for f in ("dnsd.crt", "dnsd.key"):
        shutil.copyfile(dirs["a"] / f, dirs["dnsd"] / f)
    shutil.copyfile(dirs["a"] / "ca.crt", dirs["dnsd"] / "client-ca.crt")
    for f in ("ca.crt", "client.crt", "client.key"):
        shutil.copyfile(dirs["a"] / f, dirs["router"] / f)
    return dirs


def envoy_log(stack: harness.Stack, name: str) -> str:
    try:
        return (stack.logdir / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""


def router(stack: harness.Stack, name: str, tls_dir: Path, eds: bool, **kw) -> harness.Envoy:
    return stack.start_pool_router(name=name, eds=eds, pool="p1", dnsd_tls=str(tls_dir), sds_dir=str(stack.logdir), **kw)


# --------------------------------------------------------------------------------------------


def test_clients_without_credentials_are_refused_and_counted(stack, tmp_path):
    dirs = pki(tmp_path)
    ok_ctx = tls_context(dirs["a"] / "ca.crt", dirs["a"])
    d = start_dnsd(stack, write_config(stack, dirs["dnsd"]), ok_ctx)
    before = d.refused()
    url = f"https://{d.http}/v1/fleet"
    attempts = {"no_certificate": 0, "bad_certificate": 0, "not_tls": 0}

    def refused_by_python(ctx) -> bool:
        try:
            https_get(url, ctx)
            return False
        except (OSError, ssl.SSLError):
            return True

    for _ in range(3):
        assert refused_by_python(tls_context(dirs["a"] / "ca.crt", None)), "served without a certificate"
        attempts["no_certificate"] += 1
        assert refused_by_python(tls_context(dirs["a"] / "ca.crt", dirs["b"])), "served with another CA's certificate"
        attempts["bad_certificate"] += 1
        try:
            status, _ = harness.http_get(f"http://{d.http}/v1/fleet", timeout=2)
            assert status != 200, "plain HTTP served on the TLS port"
        except (OSError, http.client.HTTPException):
            pass  # dnsd answers with a TLS alert, not HTTP
        attempts["not_tls"] += 1
    curl = shutil.which("curl")
    if curl:
        r = subprocess.run([curl, "-sS", "--max-time", "3", "--cacert", str(dirs["a"] / "ca.crt"), url], capture_output=True, text=True)
        assert r.returncode != 0, f"curl without a certificate was served: {r.stdout[:200]}"
        attempts["no_certificate"] += 1
        r = subprocess.run([curl, "-sS", "--max-time", "3", "--cacert", str(dirs["a"] / "ca.crt"), "--cert", str(dirs["a"] / "client.crt"),
                            "--key", str(dirs["a"] / "client.key"), url], capture_output=True, text=True)
        assert r.returncode == 0 and json.loads(r.stdout).get("workers") is not None, f"curl with the CA's certificate: {r.stderr}"
    status, _ = https_get(url, ok_ctx)
    assert status == 200

    def counted():
        got = d.refused()
        return all(got.get(k, 0) - before.get(k, 0) >= n for k, n in attempts.items()) and got
    got = wait_for(counted, 5, f"dnsd to count the refusals {attempts}")
    log = d.proc.out_path.read_text(errors="replace") + d.proc.err_path.read_text(errors="replace")
    lines = log.count("refused an HTTP client in the TLS handshake")
    report(f"ctl refused: attempts {attempts} (curl: {bool(curl)}); dnsd counted {got}; "
           f"handshakes accepted {int(d.metrics().get('gpuha_dnsd_http_tls_handshakes_total', 0))}; log lines {lines} (rate-limited)")
    assert 1 <= lines <= 2, f"refusals logged {lines} times in a few seconds (one line per 10 s)"


def test_wrong_credentials_fail_open(stack, tmp_path):
    dirs = pki(tmp_path)
    d = start_dnsd(stack, write_config(stack, dirs["dnsd"]), tls_context(dirs["a"] / "ca.crt", dirs["a"]))
    ws = [stack.start_worker(f"w{i}") for i in (1, 2)]
    stack.wait_fresh([w.id for w in ws])
    want = {w.addr for w in ws}
    # Router 1: static workers, a client certificate of CA b (dnsd trusts only a).
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    shutil.copyfile(dirs["a"] / "ca.crt", stranger / "ca.crt")
    for f in ("client.crt", "client.key"):
        shutil.copyfile(dirs["b"] / f, stranger / f)
    static = router(stack, "static", stranger, eds=False, workers=ws)
    # Router 2: EDS, good credentials at first.
    eds = router(stack, "eds", dirs["router"], eds=True)
    wait_for(lambda: set(eds.host_stats("gpuha_workers")) >= want, 10, "both workers in the EDS router's cluster")
    warm_up(stack, eds)
    # The EDS router's CA replaced by CA b's (a botched rotation), and dnsd restarted: its new
    # connections cannot verify dnsd.
    atomic_copy(dirs["b"] / "ca.crt", dirs["router"] / "ca.crt")
    d = restart_dnsd(stack, d)
    clients = {e.name: make_client(e.base_url) for e in (static, eds)}
    with Load(clients["static"], 2, stream=False) as l1, Load(clients["eds"], 2, stream=False) as l2:
        wait_for(lambda: "fleet poll failed" in envoy_log(stack, "eds") and "fleet poll failed" in envoy_log(stack, "static"), 20,
                 "both pickers logging failed fleet polls")
        wait_for(lambda: len(l1.outcomes) >= 30 and len(l2.outcomes) >= 30, 30, "30 requests through each router")
    ssl_static = static.stats(r"^cluster\.gpuha_fleet\.(ssl\.|upstream_cx_connect_fail|upstream_rq_503)")
    ssl_eds = eds.stats(r"^cluster\.gpuha_fleet\.(ssl\.|upstream_cx_connect_fail|upstream_rq_503)")
    eds_fail = eds.stats(r"^cluster\.gpuha_workers\.update_(failure|success)$")
    why = {n: next((ln for ln in envoy_log(stack, n).splitlines() if "fleet poll failed" in ln), "")[-260:] for n in ("static", "eds")}
    refused = d.refused()
    report(f"ctl wrong credentials: static router {len(l1.outcomes)} requests {summarize(l1.outcomes)}, "
           f"EDS router {len(l2.outcomes)} requests {summarize(l2.outcomes)}, EDS members {sorted(eds.host_stats('gpuha_workers'))}; "
           f"dnsd refused {refused}; Envoy gpuha_fleet stats static {ssl_static}, eds {ssl_eds}, EDS {eds_fail}; "
           f"picker logs: static «{why['static']}» eds «{why['eds']}»")
    errors = [o.describe() for o in l1.outcomes + l2.outcomes if o.kind != "completed"]
    assert not errors, "client errors:\n" + "\n".join(errors[:10])
    assert set(eds.host_stats("gpuha_workers")) >= want, "the EDS router lost its last membership"
    assert refused.get("bad_certificate", 0) >= 1, f"dnsd did not count the stranger's certificate: {refused}"
    assert sum(v for k, v in ssl_eds.items() if "fail_verify" in k or "connection_error" in k) >= 1, ssl_eds
    assert all(why.values()), why


def test_rotation_during_traffic(stack, tmp_path):
    dirs = pki(tmp_path)
    d = start_dnsd(stack, write_config(stack, dirs["dnsd"]), tls_context(dirs["a"] / "ca.crt", dirs["a"]))
    ws = [stack.start_worker(f"w{i}") for i in (1, 2)]
    stack.wait_fresh([w.id for w in ws])
    want = {w.addr for w in ws}
    envoy = router(stack, "envoy", dirs["router"], eds=True)
    wait_for(lambda: set(envoy.host_stats("gpuha_workers")) >= want, 10, "both workers in the cluster")
    warm_up(stack, envoy)
    envoy_pid, dnsd_pid = envoy.proc.pid, d.proc.pid
    bundle = tmp_path / "both.crt"
    bundle.write_text((dirs["a"] / "ca.crt").read_text() + (dirs["b"] / "ca.crt").read_text())

    def serials() -> set[str]:
        status, body = harness.http_get(f"http://{envoy.admin}/certs")
        return {c.get("serial_number", "") for cert in json.loads(body).get("certificates", []) for c in cert.get("cert_chain", []) + cert.get("ca_cert", [])}

    def serial_of(path: Path) -> str:
        out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(path)], capture_output=True, text=True, check=True).stdout
        return out.strip().split("=", 1)[1].lower()

    def reload_dnsd(how: str) -> None:
        reloads = d.metrics().get('gpuha_dnsd_config_reloads_total{result="ok"}', 0)
        if how == "sighup":
            os.kill(d.proc.pid, signal.SIGHUP)
        else:
            status, _, body = _post_reload(d)
            assert status == 200, body
        wait_for(lambda: d.metrics().get('gpuha_dnsd_config_reloads_total{result="ok"}', 0) > reloads, 5, f"dnsd reload ({how})")

    steps = []
    with Load(make_client(envoy.base_url), 3, stream=False) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 20, "20 requests before the rotation")
        # 1. Trust both CAs on both sides.
        atomic_copy(bundle, dirs["dnsd"] / "client-ca.crt")
        reload_dnsd("sighup")
        atomic_copy(bundle, dirs["router"] / "ca.crt")
        b_ca = serial_of(dirs["b"] / "ca.crt")
        wait_for(lambda: b_ca in serials(), 10, "Envoy trusting CA b (SDS)")
        steps.append(("trust both", len(load.outcomes)))
        # 2. New certificates from CA b on both sides.
        for f in ("dnsd.crt", "dnsd.key"):
            atomic_copy(dirs["b"] / f, dirs["dnsd"] / f)
        reload_dnsd("post")
        d.ctx = tls_context(bundle, dirs["b"])
        for f in ("client.key", "client.crt"):
            atomic_copy(dirs["b"] / f, dirs["router"] / f)
        b_client = serial_of(dirs["b"] / "client.crt")
        wait_for(lambda: b_client in serials(), 10, "Envoy presenting CA b's client certificate (SDS)")
        steps.append(("new certificates", len(load.outcomes)))
        # 3. Trust only CA b.
        atomic_copy(dirs["b"] / "ca.crt", dirs["dnsd"] / "client-ca.crt")
        reload_dnsd("sighup")
        atomic_copy(dirs["b"] / "ca.crt", dirs["router"] / "ca.crt")
        a_ca = serial_of(dirs["a"] / "ca.crt")
        wait_for(lambda: a_ca not in serials(), 10, "Envoy no longer trusting CA a (SDS)")
        d.ctx = tls_context(dirs["b"] / "ca.crt", dirs["b"])
        steps.append(("only the new CA", len(load.outcomes)))
        polls = harness.filter_stat(envoy, "fleet_polls")
        wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= polls + 3, 10, "fleet polls after the rotation")
        rotated_at = len(load.outcomes)
        wait_for(lambda: len(load.outcomes) >= rotated_at + 20, 20, "20 requests after the rotation")
    fresh_after = stack.fresh_ids()
    # Nothing of CA a left: a restarted dnsd (new connections from Envoy) still serves the router.
    handshakes = d.metrics().get("gpuha_dnsd_http_tls_handshakes_total", 0)
    refused_before = d.refused()
    rotated_pid = d.proc.pid
    d = restart_dnsd(stack, d)
    fails = harness.filter_stat(envoy, "fleet_poll_failures")
    polls = harness.filter_stat(envoy, "fleet_polls")
    wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= polls + 3 and d.metrics().get("gpuha_dnsd_http_tls_handshakes_total", 0) >= 1,
             15, "Envoy polling the restarted dnsd with the new certificates")
    # The restarted dnsd answers the router's EDS polls: 200 with the membership, or 304 while the
    # router already holds that version (Envoy counts no update for a 304).
    def eds_answers() -> float:
        m = d.metrics()
        return m.get('gpuha_dnsd_eds_requests_total{result="ok"}', 0) + m.get('gpuha_dnsd_eds_requests_total{result="not_modified"}', 0)

    wait_for(lambda: eds_answers() >= 3, 15, "EDS answers from the restarted dnsd")
    refused_after = d.refused()
    report(f"ctl rotation: {len(load.outcomes)} requests {summarize(load.outcomes)}; steps (requests so far) {steps}; "
           f"fresh workers after {sorted(fresh_after)}; dnsd handshakes before the restart {int(handshakes)}, refused {refused_before}; "
           f"after the restart: handshakes {int(d.metrics().get('gpuha_dnsd_http_tls_handshakes_total', 0))}, refused {refused_after}, "
           f"picker poll failures during the restart {harness.filter_stat(envoy, 'fleet_poll_failures') - fails}; "
           f"Envoy pid unchanged {envoy.proc.pid == envoy_pid}, dnsd pid unchanged through the rotation {rotated_pid == dnsd_pid}")
    errors = [o.describe() for o in load.outcomes if o.kind != "completed"]
    assert not errors, "client errors:\n" + "\n".join(errors[:10])
    assert {w.id for w in ws} <= fresh_after, f"fleet view not fresh after the rotation: {fresh_after}"
    assert sum(refused_before.get(k, 0) for k in ("no_certificate", "bad_certificate", "client_alert")) == 0, refused_before
    assert sum(refused_after.get(k, 0) for k in ("no_certificate", "bad_certificate", "client_alert")) == 0, refused_after
    assert envoy.proc.alive() and envoy.proc.pid == envoy_pid
    assert rotated_pid == dnsd_pid, "dnsd restarted during the rotation"


def _post_reload(d: TlsDnsd) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"https://{d.http}/v1/admin/reload", data=b"", method="POST", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=d.ctx))
    try:
        with opener.open(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
