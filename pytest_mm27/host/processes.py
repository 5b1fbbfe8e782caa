"""The processes of the servers we boot: which they are, signalling them, waiting until they are gone.

Each server is a child in its own session, so its process group and session
hold it and what it spawns, unless a descendant leaves them with setsid();
a :class:`Family` therefore also remembers every descendant it has seen, by
pid and creation time, which a reused pid cannot match. A zombie (exited,
not yet reaped) holds no memory and no GPU: it is never counted alive. Our
own children stay unreaped until teardown has checked their groups are
empty (:func:`exit_status` looks without reaping), so their pids, and with
them the group ids, cannot be reused meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = [
    "Family",
    "ProcInfo",
    "describe",
    "exit_status",
    "exit_text",
    "process_table",
    "processes_under",
    "wait_gone",
]

WAIT_POLL_S = 0.05
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    created: float                  # creation time: (pid, created) is unique
    alive: bool                     # False for a zombie


def process_table() -> dict[int, ProcInfo]:
    """Every process on the host now, by pid (one that exits while we look is left out)."""
    table = {}
    # Fresh Process objects, not process_iter(): its cache keeps the creation
    # time of a pid that was reused between two calls, the one case the
    # creation time is here to catch.
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                ppid, status = proc.ppid(), proc.status()
            table[pid] = ProcInfo(pid, ppid, os.getpgid(pid), os.getsid(pid), proc.create_time(),
                                  status not in _GONE)
        except (psutil.Error, OSError):
            continue
    return table


class Family:
    """One server's processes: its group, its session, and every descendant ever seen."""

    def __init__(self, root: int):
        self.root = root
        self._seen: dict[int, float] = {}         # pid -> creation time

    def _ours(self, proc: ProcInfo) -> bool:
        return self.root in (proc.pgid, proc.sid) or self._seen.get(proc.pid) == proc.created

    def remember(self, table: Mapping[int, ProcInfo] | None = None) -> None:
        """Record the group, the session and every descendant, even ones that setsid()."""
        table = table if table is not None else process_table()
        children: dict[int, list[int]] = {}
        for proc in table.values():
            children.setdefault(proc.ppid, []).append(proc.pid)
        # From every member still there: a grandchild whose parent died was
        # re-parented away from the root, but it is still a descendant of a member.
        stack = [pid for pid, proc in table.items() if self._ours(proc)] + [self.root]
        visited: set[int] = set()
        while stack:
            pid = stack.pop()
            if pid in visited:
                continue
            visited.add(pid)
            if pid in table:
                self._seen[pid] = table[pid].created
            stack.extend(children.get(pid, ()))

    def alive(self, table: Mapping[int, ProcInfo]) -> list[int]:
        """Pids of the live (not zombie) members in ``table``."""
        return [proc.pid for proc in table.values() if proc.alive and self._ours(proc)]

    def signal(self, sig: int, table: Mapping[int, ProcInfo]) -> None:
        """Send ``sig`` to the whole group and to every live member that left it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.root, sig)
        for pid in self.alive(table):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def wait_gone(families: Sequence[Family], until: float) -> list[Family]:
    """The families with live processes left at ``until`` (or sooner, once none has)."""
    while True:
        table = process_table()
        left = [family for family in families if family.alive(table)]
        if not left or time.monotonic() >= until:
            return left
        time.sleep(WAIT_POLL_S)


def describe(pid: int) -> str:
    """``pid N (command line)``, for a report of what was left running."""
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        cmdline = ""
    return f"pid {pid} ({cmdline.strip()[:200] or '?'})"


def processes_under(path: Path) -> list[str]:
    """Live processes whose working folder is ``path`` or below: what a run started there left.

    Tests and the fault suite use it to prove teardown left nothing running.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["cwd", "cmdline", "status"]):
        cwd = proc.info["cwd"]
        if proc.pid == me or cwd is None or proc.info["status"] in _GONE:
            continue
        if cwd == str(path) or cwd.startswith(str(path) + os.sep):
            found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or ()).strip()[:160]}")
    return found


def exit_status(popen: subprocess.Popen[bytes]) -> int | None:
    """The child's exit status without reaping it (Popen style: -N for signal N).

    The zombie keeps its pid, and so its process group id, reserved until
    teardown has verified the group is empty; a reused pid can then never be
    mistaken for one of ours.
    """
    if popen.returncode is not None:
        return popen.returncode
    try:
        info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return popen.poll()
    if info is None or info.si_pid == 0:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
