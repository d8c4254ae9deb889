"""Runs N real vLLM servers (each in its own process group) with a gpuha-sidecar beside each.

    deploy/vllm/serve.sh up --n 2 --ingest 127.0.0.1:9100 --key-file k.key [--dnsd]
    deploy/vllm/serve.sh down --run-dir DIR

``up`` stays in the foreground as the supervisor: it starts every server in parallel, polls
``/health`` until each answers (deadline ``--start-timeout``), starts one sidecar per server,
prints ``READY v1=127.0.0.1:P1 v2=...`` and waits. SIGINT/SIGTERM (or a server exiting, with
``--exit-on-death``) ends it: every process group is killed (``kill -KILL -<pgid>``), every
orphan reaped, and the shared-memory files the servers held are removed. ``--dnsd`` also
starts a gpuha-dnsd (its ingest and HTTP ports are printed) so the sidecars have somewhere to
send; without it, ``--ingest`` and ``--key-file`` name an existing dnsd.

``down`` is for when the supervisor itself was SIGKILLed: it kills the process groups recorded in
``DIR/state.json`` (only those whose members still look like vLLM / gpuha processes, so a
recycled PID is never signalled) and removes the recorded shared-memory files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: gpuha_harness

from gpuha_harness import Dnsd, Stack, Worker, free_port  # noqa: E402
from gpuha_harness import vllm as vl  # noqa: E402


def up(a: argparse.Namespace) -> int:
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="gpuha-vllm-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    vl.become_subreaper()
    # The harness's Stack owns dnsd and the sidecars (each in its own process group, logs in
    # run_dir/NAME.out and .err); the vLLM servers are VllmServers beside it.
    stack = Stack(logdir=run_dir, name="serve")
    servers: list[vl.VllmServer] = []
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        if a.key_file:
            stack.key_file, stack.key_id = Path(a.key_file), a.key_id
        if a.dnsd:
            d = stack.start_dnsd()
            print(f"DNSD ingest={d.ingest} http={d.http}", flush=True)
        elif a.ingest:
            stack.dnsd = Dnsd(ingest=a.ingest, http="-", proc=None)  # type: ignore[arg-type]  (someone else's dnsd)
        else:
            raise SystemExit("serve.py up: --ingest (an existing dnsd) or --dnsd is required")
        ports = [int(p) for p in a.ports.split(",")] if a.ports else [free_port() for _ in range(a.n)]
        servers = [vl.VllmServer(name=f"v{i + 1}", port=p, model=Path(a.model), logdir=run_dir, venv=Path(a.venv))
                   for i, p in enumerate(ports)]
        t0 = time.monotonic()
        times = vl.start_parallel(servers, timeout=a.start_timeout)
        for srv in servers:
            w = Worker(id=srv.name, addr=srv.addr, proc=None, opts={})  # type: ignore[arg-type]  (a VllmServer)
            stack.workers[srv.name] = w
            stack.start_sidecar(w, pool=a.pool, interval_ms=a.interval_ms)
        vl.write_state(run_dir / "state.json", servers, {k: w.sidecar.popen for k, w in stack.workers.items()})
        print("START_S " + " ".join(f"{k}={v:.1f}" for k, v in times.items()) + f" wall={time.monotonic() - t0:.1f}",
              flush=True)
        print("READY " + " ".join(f"{s.name}={s.addr}" for s in servers) + f" run_dir={run_dir}", flush=True)
        while not stop.wait(0.5):
            dead = [s.name for s in servers if not s.alive()]
            if dead and a.exit_on_death:
                print(f"EXITED {','.join(dead)}", flush=True)
                return 1
        return 0
    finally:
        stack.close()
        for s in servers:
            try:
                s.kill_group()
            except Exception as e:  # noqa: BLE001 - report and go on cleaning the others
                print(f"serve.py: cleanup of {s.name}: {e}", file=sys.stderr)
        print("DOWN", flush=True)


def looks_ours(pid: int) -> bool:
    c = vl.cmdline(pid) + " " + vl.comm(pid)
    return any(k in c for k in ("vllm", "VLLM", "gpuha-sidecar", "gpuha-dnsd", "multiprocessing"))


def down(a: argparse.Namespace) -> int:
    state = json.loads((Path(a.run_dir) / "state.json").read_text())
    groups = [s["pgid"] for s in state["servers"]] + [s["pgid"] for s in state["sidecars"].values()]
    for pgid in groups:
        members = vl.group_pids(pgid, include_zombies=False)
        if members and all(looks_ours(p) for p in members):
            print(f"kill -KILL -{pgid} ({len(members)} processes)")
            os.killpg(pgid, signal.SIGKILL)
        elif members:
            print(f"group {pgid} no longer looks like ours ({[vl.comm(p) for p in members]}): left alone")
    for s in state["servers"]:
        for p in s.get("shm", []):
            try:
                os.unlink(p)
                print(f"removed {p}")
            except FileNotFoundError:
                pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--n", type=int, default=2)
    u.add_argument("--ports", help="comma-separated ports (default: free ports)")
    u.add_argument("--ingest", help="dnsd ingest ip:port")
    u.add_argument("--key-file")
    u.add_argument("--key-id", type=int, default=1)
    u.add_argument("--pool", default="p1")
    u.add_argument("--interval-ms", type=int, default=500)
    u.add_argument("--dnsd", action="store_true", help="also start a gpuha-dnsd")
    u.add_argument("--venv", default=str(vl.default_venv()))
    u.add_argument("--model", default=None)
    u.add_argument("--run-dir")
    u.add_argument("--start-timeout", type=float, default=240.0)
    u.add_argument("--exit-on-death", action="store_true")
    d = sub.add_parser("down")
    d.add_argument("--run-dir", required=True)
    a = ap.parse_args()
    if a.cmd == "up":
        a.model = a.model or str(vl.default_model(Path(a.venv)))
        return up(a)
    return down(a)


if __name__ == "__main__":
    sys.exit(main())
