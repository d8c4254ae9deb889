#!/usr/bin/env python3
"""Kill soak (issue 18): random workers die, hang and freeze under streaming load, over and over,
while dnsd is restarted and the frame key rotated; every request is judged on its own.

The whole stack runs on 127.0.0.1 through the one harness (gpuha_harness): fake
vLLM workers that die for real, one sidecar each (verbose, so the frames each sent are counted),
dnsd on fixed ports (a restart keeps them, so sidecars and Envoy keep their addresses), stock
Envoy with the pool-router config and the gpuha filter, and client threads that stream chat
completions through it with the official openai SDK (`max_retries=0`) from start to end.

Faults, one at a time on a random worker that dnsd shows alive, at most `--max-faulted` at once:

- `kill`: SIGKILL to the worker's process group; recovered by a restart on the same port.
- `hang`: fake-vllm's SIGUSR1 (the engine hangs, `/metrics` keeps answering with frozen numbers);
  recovered by SIGUSR1 again (resume) or by SIGKILL and a restart.
- `stop`: SIGSTOP to the worker's process group (the whole worker frozen, sockets open);
  recovered by SIGCONT or by SIGKILL and a restart.

A fault's recovery is done when dnsd's fleet view shows the worker fresh again. Between faults,
on a plan spread over the run: dnsd restarted (SIGTERM, started again on the same ports; the
picker fails open while it is down), and the frame key rotated in three steps: dnsd restarted
with the old and the new key, each sidecar restarted with the new key in turn (waiting until
dnsd accepts the new sidecar's frames), dnsd restarted with only the new key.

Judgment, request by request (times from one monotonic clock, faults from the event log):

- clean: completed, every token from one worker and numbered 0, 1, 2, ... (tokens name their
  worker: fake-vllm streams ` w3:0 w3:1 ...`);
- truncated: tokens from one worker, no finish, ended by a transport error or a bare end, and
  explained: a fault of that worker (the fault itself or the SIGKILL of its restart) happened
  after the request's first token reached the client less `TOKEN_IN_FLIGHT_S`, and before the
  request ended. Any other truncation fails the soak;
- error (no token): the router's OpenAI-shaped error after all attempts, or a transport error.
  The soak keeps at least `workers - max_faulted` workers alive at every moment, so a live worker
  could always have served it: every error is counted as avoidable and fails the soak;
- splice (two workers, or token numbers with a gap) or short (a clean end with the wrong token
  count): fails the soak.

Frames: per dnsd instance (phase), frames the sidecars sent while it ran, and what it received
(accepted and dropped, by reason, from its /metrics). Passing needs 0 `unknown_key` and 0
`bad_mac` drops in every phase, and every frame the soak lost sent while no dnsd was bound to
the ingest port (the restart window documented in the README's key-rotation section).

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 tests/soak/kill_soak.py --events 120 --seed 1 --results tests/soak/results/kill-soak.md

Prints one judged summary line and a table of per-event figures; exits 1 on any splice, short
answer, avoidable error, unexplained truncation, key drop, frame lost outside the restart window
or a recovery that did not happen.

(Over 500 lines on purpose: one standalone script: the fault schedule, the clients, dnsd restarts
and key rotations, and the request-by-request judge with its report.)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import openai  # noqa: E402

import gpuha_harness as harness  # noqa: E402
from gpuha_harness import Outcome, access_entries, chat, filter_stat, make_client  # noqa: E402
from gpuha_harness import is_transport_error, warm_up  # noqa: E402

# Attempts past the endpoint list the picker allows by default (gpuha_liveness::pick::
# DEFAULT_RETRIES_PAST_LIST): they go to workers the list does not name.
RETRIES_PAST_LIST = 2

# A token the worker sent before its fault may reach the client a little after it (Envoy, a
# loaded 2-core box): a truncation is explained by a fault up to this long before its first
# token arrived. Faults of one worker are seconds apart (down time plus a recovery to fresh).
TOKEN_IN_FLIGHT_S = 1.0
# The driver's poll interval: pacing of faults and recoveries, not a readiness wait.
TICK_S = 0.05


@dataclass
class Options:
    events: int = 120
    workers: int = 5
    clients: int = 8
    seed: Optional[int] = None
    max_faulted: int = 2
    down_s: tuple[float, float] = (1.0, 8.0)
    gap_s: tuple[float, float] = (0.5, 2.0)
    dnsd_restarts: int = 2
    rotations: int = 1
    tokens: tuple[int, int] = (8, 60)
    tokens_per_s: float = 40.0
    ttft_ms: int = 50
    interval_ms: int = 500
    recover_timeout_s: float = 20.0
    # A plain dnsd restart keeps it down this long: past the picker's 3 s stale_after_ms, so
    # the picker really fails open (Envoy's round robin over the static cluster, faulted workers
    # included) for about a second before dnsd answers again.
    dnsd_down_s: float = 4.0


@dataclass
class Fault:
    n: int
    kind: str  # kill | hang | stop
    worker: str
    addr: str
    down_s: float
    recovery: str  # restart | resume
    at: float = 0.0  # monotonic
    wall: float = 0.0
    restart_kill_at: Optional[float] = None
    recovered_at: Optional[float] = None
    fresh_at: Optional[float] = None
    # Filled in by the judgment.
    streaming: int = 0
    truncated: int = 0
    rerouted: int = 0


@dataclass
class Phase:
    """One dnsd instance: what the sidecars sent while it ran and what it received."""

    label: str
    keys: list[int]
    downtime_ms: float  # dnsd down before this instance was ready
    gap_sent: int  # frames the sidecars sent from the previous instance's last count to ours
    start: float
    sent_start: int
    frames_start: dict[str, int]
    sent_end: int = 0
    frames_end: dict[str, int] = field(default_factory=dict)
    end: float = 0.0

    @property
    def sent(self) -> int:
        return self.sent_end - self.sent_start

    @property
    def received(self) -> int:
        return sum(self.frames_end.values())

    def dropped(self, reason: str) -> int:
        return self.frames_end.get(reason, 0)


@dataclass
class Result:
    ok: bool
    summary: str
    table: str
    failures: list[str]
    figures: dict


class Soak:
    def __init__(self, stack: harness.Stack, opts: Options):
        self.stack = stack
        self.o = opts
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1, 2**31)
        self.rng = random.Random(self.seed)
        self.faults: list[Fault] = []
        self.notes: list[tuple[float, str]] = []  # maintenance log: (monotonic, text)
        self.phases: list[Phase] = []
        self.anomalies: list[str] = []
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.fleet: dict[str, dict] = {}
        self.key_id = 1
        self.key_files = {1: stack.key_file}
        self.busy: set[str] = set()  # workers a task owns (fault or sidecar restart)
        self.faulted: dict[str, Fault] = {}  # worker -> its fault until recovered
        self.t0 = 0.0
        self.plain_restarts = 0
        self.rotations = 0

    # ---- dnsd

    def dnsd_config(self, keys: list[int]) -> Path:
        path = self.stack.logdir / f"dnsd-keys-{'-'.join(map(str, keys))}.toml"
        lines = ["[ingest]", 'listen = "127.0.0.1:0"', "keys = ["]
        lines += [f'  {{ id = {k}, file = "{self.key_files[k]}" }},' for k in keys]
        lines += ["]", "", "[http]", 'listen = "127.0.0.1:0"', ""]
        path.write_text("\n".join(lines))
        return path

    def sent_total(self) -> int:
        return sum(w.frames_sent() for w in self.stack.workers.values())

    def begin_phase(self, label: str, keys: list[int], downtime_ms: float) -> None:
        sent = self.sent_total()
        prev = self.phases[-1] if self.phases else None
        self.phases.append(Phase(label=label, keys=keys, downtime_ms=downtime_ms,
                                 gap_sent=sent - prev.sent_end if prev else 0, start=time.monotonic(),
                                 sent_start=sent, frames_start=self.stack.dnsd.frames()))

    def end_phase(self) -> None:
        p = self.phases[-1]
        # Sidecars first, then dnsd: a frame counted as sent is then already in dnsd's counters.
        p.sent_end = self.sent_total()
        p.frames_end = self.stack.dnsd.frames()
        p.end = time.monotonic()

    def restart_dnsd(self, keys: list[int], label: str, down_s: float = 0.0) -> Iterator[None]:
        self.end_phase()
        down = time.monotonic()
        self.note(f"dnsd stopped ({label})")
        self.stack.dnsd.proc.terminate()
        self.fleet = {}
        yield from self.until(lambda: time.monotonic() >= down + down_s, down_s + 1, "dnsd's down time")
        d = self.stack.start_dnsd(ingest=self.ingest, http=self.http, config=self.dnsd_config(keys))
        assert (d.ingest, d.http) == (self.ingest, self.http), f"dnsd came back on {d.ingest}/{d.http}"
        ms = (time.monotonic() - down) * 1000
        self.note(f"dnsd ready again with keys {keys} after {ms:.0f} ms")
        self.begin_phase(label, keys, ms)

    def note(self, text: str) -> None:
        self.notes.append((time.monotonic(), text))

    # ---- the fleet as dnsd sees it

    def refresh_fleet(self) -> None:
        try:
            self.fleet = self.stack.fleet_workers()
        except (OSError, AssertionError, ValueError):
            self.fleet = {}

    def is_live(self, wid: str) -> bool:
        w = self.fleet.get(wid)
        return bool(w and w.get("fresh") and not w.get("stalled"))

    # ---- setup

    def setup(self) -> None:
        s = self.stack
        d = s.start_dnsd(config=self.dnsd_config([1]))
        self.ingest, self.http = d.ingest, d.http
        self.begin_phase("start: key 1", [1], 0.0)
        for i in range(self.o.workers):
            w = s.start_worker(f"w{i + 1}", ttft_ms=self.o.ttft_ms, tokens_per_s=self.o.tokens_per_s, sidecar=False)
            s.start_sidecar(w, interval_ms=self.o.interval_ms, verbose=True)
        s.wait_fresh(list(s.workers))
        self.envoy = self.start_envoy()
        warm_up(s, self.envoy)

    def start_envoy(self) -> harness.Envoy:
        """The shipped pool-router config, rendered as the drills do, with one field added at the end
        of its access-log line: the client's request number (`x-drill-request`), so each client
        error is matched to the endpoints and attempts Envoy gave it."""
        s = self.stack
        port = harness.free_port()
        access_log = s.logdir / "envoy.access.log"
        cfg = s.render("pool-router", s.logdir / "envoy.yaml", listen_port=port, admin_port=0,
                       workers=",".join(w.addr for w in s.workers.values()), fleet=s.dnsd.http,
                       wasm=harness.wasm_path(), access_log=access_log)
        text = cfg.read_text()
        assert text.count("dur_ms=%DURATION%") == 1, "the access-log format changed: update kill_soak.start_envoy"
        cfg.write_text(text.replace("dur_ms=%DURATION%", "dur_ms=%DURATION% req=%REQ(X-DRILL-REQUEST)%"))
        return s.start_envoy("envoy", cfg, port, access_log=access_log)

    # ---- tasks: generators advanced once per tick; a `yield` waits for the next tick

    def fault_task(self, f: Fault) -> Iterator[None]:
        w = self.stack.workers[f.worker]
        f.at, f.wall = time.monotonic(), time.time()
        if f.kind == "kill":
            w.proc.kill9()
        elif f.kind == "hang":
            before = _log_count(w, "engine hung")
            w.proc.signal(signal.SIGUSR1)
            yield from self.until(lambda: _log_count(w, "engine hung") > before, 5, f"{w.id} to log its hang")
        else:
            w.proc.stop()
        yield from self.until(lambda: time.monotonic() >= f.at + f.down_s, f.down_s + 1, "down time")
        if f.recovery == "restart":
            f.restart_kill_at = time.monotonic()
            self.stack.restart_worker(w)
        elif f.kind == "hang":
            before = _log_count(w, "engine resumed")
            w.proc.signal(signal.SIGUSR1)
            yield from self.until(lambda: _log_count(w, "engine resumed") > before, 5, f"{w.id} to log its resume")
        else:
            w.proc.cont()
        f.recovered_at = time.monotonic()
        yield from self.until(lambda: self.is_live(w.id), self.o.recover_timeout_s, f"{w.id} fresh again after {f.kind}")
        f.fresh_at = time.monotonic()
        del self.faulted[w.id]
        self.busy.discard(w.id)

    def restart_task(self) -> Iterator[None]:
        yield from self.restart_dnsd([self.key_id], f"restart: key {self.key_id}", self.o.dnsd_down_s)
        self.plain_restarts += 1
        yield

    def rotation_task(self) -> Iterator[None]:
        old, new = self.key_id, self.key_id + 1
        self.key_files[new] = self.stack.logdir / f"frame-{new}.key"
        self.key_files[new].write_bytes(os.urandom(32))
        yield from self.restart_dnsd([old, new], f"rotation {old}->{new}: dnsd holds both")
        for wid in sorted(self.stack.workers):
            # Wait for the worker to be free: a fault's recovery must not race our sidecar restart.
            yield from self.until(lambda: wid not in self.busy, 60, f"{wid} free for its sidecar restart")
            self.busy.add(wid)
            w = self.stack.workers[wid]
            old_boot = self.fleet.get(wid, {}).get("boot")
            w.sidecar.terminate()
            self.stack.start_sidecar(w, interval_ms=self.o.interval_ms, key_file=self.key_files[new], key_id=new, verbose=True)
            self.note(f"sidecar of {wid} restarted with key {new}")
            # dnsd accepts the new sidecar's frames: its boot id shows in the fleet view.
            yield from self.until(lambda: self.fleet.get(wid, {}).get("boot") not in (None, old_boot), 10,
                                  f"dnsd to accept {wid}'s frames signed with key {new}")
            self.busy.discard(wid)
        yield from self.restart_dnsd([new], f"rotation {old}->{new}: dnsd holds only key {new}")
        self.key_id = new
        self.rotations += 1
        yield

    def until(self, pred, timeout: float, what: str) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() >= deadline:
                self.anomalies.append(f"timed out after {timeout:.0f} s waiting for {what}")
                return
            yield

    # ---- load

    def client_loop(self, k: int, counter) -> None:
        rng = random.Random(f"{self.seed}-client-{k}")
        client = make_client(self.envoy.base_url, timeout=60)
        while not self.stop.is_set():
            o = chat(client, next(counter), rng.randint(*self.o.tokens))
            with self.lock:
                self.outcomes.append(o)

    # ---- the run

    def plan(self) -> list[tuple[int, str]]:
        """(fault index at which it starts, restart | rotation), spread evenly over the run."""
        kinds = []
        for i in range(max(self.o.dnsd_restarts, self.o.rotations)):
            if i < self.o.dnsd_restarts:
                kinds.append("restart")
            if i < self.o.rotations:
                kinds.append("rotation")
        n = len(kinds)
        return [(self.o.events * (i + 1) // (n + 1), k) for i, k in enumerate(kinds)]

    def run(self) -> Result:
        self.setup()
        self.t0 = time.monotonic()
        counter = itertools.count()
        clients = [threading.Thread(target=self.client_loop, args=(k, counter), daemon=True) for k in range(self.o.clients)]
        for t in clients:
            t.start()
        plan = self.plan()
        tasks: list[Iterator[None]] = []
        maintenance: Optional[Iterator[None]] = None
        started = 0
        next_fault = time.monotonic() + 1.0
        deadline = time.monotonic() + 60 + self.o.events * 12
        try:
            while started < self.o.events or tasks or plan or maintenance:
                if time.monotonic() > deadline:
                    self.anomalies.append(f"the soak ran past its deadline with {started} faults started")
                    break
                if self.stack.dnsd.proc.alive():
                    self.refresh_fleet()
                for t in list(tasks):
                    if next(t, StopIteration) is StopIteration:
                        tasks.remove(t)
                if maintenance is not None and next(maintenance, StopIteration) is StopIteration:
                    maintenance = None
                if maintenance is None and plan and plan[0][0] <= started:
                    _, kind = plan.pop(0)
                    maintenance = self.restart_task() if kind == "restart" else self.rotation_task()
                    next(maintenance, None)
                if started < self.o.events and time.monotonic() >= next_fault and len(self.faulted) < self.o.max_faulted:
                    # Not busy: never faulted, or faulted and seen fresh again since. Faults go on
                    # while dnsd is down (the picker then fails open).
                    healthy = sorted(w for w in self.stack.workers if w not in self.busy)
                    if healthy:
                        started += 1
                        wid = self.rng.choice(healthy)
                        kind = self.rng.choice(["kill", "hang", "stop"])
                        recovery = "restart" if kind == "kill" or self.rng.random() < 0.5 else "resume"
                        f = Fault(n=started, kind=kind, worker=wid, addr=self.stack.workers[wid].addr,
                                  down_s=round(self.rng.uniform(*self.o.down_s), 2), recovery=recovery)
                        self.faults.append(f)
                        self.faulted[wid] = f
                        self.busy.add(wid)
                        t = self.fault_task(f)
                        next(t, None)
                        tasks.append(t)
                        next_fault = time.monotonic() + self.rng.uniform(*self.o.gap_s)
                time.sleep(TICK_S)
        finally:
            self.stop.set()
            for t in clients:
                t.join(timeout=90)
            self.end_phase()
        self.wall_s = time.monotonic() - self.t0
        return self.judge()

    # ---- judgment

    def judge(self) -> Result:
        outcomes = sorted(self.outcomes, key=lambda o: o.idx)
        marks: dict[str, list[tuple[float, Fault]]] = {}
        for f in self.faults:
            marks.setdefault(f.worker, []).append((f.at, f))
            if f.restart_kill_at is not None:
                marks[f.worker].append((f.restart_kill_at, f))
        bad: list[str] = []
        kinds: dict[str, int] = {}
        errors = {"openai_error": 0, "transport": 0, "exhausted": 0}
        self.justified: list[str] = []
        entries = [e for e in access_entries(self.envoy) if e["path"].endswith("/chat/completions") and e["start"]]
        by_req = {}
        for line in self.envoy.access_log_entries():
            m = harness.ACCESS_RX.match(line)
            r = line.rsplit(" req=", 1)
            if m and len(r) == 2 and r[1].strip().isdigit():
                by_req[int(r[1])] = m.groupdict()
        for o in outcomes:
            k = o.kind
            kinds[k] = kinds.get(k, 0) + 1
            if k in ("splice", "short"):
                bad.append(f"{k}: {o.describe()}")
            elif k == "truncated":
                if o.error is not None and not is_transport_error(o.error):
                    bad.append(f"truncation surfaced as {type(o.error).__name__}: {o.describe()}")
                cause = [f for t, f in marks.get(o.worker, []) if o.first_token_at - TOKEN_IN_FLIGHT_S <= t <= o.ended]
                if cause:
                    cause[0].truncated += 1
                else:
                    kinds["unexplained"] = kinds.get("unexplained", 0) + 1
                    bad.append(f"truncated with no fault of {o.worker} between its first token "
                               f"(t={o.first_token_at - self.t0:.2f}) and its end (t={o.ended - self.t0:.2f}): {o.describe()}")
            elif k == "error":
                shaped = _openai_shaped(o.error)
                errors["openai_error" if shaped else "transport"] += 1
                why = self.exhausted(o, by_req.get(o.idx), shaped)
                if why.startswith("exhausted"):
                    errors["exhausted"] += 1
                    self.justified.append(f"#{o.idx} (t={o.started - self.t0:.2f}..{o.ended - self.t0:.2f}): {why}")
                else:
                    bad.append(f"avoidable error ({why}; t={o.started - self.t0:.2f}..{o.ended - self.t0:.2f}): {o.describe()}")
        for f in self.faults:
            f.streaming = sum(1 for o in outcomes if o.worker == f.worker and o.first_token_at is not None
                              and o.first_token_at <= f.at and o.ended >= f.at)
        for f in self.faults:
            until = f.wall + ((f.fresh_at or f.at) - f.at)
            f.rerouted = sum(1 for e in entries if f.wall <= e["start"] <= until and e["endpoints"]
                             and e["endpoints"][0] == f.addr and e["upstream"] != f.addr and e["code"] == "200")
        # Frames.
        frame_bad: list[str] = []
        for p in self.phases:
            for reason in ("unknown_key", "bad_mac"):
                if p.dropped(reason):
                    frame_bad.append(f"phase '{p.label}': {p.dropped(reason)} frames dropped as {reason}")
        sent = self.phases[-1].sent_end
        received = sum(p.received for p in self.phases)
        lost = sent - received
        window = sum(p.gap_sent for p in self.phases)
        if lost > window:
            frame_bad.append(f"{lost} frames lost, more than the {window} sent while dnsd restarted")
        failures = bad + frame_bad + self.anomalies
        fk = {k: sum(1 for f in self.faults if f.kind == k) for k in ("kill", "hang", "stop")}
        restarts = sum(1 for f in self.faults if f.recovery == "restart")
        n_restarts, n_rot = self.plain_restarts, self.rotations
        truncated = kinds.get("truncated", 0)
        st = {name: filter_stat(self.envoy, name) for name in
              ("picks", "fail_open", "stall_rescues", "stall_truncations", "breaker_trips", "panic_picks", "no_worker")}
        env = self.envoy.stats(r"^cluster\.gpuha_workers\.upstream_rq_(retry|retry_overflow|per_try_timeout)$")
        figures = dict(
            seed=self.seed, wall_s=round(self.wall_s, 1), faults=len(self.faults), fault_kinds=fk,
            worker_restarts=restarts, resumes=len(self.faults) - restarts, dnsd_restarts=len(self.phases) - 1,
            plain_dnsd_restarts=n_restarts, rotations=n_rot, requests=len(outcomes), kinds=kinds, errors=errors,
            frames_sent=sent, frames_received=received, frames_lost=lost, frames_sent_while_dnsd_down=window,
            streaming_at_fault=sum(f.streaming for f in self.faults), rerouted=sum(f.rerouted for f in self.faults),
            filter=st, envoy={k.rsplit(".", 1)[-1]: v for k, v in env.items()},
        )
        ok = not failures
        summary = (
            f"kill soak seed={self.seed}: {len(self.faults)} faults ({fk['kill']} SIGKILL, {fk['hang']} engine hang, "
            f"{fk['stop']} SIGSTOP; {restarts} restarts, {len(self.faults) - restarts} resumes), "
            f"{len(self.phases) - 1} dnsd restarts ({n_rot} key rotation{'s' if n_rot != 1 else ''}) in {self.wall_s:.0f} s; "
            f"{len(outcomes)} streams: {kinds.get('completed', 0)} clean, {truncated} truncated after a post-token fault "
            f"of their worker ({kinds.get('unexplained', 0)} unexplained), "
            f"{kinds.get('error', 0)} errors ({errors['openai_error']} OpenAI-shaped, {errors['transport']} transport; "
            f"{errors['exhausted']} after all attempts with every worker it could try faulted in flight, "
            f"{kinds.get('error', 0) - errors['exhausted']} avoidable), {kinds.get('splice', 0)} splices, {kinds.get('short', 0)} short; "
            f"{figures['streaming_at_fault']} streams mid-flight at a fault, {figures['rerouted']} first sent to a faulted "
            f"worker completed elsewhere; frames: {sent} sent, {lost} lost ({window} sent while dnsd restarted), "
            f"{sum(p.dropped('unknown_key') for p in self.phases)} unknown_key, {sum(p.dropped('bad_mac') for p in self.phases)} "
            f"bad_mac -> {'PASS' if ok else 'FAIL'}")
        figures["exhausted_errors"] = self.justified
        return Result(ok=ok, summary=summary, table=self.table(), failures=failures, figures=figures)

    def exhausted(self, o: Outcome, entry: Optional[dict], shaped: bool) -> str:
        """Why a client error happened, from its access-log line and the fault log: `exhausted ...`
        when the router used every attempt and each endpoint it was given was faulted while the
        request was in flight (a fault from before the pick counts: the 3 s gate had not seen it
        yet); anything else names what an honest retry could have done."""
        if entry is None:
            return "no access-log line: the request never got an answer from Envoy"
        if not shaped:
            return f"not an OpenAI-shaped error ({type(o.error).__name__}), code {entry['code']}"
        eps = [] if entry["endpoints"] in ("", "-") else entry["endpoints"].split(",")
        attempts = int(entry["attempts"]) if entry["attempts"].isdigit() else 0
        by_addr = {w.addr: w.id for w in self.stack.workers.values()}
        # The picker's attempts past the list (pick.retries_past_list, its default), on workers the
        # list does not name: which ones the log does not say, so every unlisted worker must have
        # faulted in flight for such an error to be one no honest retry could have avoided.
        unlisted = [a for a in by_addr if a not in eps]
        could = len(eps) + min(RETRIES_PAST_LIST, len(unlisted))
        if not eps or attempts < could:
            return (f"{attempts} attempts of the {could} it could make, for endpoints {eps or 'none (no pick)'}; "
                    f"code {entry['code']} flags={entry['flags']} upstream={entry['upstream']} details={entry.get('details')}")
        live = []
        faults = []
        for addr in eps + (unlisted if attempts > len(eps) else []):
            hit = [f for f in self.faults if f.addr == addr and f.at <= o.ended and (f.fresh_at or float("inf")) >= o.started]
            if hit:
                faults.append(f"{by_addr.get(addr, addr)} {hit[0].kind} at t={hit[0].at - self.t0:.2f}")
            else:
                live.append(by_addr.get(addr, addr))
        if live:
            return f"endpoint(s) {live} had no fault while it was in flight"
        return f"exhausted: {attempts} attempts, code {entry['code']}, every worker it could try faulted in flight ({'; '.join(faults)})"

    def table(self) -> str:
        rows = ["| # | t (s) | worker | fault | down (s) | recovery | fresh again after (s) | mid-stream at fault | truncated | first sent to it, completed elsewhere |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        items: list[tuple[float, str]] = []
        for f in self.faults:
            back = f"{f.fresh_at - f.at:.1f}" if f.fresh_at else "never"
            items.append((f.at, f"| {f.n} | {f.at - self.t0:.1f} | {f.worker} | {f.kind} | {f.down_s:.1f} | {f.recovery} | "
                                f"{back} | {f.streaming} | {f.truncated} | {f.rerouted} |"))
        for t, text in self.notes:
            items.append((t, f"| - | {t - self.t0:.1f} | dnsd | {text} | | | | | | |"))
        rows += [r for _, r in sorted(items, key=lambda x: x[0])]
        rows += ["", "| dnsd phase | keys | dnsd down before it (ms) | frames sent meanwhile | frames sent during it | received | accepted | unknown_key | bad_mac | other drops |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for p in self.phases:
            other = p.received - p.frames_end.get("accepted", 0) - p.dropped("unknown_key") - p.dropped("bad_mac")
            rows.append(f"| {p.label} | {','.join(map(str, p.keys))} | {p.downtime_ms:.0f} | {p.gap_sent} | {p.sent} | {p.received} | "
                        f"{p.frames_end.get('accepted', 0)} | {p.dropped('unknown_key')} | {p.dropped('bad_mac')} | {other} |")
        return "\n".join(rows)


def _log_count(w: harness.Worker, text: str) -> int:
    try:
        return w.proc.err_path.read_text(errors="replace").count(text)
    except OSError:
        return 0


def _openai_shaped(e: Optional[BaseException]) -> bool:
    """An HTTP error status whose body is an OpenAI error object (JSON, or an SSE error event)."""
    if not isinstance(e, openai.APIStatusError) or e.response is None:
        return False
    text = e.response.text
    for cand in [text] + [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]:
        try:
            body = json.loads(cand)
        except ValueError:
            continue
        if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
            return True
    return False


def results_markdown(res: Result, opts: Options, command: str) -> str:
    today = datetime.date.today().isoformat()
    f = res.figures
    lines = [
        f"# Kill soak, {today}",
        "",
        "Issue 18's soak: random workers killed (SIGKILL), hung (fake-vllm's SIGUSR1: the engine stops, "
        "`/metrics` keeps answering) and frozen (SIGSTOP of the worker's process group), recovered by a restart "
        "on the same port or a resume, under streaming load through stock Envoy (pool-router config, gpuha "
        "filter) with the official openai SDK; dnsd restarted on the same ports and the frame key rotated "
        "during it. Every request is judged on its own (tests/soak/kill_soak.py says how).",
        "",
        "Rerun (from the repository root, after the release and wasm builds):",
        "",
        "```",
        command,
        "```",
        "",
        f"Options: {opts.workers} workers ({opts.tokens_per_s:g} tokens/s, TTFT {opts.ttft_ms} ms), {opts.clients} streaming "
        f"clients ({opts.tokens[0]}-{opts.tokens[1]} tokens each), at most {opts.max_faulted} workers faulted at once, down "
        f"{opts.down_s[0]:g}-{opts.down_s[1]:g} s, {opts.gap_s[0]:g}-{opts.gap_s[1]:g} s between faults, sidecars every "
        f"{opts.interval_ms} ms; a plain dnsd restart keeps dnsd down {opts.dnsd_down_s:g} s. Machine: {os.cpu_count()} CPUs, shared.",
        "",
        "## Result",
        "",
        res.summary,
        "",
        f"- Requests: {f['requests']}, by kind {f['kinds']}; errors by shape {f['errors']}.",
        f"- Picker/guard counters: {f['filter']}; Envoy: {f['envoy']}.",
        f"- Frames: {f['frames_sent']} sent by the sidecars, {f['frames_received']} received by the dnsd instances, "
        f"{f['frames_lost']} lost, all of them in the restart windows ({f['frames_sent_while_dnsd_down']} frames sent "
        "between one instance's last count and the next one's first; some of those reached one of the two).",
        "",
    ]
    if f["exhausted_errors"]:
        lines += ["## Errors after all attempts", "",
                  "Each of these requests used all its attempts, and each worker it could try (the picker's endpoints, "
                  "and past the list every other worker) was killed, hung or frozen while it was in flight (a fault from "
                  "just before the pick counts: the 3 s gate had not seen it):",
                  ""] + [f"- {x}" for x in f["exhausted_errors"]] + [""]
    if res.failures:
        lines += ["## Failures", ""] + [f"- {x}" for x in res.failures[:50]] + [""]
    lines += ["## Per event", "", res.table, ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--events", type=int, default=d.events, help="faults to inject (kill, hang, stop)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent streaming clients")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: drawn and printed)")
    p.add_argument("--max-faulted", type=int, default=d.max_faulted, help="workers faulted at once at most")
    p.add_argument("--dnsd-restarts", type=int, default=d.dnsd_restarts, help="plain dnsd restarts")
    p.add_argument("--rotations", type=int, default=d.rotations, help="frame key rotations (each restarts dnsd twice)")
    p.add_argument("--down-s", type=float, nargs=2, default=d.down_s, metavar=("MIN", "MAX"), help="a fault lasts this long before its recovery")
    p.add_argument("--dnsd-down-s", type=float, default=d.dnsd_down_s, help="a plain dnsd restart keeps it down this long")
    p.add_argument("--results", type=Path, default=None, help="write a results markdown here")
    a = p.parse_args(argv)
    if a.max_faulted >= a.workers:
        p.error("--max-faulted must leave at least one worker alive")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    opts = Options(events=a.events, workers=a.workers, clients=a.clients, seed=a.seed, max_faulted=a.max_faulted,
                   dnsd_restarts=a.dnsd_restarts, rotations=a.rotations, down_s=tuple(a.down_s), dnsd_down_s=a.dnsd_down_s)
    with harness.Stack(name="kill-soak") as stack:
        soak = Soak(stack, opts)
        print(f"kill soak: seed {soak.seed}, logs in {stack.logdir}", flush=True)
        try:
            res = soak.run()
        except BaseException:
            stack.dump_logs()
            raise
        print(res.table)
        print(f"counters: picker/guard {res.figures['filter']}; envoy {res.figures['envoy']}")
        for x in res.figures["exhausted_errors"]:
            print(f"error after all attempts: {x}")
        for x in res.failures[:50]:
            print(f"FAIL: {x}")
        print(res.summary, flush=True)
        if a.results:
            cmd = " ".join(["python3", "tests/soak/kill_soak.py", *[shlex.quote(x) for x in argv if x]])
            if a.seed is None:
                cmd += f" --seed {soak.seed}"
            a.results.parent.mkdir(parents=True, exist_ok=True)
            a.results.write_text(results_markdown(res, opts, cmd))
        if not res.ok:
            stack.dump_logs(lines=20)
        return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
