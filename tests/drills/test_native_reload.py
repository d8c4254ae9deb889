"""Config reload drill for the native filter (`native/`, GPUHA_FILTER_BUILD=native): a router
whose listener comes over LDS (from a watched file, as a control plane would push it) is
reloaded several times under traffic. Each reload makes Envoy destroy the old listener's picker
configuration; the module must delete that configuration's root contexts on every thread, as
Envoy's Wasm host deletes a removed plugin's root context in each VM. Before this, each reload
left every thread's old root behind, with what it holds (the fleet ranking: about a megabyte
per thread for a 10 k-worker fleet).

    GPUHA_FILTER_BUILD=native GPUHA_BIN_DIR=target/release python3 -m pytest -q -s tests/drills/test_native_reload.py
"""

from __future__ import annotations

import re
import socket
import threading

import pytest
import yaml

from gpuha_harness import filter_stat, free_port, make_client, tail_file, wait_for, wasm_path
from gpuha_harness.env import filter_build

RELOADS = 4
DELETED = re.compile(r"gpuha native: (\d+) root context\(s\) of removed filter configurations deleted")

pytestmark = pytest.mark.skipif(filter_build() != "native", reason="native module drill: tests/run.sh runs it in its native step")


def lds_world(text: str, lds_path, node: str) -> tuple[str, dict]:
    """The rendered bootstrap with its listener moved to an LDS file; (bootstrap, listener)."""
    boot = yaml.safe_load(text)
    (listener,) = boot["static_resources"].pop("listeners")
    boot["node"] = {"id": node, "cluster": node}
    boot["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
        "path": str(lds_path), "watched_directory": {"path": str(lds_path.parent)}}}}
    return yaml.safe_dump(boot), listener


def write_lds(lds_path, listener: dict, version: int) -> None:
    """The listener with a changed stat prefix (a new filter chain: Envoy builds its filters'
    configurations anew), moved into place at once (Envoy watches the directory)."""
    listener = yaml.safe_load(yaml.safe_dump(listener))
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            if f["name"].endswith("http_connection_manager"):
                f["typed_config"]["stat_prefix"] = f"ingress_v{version}"
    tmp = lds_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}]}))
    tmp.rename(lds_path)


def lds_router(stack, name: str, fleet: str, **render):
    """A pool router of the stack's workers polling `fleet`, its listener over LDS (version 0
    written); `(envoy, lds_path, listener)`. One worker thread: every request, and so every root of
    every configuration, is on it. (With more, a thread whose connections all moved elsewhere keeps
    its old roots until it next gets a request, and which thread gets the next connection is the
    kernel's choice.)"""
    port = free_port()
    rendered = stack.render("pool-router", stack.logdir / f"{name}-static.yaml", listen_port=port, admin_port=0,
                            workers=",".join(w.addr for w in stack.workers.values()), fleet=fleet, wasm=wasm_path(), **render)
    lds_dir = stack.logdir / f"lds-{name}"
    lds_dir.mkdir(exist_ok=True)
    lds = lds_dir / "lds.yaml"
    boot, listener = lds_world(rendered.read_text(), lds, f"{name}-drill")
    write_lds(lds, listener, 0)
    cfg = stack.logdir / f"{name}.yaml"
    cfg.write_text(boot)
    envoy = stack.start_envoy(name, cfg, port, concurrency=1, extra_args=["--drain-time-s", "1", "--drain-strategy", "immediate"])
    return envoy, lds, listener


def test_reloads_leave_no_root_context_behind(stack):
    stack.start_dnsd()
    stack.start_workers(2, ttft_ms=5, tokens_per_s=0)
    envoy, lds, listener = lds_router(stack, "reload", stack.dnsd.http)
    log = stack.logdir / "reload.log"
    client = make_client(envoy.base_url)

    def chat_ok(n: int) -> None:
        for _ in range(n):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert r.choices[0].message.content, r

    def lds_updates() -> int:
        return envoy.stats("listener_manager.lds.update_success").get("listener_manager.lds.update_success", 0)

    def deleted() -> int:
        return sum(int(m.group(1)) for m in DELETED.finditer(log.read_text(errors="replace")))

    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    chat_ok(4)
    for v in range(1, RELOADS + 1):
        before = lds_updates()
        write_lds(lds, listener, v)
        wait_for(lambda: lds_updates() > before, 15, f"LDS update {v} taken")
        chat_ok(4)
    # Each reload destroys the previous listener's picker configuration once its connections
    # drained: the main thread's root of it goes at once, a worker thread's at its next request.
    def deleted_after_a_request(n: int):
        def check() -> bool:
            chat_ok(1)
            return deleted() >= n
        return check

    # The main thread's root of each removed configuration, and the worker thread's: it served
    # every configuration.
    wait_for(deleted_after_a_request(2 * RELOADS), 30, f"the main and worker threads' roots of {RELOADS} removed configurations deleted",
             interval=0.2)
    assert deleted() == 2 * RELOADS, "a root deleted twice, or one of the configuration still in use deleted"
    assert filter_stat(envoy, "fail_open") == 0, "the picker failed open across reloads"
    print(f"\nreloads {RELOADS}: {deleted()} root contexts of removed configurations deleted (main thread and worker threads)")


class SilentServer:
    """A fleet endpoint that takes connections and never answers: every fleet poll stays in
    flight until its timeout, as with a dnsd that hangs or a path that drops packets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(timeout=5)


def test_a_reload_with_a_fleet_poll_in_flight_does_not_abort_envoy(stack):
    """Each configuration numbered its fleet polls from 1, and the SDK keeps one table of the
    calls in flight for all of them on the main thread: a configuration destroyed while its poll
    hung left that token there for good, and the new configuration's poll with the same number
    made the SDK panic, which aborts Envoy (the module is built with panic=abort)."""
    # No dnsd: the worker is named to Envoy directly, and the fleet view never comes.
    stack.start_worker("w1", ttft_ms=5, tokens_per_s=0, sidecar=False)
    fleet = SilentServer()
    try:
        envoy, lds, listener = lds_router(stack, "hung-fleet", fleet.addr, picker_config='{"poll_interval_ms": 100, "poll_timeout_ms": 300}')

        def polls() -> int:
            try:
                return filter_stat(envoy, "fleet_polls")
            except OSError:
                # Its admin gone: say how Envoy ended (before the fix: the SDK's "duplicate
                # token_id" panic, an abort).
                rc = envoy.proc.popen.wait(timeout=10)
                raise AssertionError(f"Envoy exited with {rc}:\n{tail_file(stack.logdir / 'hung-fleet.log', 12)}") from None

        def lds_updates() -> int:
            return envoy.stats("listener_manager.lds.update_success").get("listener_manager.lds.update_success", 0)

        # Reloads while a poll hangs: each old configuration goes with its poll in flight.
        for v in range(1, 4):
            wait_for(lambda: polls() >= 3 * v, 30, f"fleet poll {3 * v} started")
            before = lds_updates()
            write_lds(lds, listener, v)
            wait_for(lambda: lds_updates() > before, 15, f"LDS update {v} taken")
        at_reload = polls()
        # The last configuration's polls count up past every token an old one left behind.
        wait_for(lambda: polls() >= at_reload + 12, 60, "a dozen more fleet polls after the last reload")
        assert envoy.proc.alive()
        print(f"\nreloads with a poll in flight: 3; fleet polls {polls()}, Envoy still up")
    finally:
        fleet.close()

