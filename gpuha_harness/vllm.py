"""Starts and ends real vLLM OpenAI servers, each in its own process group, with nothing left over.

What this module owns (stdlib only, so `deploy/vllm/serve.py`, `capture.py`, the real-vLLM drills and
the bench all use it):

- `VllmServer`: one ``python -m vllm.entrypoints.openai.api_server`` started with ``setsid``
  (its own session, so its own process group: the API server, its EngineCore and any worker
  processes share one PGID). Readiness is polled on ``/health`` with a deadline, failing fast
  when the process exits. The whole group is killed with ``kill -KILL -<pgid>``.
- Process-tree facts read from ``/proc``: the members of a group, which one is the EngineCore
  (vLLM names it with setproctitle: ``VLLM::EngineCore``), their RSS.
- Shared memory: vLLM's multiprocessing leaves ``/dev/shm/psm_*`` (shared_memory segments) and
  ``/dev/shm/sem.mp-*`` (named semaphores) behind when its processes are killed. Their names do
  not say who made them, so the files are ATTRIBUTED by reading ``/proc/<pid>/maps`` and
  ``/proc/<pid>/fd`` of the group's processes while they live (at readiness and again right
  before a kill), and only attributed files are removed. A segment created and dropped between
  two looks can still be left behind; `stale_shm_files()` lists candidates not held open by any
  live process, for an operator to judge (they are never removed automatically, because another
  user's idle segment looks the same).
- Orphans: when only the API server dies, its children are re-parented. `become_subreaper()`
  makes the calling process their new parent, so that after the group kill they can be reaped
  (``waitpid``) instead of lingering as zombies under a PID 1 that may not reap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .env import REPO
# Re-exported: the real-vLLM drills read process groups through this module.
from .proc import become_subreaper, cmdline, comm, group_pids, proc_ppid, proc_state, reap, rss_bytes  # noqa: F401
from .wait import http_get


SERVED_MODEL = "tiny"
SERVE_FLAGS = ["--served-model-name", SERVED_MODEL, "--dtype", "bfloat16", "--max-model-len", "32768",
               "--max-num-seqs", "8", "--enforce-eager"]
# HF_HUB_OFFLINE: the model is a local directory; nothing may be fetched.
# VLLM_CPU_KVCACHE_SPACE=1: 1 GiB of KV cache per server (CPU build); ignored by the GPU build.
SERVE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
SHM_PREFIXES = ("psm_", "sem.mp-")


def default_venv() -> Path:
    return Path(os.environ.get("GPUHA_VLLM_VENV", REPO / ".venv-vllm"))


def default_model(venv: Optional[Path] = None) -> Path:
    return Path(os.environ.get("GPUHA_VLLM_MODEL", (venv or default_venv()) / "tiny-model"))


def vllm_build() -> str:
    return os.environ.get("GPUHA_VLLM_BUILD", "cpu")


# --------------------------------------------------------------------------------------------
def shm_files_of(pids: list[int]) -> set[str]:
    """`/dev/shm/psm_*` and `sem.mp-*` paths the processes map or hold open."""
    found: set[str] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                i = line.find("/dev/shm/")
                if i >= 0:
                    found.add(line[i:].removesuffix(" (deleted)").strip())
        except OSError:
            pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    t = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if t.startswith("/dev/shm/"):
                    found.add(t.removesuffix(" (deleted)"))
        except OSError:
            pass
    return {p for p in found if os.path.basename(p).startswith(SHM_PREFIXES)}


def shm_listing() -> list[str]:
    try:
        return [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)]
    except OSError:
        return []


def _ctime(p: str) -> float:
    try:
        return os.stat(p).st_ctime
    except OSError:
        return 0.0


def stale_shm_files() -> list[str]:
    """psm_/sem.mp- files in /dev/shm that no live process maps or holds open."""
    held = shm_files_of([int(d) for d in os.listdir("/proc") if d.isdigit()])
    out = []
    for name in sorted(os.listdir("/dev/shm")):
        p = f"/dev/shm/{name}"
        if name.startswith(SHM_PREFIXES) and p not in held:
            out.append(p)
    return out


PR_SET_CHILD_SUBREAPER = 36




# --------------------------------------------------------------------------------------------


@dataclass
class VllmServer:
    """One real vLLM API server on 127.0.0.1:`port`, in its own process group."""

    name: str
    port: int
    model: Path
    logdir: Path
    venv: Path = field(default_factory=default_venv)
    build: str = field(default_factory=vllm_build)
    extra_args: list[str] = field(default_factory=list)
    popen: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    ready_at: float = 0.0
    shm: set[str] = field(default_factory=set)
    shm_new: set[str] = field(default_factory=set)  # created while this server started (see start)
    killed_at: float = 0.0  # monotonic time of the last kill signal sent

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def pgid(self) -> int:
        # setsid makes the API server the leader of a new session and process group.
        return self.pid

    def argv(self) -> list[str]:
        a = [str(self.venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
             "--host", "127.0.0.1", "--port", str(self.port), *SERVE_FLAGS]
        if self.build == "gpu":
            # Several servers share one GPU in the drills: each takes a slice of its memory.
            a += ["--gpu-memory-utilization", os.environ.get("GPUHA_VLLM_GPU_MEM", "0.3")]
        return a + list(self.extra_args)

    def start(self) -> "VllmServer":
        """Spawns the server (returns at once; see `wait_ready`)."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.shm = set()
        # Some sem.mp-* files are created and closed during start-up by processes that are gone
        # at readiness: never seen mapped. Files that appear between start and readiness are
        # candidates; they are removed after the group kill only if no live process holds them.
        self._shm_before = set(shm_listing())
        self._start_wall = time.time()
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv())}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            self.popen = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env={**os.environ, **SERVE_ENV})
        self.started_at = time.monotonic()
        self.ready_at = 0.0
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def healthy(self) -> bool:
        try:
            return http_get(f"http://{self.addr}/health", timeout=1.0)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Polls /health until 200; fails at once if the server exits. Returns seconds since start."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.poll() if self.popen else None} "
                                   f"before /health answered:\n{self.log_tail()}")
            if self.healthy():
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.ready_at = time.monotonic()
        self.remember_shm()
        self.shm_new = {p for p in set(shm_listing()) - self._shm_before if _ctime(p) >= self._start_wall - 1}
        if self.build == "cpu":
            self.deprioritize_engine()
        return self.ready_at - self.started_at

    def deprioritize_engine(self) -> dict[int, int]:
        """CPU build: lowers the scheduling priority (nice, default +10,
        ``GPUHA_VLLM_ENGINE_NICE``) of every thread of every group member but the API server.

        On a GPU the engine's work runs on the device and the API server always has a core to
        answer ``/metrics`` and write the streams. On a small CPU box the EngineCore's compute
        threads take every core, so ``/metrics`` answers in seconds, the sidecar's scrapes time
        out and the worker looks dead while it serves (seen on 2 cores with 2 servers). With
        the engine niced the API server runs as soon as it has work, as on a GPU machine;
        vLLM's behaviour when it dies is unchanged. Returns {tid: nice} of what it changed."""
        nice = int(os.environ.get("GPUHA_VLLM_ENGINE_NICE", "10"))
        changed: dict[int, int] = {}
        for pid in self.members():
            if pid == self.pid:
                continue
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                    changed[tid] = nice
                except OSError:
                    pass  # the thread ended meanwhile
        return changed

    def members(self, include_zombies: bool = False) -> list[int]:
        return group_pids(self.pgid, include_zombies) if self.popen else []

    def stopped_members(self) -> list[int]:
        """Members stopped by a signal (state T: SIGSTOP), e.g. an engine a hang drill froze."""
        return [p for p in self.members() if proc_state(p) in ("T", "t")]

    def engine_core_pids(self) -> list[int]:
        """The EngineCore process(es): group members other than the API server whose title or
        command line names EngineCore (vLLM sets ``VLLM::EngineCore`` with setproctitle)."""
        return [p for p in self.members() if p != self.pid and ("EngineCore" in comm(p) or "EngineCore" in cmdline(p))]

    def rss(self) -> dict[int, int]:
        return {p: rss_bytes(p) for p in self.members()}

    def remember_shm(self) -> set[str]:
        self.shm |= shm_files_of(self.members())
        return self.shm

    def kill_api_server_only(self) -> None:
        """SIGKILL to the API server process alone: its engine processes become orphans."""
        self.remember_shm()
        self.killed_at = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    # 60 s: a SIGKILLed vLLM worker process can stay runnable for over 15 s while the kernel frees
    # its ~2 GB on a loaded 2-core host (seen 2026-11-29: `VLLM::Worker` in state R 15 s on).
    def kill_group(self, sig: int = signal.SIGKILL, timeout: float = 60.0, remember: bool = True) -> list[int]:
        """``kill -<sig> -<pgid>``; waits until no member of the group is left (reaping our
        children and re-parented orphans), then removes the group's shared-memory files.
        Returns the pids that were still in the group when the signal went out.
        `remember=False`: the caller called `remember_shm()` itself shortly before, because
        reading every member's /proc maps can take seconds on a loaded host and a drill's kill
        must go out at the instant it chose (the state it observed is gone seconds later)."""
        if self.popen is None:
            return []
        if remember:
            self.remember_shm()
        before = self.members(include_zombies=True)
        self.killed_at = time.monotonic()
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.popen.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            left = self.members(include_zombies=True)
            reap(left)
            left = self.members(include_zombies=True)
            if not left:
                break
            if time.monotonic() >= deadline:
                desc = ", ".join(f"{p}[{proc_state(p)}] {comm(p)}" for p in left)
                raise RuntimeError(f"{self.name}: group {self.pgid} still has {desc} {timeout:.0f}s after signal {sig}")
        self.cleanup_shm()
        return before

    def cleanup_shm(self) -> list[str]:
        """Removes the shared-memory files attributed to this server whose holders are gone."""
        removed = []
        if self.shm_new:
            held = shm_files_of([int(d) for d in os.listdir("/proc") if d.isdigit()])
            self.shm |= self.shm_new - held
            self.shm_new = set()
        for p in sorted(self.shm):
            try:
                os.unlink(p)
                removed.append(p)
            except FileNotFoundError:
                pass
            except OSError:
                pass
        self.shm = set()
        return removed

    def stop(self) -> None:
        """SIGTERM to the group (vLLM's own graceful shutdown), then SIGKILL after a grace."""
        if self.popen is None:
            return
        if self.alive():
            try:
                os.killpg(self.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "log_offset", 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        t = self.log_text().splitlines()
        return f"---- {self.log_path} (last {min(lines, len(t))} lines)\n" + "\n".join(t[-lines:])

    def describe(self) -> dict:
        return {"name": self.name, "addr": self.addr, "pid": self.pid, "pgid": self.pgid, "log": str(self.log_path),
                "members": {p: comm(p) for p in self.members()}}


def start_parallel(servers: list[VllmServer], timeout: float = 240.0) -> dict[str, float]:
    """Starts every server at once and waits for all of them: vLLM spends most of its ~35 s start
    importing and compiling, so N in parallel cost far less than N in a row. Returns start
    seconds per server. If one fails, all are killed and the error raised.

    GPU build: one after another. vLLM profiles free GPU memory while it starts and aborts
    ("Error in memory profiling") when another process on the same GPU frees memory meanwhile,
    which a second server starting beside it does."""
    sequential = any(s.build == "gpu" for s in servers)
    try:
        if sequential:
            return {s.name: s.start().wait_ready(timeout) for s in servers}
        for s in servers:
            s.start()
        return {s.name: s.wait_ready(timeout) for s in servers}
    except BaseException:
        for s in servers:
            try:
                s.kill_group()
            except Exception:  # noqa: BLE001 - best effort while failing
                pass
        raise


def write_state(path: Path, servers: list[VllmServer], sidecars: dict[str, subprocess.Popen]) -> None:
    state = {"servers": [s.describe() | {"shm": sorted(s.shm)} for s in servers],
             "sidecars": {k: {"pid": p.pid, "pgid": p.pid} for k, p in sidecars.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
