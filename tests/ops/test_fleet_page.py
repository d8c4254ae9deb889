"""The fleet page dnsd serves at /fleet, in headless Chromium against a running stack (dnsd with
two pools, a fake vLLM worker and its sidecar in each): both workers shown alive and the DNS
answer holding both pools' routers; after w1's host is killed, w1 shown not fresh (silent),
pool p1 dead and out of the answer, and the eviction among the recent transitions. A screenshot
of each state is saved in the test's log dir (kept under GPUHA_DRILL_LOGS)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import gpuha_harness as harness
import opsrig

# The flags the page needs and nothing that reaches out: no sandbox (root in CI), no GPU, no
# background or component traffic, a fresh profile per run.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
# Virtual time: the page's first poll and a few more (it polls every second).
BUDGET_MS = 3000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if p := shutil.which(name):
            return p
    raise AssertionError("chromium not found: deploy/ensure-deps.sh installs it (Debian package chromium)")


def run_chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="gpuha-chromium-") as profile:
        argv = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={BUDGET_MS}", *args, url]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stderr[-2000:]}"
    return r


class Rows(HTMLParser):
    """The data-* attributes of the page's rows and body."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: dict[str, dict] = {}
        self.pools: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.events: list[str] = []
        self.body: dict = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if "data-worker" in a:
            self.workers[a["data-worker"]] = a
        if "data-pool" in a:
            self.pools[a["data-pool"]] = a
        if "data-service" in a:
            self.services[a["data-service"]] = a
        if "data-event" in a:
            self.events.append(a["data-event"])

    def handle_data(self, data):
        self.text.append(data)


def look(url: str, shot: Path) -> Rows:
    dom = run_chromium(url, "--dump-dom").stdout
    shot.with_suffix(".html").write_text(dom)
    run_chromium(url, "--window-size=1400,1000", f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot at {shot}"
    p = Rows()
    p.feed(dom)
    assert p.body.get("data-updated"), f"the page never rendered a poll:\n{dom[:3000]}"
    return p


def test_fleet_page_shows_a_killed_worker_not_fresh(stack) -> None:
    dnsd = opsrig.start(stack)
    url = f"http://{dnsd.http}/fleet"
    status, body = harness.http_get(url)
    assert status == 200 and b"<script>" in body
    assert b"src=" not in body and b"href=" not in body, "the page must need no external asset"
    assert harness.http_get(f"http://{dnsd.http}/")[1] == body

    t0 = time.monotonic()
    before = look(url, stack.logdir / "fleet-before.png")
    took = time.monotonic() - t0
    assert {w: (a["data-fresh"], a["data-state"]) for w, a in before.workers.items()} == {
        "w1": ("true", "alive"), "w2": ("true", "alive")}
    # Alive, or still in dnsd's 10 s cold start (answered all the same).
    assert {p: a["data-state"] in ("alive", "cold_start") for p, a in before.pools.items()} == {"p1": True, "p2": True}, before.pools
    assert before.services[opsrig.SERVICE]["data-failwhale"] == "false"
    assert sorted(before.services[opsrig.SERVICE]["data-answer"].split(",")) == sorted(opsrig.POOLS.values())

    opsrig.kill_host(stack.workers["w1"])
    killed = time.monotonic()
    stack.wait_stale(["w1"])
    harness.wait_for(lambda: opsrig.pool_state(dnsd, "p1") == "dead", 15, "pool p1 evicted")
    evicted = time.monotonic() - killed
    after = look(url, stack.logdir / "fleet-after-kill.png")
    w1, w2 = after.workers["w1"], after.workers["w2"]
    assert (w1["data-fresh"], w1["data-state"]) == ("false", "silent"), w1
    assert int(w1["data-age-ms"]) >= 3000, w1
    assert (w2["data-fresh"], w2["data-state"]) == ("true", "alive"), w2
    assert {p: a["data-state"] for p, a in after.pools.items()} == {"p1": "dead", "p2": "alive"}
    assert after.services[opsrig.SERVICE]["data-failwhale"] == "false"
    assert after.services[opsrig.SERVICE]["data-answer"] == opsrig.POOLS["p2"]
    assert "pool p1 evicted" in after.events, after.events
    print(f"\nfleet page: one look (dom + screenshot) {took:.1f}s; p1 evicted {evicted:.1f}s after the kill; "
          f"screenshots in {stack.logdir}")
