"""One child process in its own process group (so a kill reaches whatever it spawned), logging
to files, and what /proc says about process groups (for servers that fork, like vLLM)."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from .env import START_TIMEOUT_S
from .wait import wait_for


class Proc:
    """One child process in its own process group, logging to `<logdir>/<name>.{out,err}`."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: Optional[dict] = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        # Append: a restarted process (same name) keeps its earlier log above the new one.
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            header = f"==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode()
            err.write(header)
            err.flush()
            self._out_offset = out.tell()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        # A new session makes the child the leader of its own process group.
        self.pgid = self.popen.pid
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stdout_text(self) -> str:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self._out_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_line(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        """Waits until a stdout line (of this run) matches `pattern`; fails fast if it exits."""
        rx = re.compile(pattern, re.M)

        def check():
            m = rx.search(self.stdout_text())
            if m:
                return m
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before printing /{pattern}/:\n{self.tail()}")
            return None

        return wait_for(check, timeout, f"{self.name} to print /{pattern}/")

    def signal(self, sig: int) -> None:
        """Sends `sig` to the whole process group (the process and anything it spawned)."""
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill9(self, timeout: float = 5.0) -> None:
        """SIGKILL to the group, then reap the process (so its ports are really released)."""
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) survived SIGKILL for {timeout}s")

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    def terminate(self, grace: float = 3.0) -> None:
        """SIGTERM (after SIGCONT, or a stopped process never sees it), SIGKILL after `grace`."""
        if not self.alive():
            # Still kill the group: a child it spawned may outlive it.
            self.signal(signal.SIGKILL)
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 40) -> str:
        parts = []
        for p in (self.out_path, self.err_path):
            try:
                text = p.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if text:
                parts.append(f"---- {p.name} (last {min(lines, len(text))} of {len(text)} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) if parts else f"---- {self.name}: no output"


# --------------------------------------------------------------------------------------------
# /proc: process groups and their members (servers that fork, like vLLM)


def _stat_fields(pid: int) -> Optional[list[str]]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces: split after the last ')'.
    rest = raw[raw.rfind(")") + 2:].split()
    return rest  # rest[0] = state, rest[1] = ppid, rest[2] = pgrp


def proc_state(pid: int) -> Optional[str]:
    f = _stat_fields(pid)
    return f[0] if f else None


def proc_ppid(pid: int) -> Optional[int]:
    f = _stat_fields(pid)
    return int(f[1]) if f else None


def group_pids(pgid: int, include_zombies: bool = True) -> list[int]:
    """Every process whose process group is `pgid` (zombies included unless told not to)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = _stat_fields(int(d))
        if f and int(f[2]) == pgid and (include_zombies or f[0] != "Z"):
            out.append(int(d))
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0



PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Makes orphaned descendants of this process re-parent to it (Linux prctl). Returns success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap(pids: list[int]) -> None:
    """Collects exit statuses of those `pids` that are our children (re-parented orphans)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
