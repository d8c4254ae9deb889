"""Operators drain by hand, through dnsd's authenticated admin API, against stock Envoy:

  - a drained worker gets no new request from the Envoy picker, while the streams it was
    already serving finish whole (a drain never cuts a request);
  - a drained pool leaves the DNS answer at once, as `dig` sees it;
  - without the token nothing changes (401), and the change is in dnsd's metrics.

Stack: dnsd (DNS zone of two pools, admin token file), workers w1 and w2 in pool p1 behind one
pool-router Envoy, w3 in pool p2 (a second pool for the DNS answer).

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \
        python3 -m pytest -s tests/ops/test_admin_drain.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

import gpuha_harness as harness
import opsrig

TOKEN = "drill-admin-token-0123456789abcdef"
STREAM_TOKENS = 24  # at 8 tokens/s: a 3 s stream, long enough to drain under it


def admin(dnsd: harness.Dnsd, path: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    """One admin call, as the documented curl line makes it."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{dnsd.http}{path}", data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def dig(dnsd: harness.Dnsd) -> list[str]:
    host, port = dnsd.dns.rsplit(":", 1)
    out = subprocess.run(["dig", "+short", "+tries=1", "+time=2", f"@{host}", "-p", port, opsrig.SERVICE, "A"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def metric(dnsd: harness.Dnsd, sample: str) -> float:
    _, body = harness.http_get(f"http://{dnsd.http}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (Debian's dnsutils) is needed")
def test_drained_worker_gets_no_new_request_and_drained_pool_leaves_dns(stack):
    token_file = stack.logdir / "admin.token"
    token_file.write_text(TOKEN + "\n")
    cfg = opsrig.dnsd_config(stack)
    cfg.write_text(cfg.read_text() + f'\n[admin]\ntoken_file = "{token_file}"\nstate_file = "{stack.logdir / "admin_state.json"}"\n')
    dnsd = stack.start_dnsd(config=cfg)
    w1 = stack.start_worker("w1", pool="p1", ttft_ms=20, tokens_per_s=8)
    w2 = stack.start_worker("w2", pool="p1", ttft_ms=20, tokens_per_s=8)
    stack.start_worker("w3", pool="p2")
    stack.wait_fresh(["w1", "w2", "w3"])
    envoy = stack.start_pool_router(workers=[w1, w2], pool="p1")
    client = harness.make_client(envoy.base_url, timeout=30)
    assert dig(dnsd) == sorted(opsrig.POOLS.values())

    # Streams in flight on w1: start them one at a time until one is on w1 (the picker spreads).
    streams: list[harness.Outcome] = []
    threads: list[threading.Thread] = []
    on_w1 = threading.Event()

    def first_token(o: harness.Outcome) -> None:
        if o.worker == "w1":
            on_w1.set()

    for i in range(8):
        done = threading.Event()
        holder: list[harness.Outcome] = []

        def run(i=i, done=done, holder=holder):
            o = harness.chat(client, i, STREAM_TOKENS, stream=True,
                             on_first_token=lambda o: (holder.append(o), first_token(o), done.set()))
            if not holder:
                holder.append(o)
            streams.append(o)
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        assert done.wait(10), f"stream {i} never got its first token"
        if on_w1.is_set():
            break
    assert on_w1.is_set(), "no stream reached w1"

    # Refused without the token: nothing changes.
    status, body = admin(dnsd, "/v1/admin/workers/w1", {"state": "drain"}, token=None)
    assert status == 401, body
    assert not stack.fleet_workers()["w1"].get("drained")

    polls_before = harness.filter_stat(envoy, "fleet_polls")
    status, body = admin(dnsd, "/v1/admin/workers/w1", {"state": "drain", "reason": "drill"})
    assert status == 200 and body["changed"], body
    assert stack.fleet_workers()["w1"].get("drained") is True
    # The picker reads the view it polls: wait for polls dispatched after the drain to be answered.
    harness.wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= polls_before + 3, 10,
                     "three fleet polls after the drain")

    fresh = [harness.chat(client, 100 + i, 2, stream=False) for i in range(12)]
    bad = [o.describe() for o in fresh if o.kind != "completed"]
    assert not bad, bad
    assert harness.per_worker(fresh) == {"w2": 12}, harness.per_worker(fresh)

    for t in threads:
        t.join(30)
    on_w1_streams = [o for o in streams if o.worker == "w1"]
    assert on_w1_streams, [o.describe() for o in streams]
    unfinished = [o.describe() for o in streams if o.kind != "completed"]
    assert not unfinished, f"a drain cut a request in flight: {unfinished}"

    # A drained pool leaves the DNS answer at once.
    status, body = admin(dnsd, "/v1/admin/pools/p2", {"state": "drain"})
    assert status == 200 and body["now"]["answered"] is False, body
    assert dig(dnsd) == [opsrig.POOLS["p1"]]
    status, body = admin(dnsd, "/v1/admin")
    assert status == 200 and any(p["pool"] == "p2" and p["state"] == "drain" for p in body["pools"]), body
    assert metric(dnsd, 'gpuha_dnsd_admin_changes_total{target="worker",action="drain"}') == 1
    assert metric(dnsd, 'gpuha_dnsd_admin_changes_total{target="pool",action="drain"}') == 1
    assert metric(dnsd, 'gpuha_dnsd_admin_refused_total{reason="no_token"}') == 1
    assert metric(dnsd, 'gpuha_dnsd_pool_admin_state{pool="p2",state="drain"}') == 1
    saved = json.loads((stack.logdir / "admin_state.json").read_text())
    assert set(saved["workers"]) == {"w1"} and saved["pools"]["p2"]["state"] == "drain", saved
