"""Host-wide leases of GPUs and CPU cores: two runs never boot servers on the same device.

A lease holds one file lock per device (``gpu0.lock``, ``cpu3.lock``) in a
lock folder every run on the host shares, so two pytest processes, or two
xdist workers running different topologies, get disjoint devices. The locks
are ``flock``s (through filelock), which the kernel drops when the holder
dies: a crashed run never leaves a stale lease. The holder writes who it is
into the lock file, so a run refused a device can say who has it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout

from ..errors import LaunchError
from .gpus import discover_gpus

__all__ = ["Lease", "LeaseKind", "default_lock_dir", "lease_devices", "lock_path"]

LeaseKind = Literal["gpu", "cpu"]

DEFAULT_LOCK_DIR = "/tmp/pytest-mm27-locks"


def default_lock_dir() -> Path:
    return Path(os.environ.get("MM27_LOCK_DIR", DEFAULT_LOCK_DIR))


def default_owner() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return f"{prog} pid {os.getpid()}" + (f" (xdist {worker})" if worker else "")


def lock_path(lock_dir: Path, kind: LeaseKind, device: int) -> Path:
    return lock_dir / f"{kind}{device}.lock"


class Lease:
    """Exclusive use of some devices (GPU indices or CPU cores) on this host.

    Use as a context manager or call :meth:`release`. A lease dropped
    without either is released when it is collected, and the kernel drops
    the locks if the process dies, so no lease outlives its holder.
    """

    def __init__(self, kind: LeaseKind, locks: dict[int, FileLock], lock_dir: Path, owner: str):
        self.kind = kind
        self.devices = tuple(locks)
        self.lock_dir = lock_dir
        self.owner = owner
        self._locks = locks

    @property
    def closed(self) -> bool:
        return not self._locks

    def release(self) -> None:
        locks, self._locks = self._locks, {}
        for lock in locks.values():
            # Still ours while we write: readers then see "free", not a stale holder.
            with contextlib.suppress(OSError):
                os.truncate(lock.lock_file, 0)
            lock.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.closed else "held"
        return f"Lease({self.kind}, {list(self.devices)}, {state})"


def _ensure_lock_dir(lock_dir: Path) -> None:
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"cannot create the lease folder {lock_dir}: {exc.strerror or exc} "
                          f"(set MM27_LOCK_DIR to a writable folder)") from None
    with contextlib.suppress(OSError):
        if lock_dir.stat().st_uid == os.getuid():
            os.chmod(lock_dir, 0o1777)      # shared between users, like /tmp


def _try_lock(path: Path, owner: str) -> FileLock | None:
    """The held lock, or None if someone else holds it."""
    record = json.dumps({"pid": os.getpid(), "owner": owner, "host": socket.gethostname(), "since": time.time()})

    def write_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)

    # preserve_lock_file: the file stays for the next holder (and the owner
    # record needs a real flock, never filelock's soft fallback, which a
    # crash would leave behind as a stale lease).
    lock = FileLock(path, mode=0o666, blocking=False, thread_local=False, preserve_lock_file=True,
                    on_acquired=write_holder)
    try:
        lock.acquire()
    except (Timeout, PermissionError):
        return None                 # held, or a lock file we may not use (see _read_holder)
    return lock


def _read_holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        data = {}
    holder = "unknown holder"
    if data:
        pid, owner = data.get("pid"), data.get("owner", "?")
        host = data.get("host")
        since = data.get("since")
        age = f", for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
        holder = f"{owner} (pid {pid}{' on ' + host if host else ''}{age})"
    with contextlib.suppress(OSError):
        # filelock refuses such a file even when it is free: in a sticky folder
        # its owner could replace it during our hold.
        uid = path.stat().st_uid
        if uid not in (os.geteuid(), path.parent.stat().st_uid):
            holder += f"; its lock file belongs to uid {uid}: only that account or the folder's owner may lock it"
    return holder


def _candidates(kind: LeaseKind) -> list[int]:
    if kind == "cpu":
        return sorted(os.sched_getaffinity(0))
    return [g.index for g in discover_gpus()]


def lease_devices(count: int, *, kind: LeaseKind = "gpu", lock_dir: Path | None = None, timeout_s: float = 0,
                  candidates: Sequence[int] | None = None, owner: str | None = None) -> Lease:
    """Lease ``count`` free devices of ``kind`` (first free ones, in order).

    ``candidates`` narrows the choice (default: visible GPUs, or the CPU
    cores in this process's affinity mask). Waits up to ``timeout_s`` for
    busy ones, then raises :class:`LaunchError` naming the busy devices and
    who holds them.
    """
    if kind not in ("gpu", "cpu"):
        raise ValueError(f"kind must be 'gpu' or 'cpu', not {kind!r}")
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    owner = owner or default_owner()
    pool = list(dict.fromkeys(int(c) for c in (candidates if candidates is not None else _candidates(kind))))
    noun = "GPU" if kind == "gpu" else "CPU core"
    if count <= 0:
        return Lease(kind, {}, lock_dir, owner)
    if count > len(pool):
        raise LaunchError(f"need {count} {noun}(s) but only {len(pool)} exist here: {pool}")
    _ensure_lock_dir(lock_dir)
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        locks: dict[int, FileLock] = {}
        busy: list[int] = []
        for dev in pool:
            lock = _try_lock(lock_path(lock_dir, kind, dev), owner)
            if lock is None:
                busy.append(dev)
                continue
            locks[dev] = lock
            if len(locks) == count:
                return Lease(kind, locks, lock_dir, owner)
        # Not enough: give back what we took so others can proceed.
        Lease(kind, locks, lock_dir, owner).release()
        if time.monotonic() >= deadline:
            holders = "\n  ".join(f"{noun} {d}: held by {_read_holder(lock_path(lock_dir, kind, d))}"
                                  for d in busy)
            waited = f" after waiting {timeout_s:g} s" if timeout_s > 0 else ""
            raise LaunchError(f"need {count} free {noun}(s) of {pool} but only {len(pool) - len(busy)} "
                              f"are free{waited}; busy:\n  {holders}\n(leases live in {lock_dir})")
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
