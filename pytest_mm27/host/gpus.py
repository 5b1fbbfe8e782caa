"""GPU discovery and host-wide device leases.

Discovery asks NVML (``pynvml`` from the nvidia-ml-py package, imported
lazily), else ``nvidia-smi``, else finds nothing. Indices are physical
(NVML / nvidia-smi order); ``CUDA_VISIBLE_DEVICES`` in our environment limits
which of them count as visible.

A lease holds one ``flock`` per device in a shared lock folder, so two
pytest processes on one host (or xdist workers running different
topologies) never boot servers on the same GPU or CPU core. The kernel drops
the locks when the holder dies, so a crashed run never leaves a stale lease.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import LaunchError

LeaseKind = Literal["gpu", "cpu"]

DEFAULT_LOCK_DIR = "/tmp/pytest-mm27-locks"
NVIDIA_SMI_FIELDS = "index,uuid,name,memory.total,memory.used,driver_version"
# More memory in use than this means a process holds the GPU (an idle one
# with a display or the driver's own context uses a few hundred MiB at most).
IN_USE_MB = 1024


@dataclass(frozen=True)
class GpuInfo:
    index: int                  # physical index (NVML / nvidia-smi order)
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int
    driver: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _visible_filter(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """Keep the GPUs ``CUDA_VISIBLE_DEVICES`` names, in its order."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return gpus
    out: list[GpuInfo] = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            idx = int(item)
            if idx < 0:
                break           # CUDA stops at the first invalid entry
            match = [g for g in gpus if g.index == idx]
        else:                   # UUID (prefix), as CUDA accepts
            match = [g for g in gpus if g.uuid.startswith(item)]
        if not match:
            break
        if match[0] not in out:
            out.append(match[0])
    return out


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _discover_nvml() -> list[GpuInfo] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None             # library present, no driver: nvidia-smi will say the same
    try:
        driver = _decode(pynvml.nvmlSystemGetDriverVersion())
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuInfo(index=i, uuid=_decode(pynvml.nvmlDeviceGetUUID(h)),
                               name=_decode(pynvml.nvmlDeviceGetName(h)),
                               memory_total_mb=int(mem.total // 2**20), memory_used_mb=int(mem.used // 2**20),
                               driver=driver))
        return out
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Rows of ``nvidia-smi --query-gpu=NVIDIA_SMI_FIELDS --format=csv,noheader,nounits``."""
    out = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 6:
            continue
        try:
            out.append(GpuInfo(index=int(cols[0]), uuid=cols[1], name=cols[2],
                               memory_total_mb=int(float(cols[3])), memory_used_mb=int(float(cols[4])),
                               driver=cols[5]))
        except ValueError:
            continue            # "[N/A]" and friends
    return out


def _discover_smi() -> list[GpuInfo] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        proc = subprocess.run([exe, f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader,nounits"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return parse_nvidia_smi(proc.stdout)


def discover_gpus() -> list[GpuInfo]:
    """The GPUs this process may use; [] where there are none (never raises)."""
    for probe in (_discover_nvml, _discover_smi):
        found = probe()
        if found is not None:
            return _visible_filter(found)
    return []


def _gpu_processes(uuid: str) -> list[str]:
    """Best effort: "pid name (N MiB)" of compute processes on one GPU."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        proc = subprocess.run([exe, "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                               "--format=csv,noheader,nounits"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in proc.stdout.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) == 4 and cols[0] == uuid:
            out.append(f"pid {cols[1]} {cols[2]} ({cols[3]} MiB)")
    return out


def check_free_memory(gpus: Iterable[int | GpuInfo], threshold_mb: int = IN_USE_MB) -> None:
    """Refuse GPUs that already have more than ``threshold_mb`` in use.

    Memory in use before we boot belongs to someone else (another run, an
    orphan of a crashed one); vLLM would fail later with an obscure OOM.
    """
    wanted = list(gpus)
    if not wanted:
        return
    current = {g.index: g for g in discover_gpus()}
    busy = []
    for item in wanted:
        idx = item.index if isinstance(item, GpuInfo) else int(item)
        info = current.get(idx, item if isinstance(item, GpuInfo) else None)
        if info is None or info.memory_used_mb <= threshold_mb:
            continue
        procs = _gpu_processes(info.uuid)
        who = f"; processes: {', '.join(procs)}" if procs else ""
        busy.append(f"GPU {idx} ({info.name}): {info.memory_used_mb} of {info.memory_total_mb} MiB in use{who}")
    if busy:
        raise LaunchError(f"GPU memory is already in use by someone else (more than {threshold_mb} MiB):\n  "
                          + "\n  ".join(busy)
                          + "\nFree them (an orphaned server from an earlier run?) or pick other GPUs.")


def memory_not_freed(gpus: Iterable[int], wait_s: float, threshold_mb: int = IN_USE_MB) -> dict[int, int]:
    """MiB in use on those of ``gpus`` that still hold more than ``threshold_mb`` after up to ``wait_s``.

    The driver frees a process's memory shortly after the process is gone,
    so a teardown waits a little before it calls memory left behind a leak.
    """
    wanted = set(gpus)
    deadline = time.monotonic() + wait_s
    while True:
        left = {g.index: g.memory_used_mb for g in discover_gpus()
                if g.index in wanted and g.memory_used_mb > threshold_mb}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


# --- leases ---------------------------------------------------------------

def default_lock_dir() -> Path:
    return Path(os.environ.get("MM27_LOCK_DIR", DEFAULT_LOCK_DIR))


def default_owner() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return f"{prog} pid {os.getpid()}" + (f" (xdist {worker})" if worker else "")


def _ensure_lock_dir(lock_dir: Path) -> None:
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"cannot create the lease folder {lock_dir}: {exc.strerror or exc} "
                          f"(set MM27_LOCK_DIR to a writable folder)") from None
    try:
        if lock_dir.stat().st_uid == os.getuid():
            os.chmod(lock_dir, 0o1777)      # shared between users, like /tmp
    except OSError:
        pass


def _read_holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown holder"
    if not data:
        return "unknown holder"
    pid, owner = data.get("pid"), data.get("owner", "?")
    host = data.get("host")
    since = data.get("since")
    age = f", for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
    return f"{owner} (pid {pid}{' on ' + host if host else ''}{age})"


class GpuLease:
    """Exclusive use of some devices (GPU indices or CPU cores) on this host.

    Use as a context manager or call :meth:`close`. The locks are released by
    the kernel if the process dies, so no lease outlives its holder.
    """

    def __init__(self, kind: LeaseKind, devices: tuple[int, ...], fds: dict[int, int], lock_dir: Path,
                 owner: str):
        self.kind = kind
        self.devices = devices
        self.lock_dir = lock_dir
        self.owner = owner
        self._fds = fds

    @property
    def closed(self) -> bool:
        return not self._fds

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.ftruncate(fd, 0)         # readers then see "free", not a stale holder
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            try:
                os.close(fd)
            except OSError:
                pass

    release = close

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:       # interpreter shutdown; the kernel drops the locks anyway
            pass

    def __repr__(self) -> str:
        state = "released" if self.closed else "held"
        return f"GpuLease({self.kind}, {list(self.devices)}, {state})"


Lease = GpuLease


def lock_path(lock_dir: Path, kind: LeaseKind, device: int) -> Path:
    return lock_dir / f"{kind}{device}.lock"


def _try_lock(path: Path, owner: str) -> int | None:
    """The locked fd, or None if someone else holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        pass
    record = {"pid": os.getpid(), "owner": owner, "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _candidates(kind: LeaseKind) -> list[int]:
    if kind == "cpu":
        return sorted(os.sched_getaffinity(0))
    return [g.index for g in discover_gpus()]


def lease_devices(count: int, *, kind: LeaseKind = "gpu", lock_dir: Path | None = None, timeout_s: float = 0,
                  candidates: Sequence[int] | None = None, owner: str | None = None) -> GpuLease:
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
        return GpuLease(kind, (), {}, lock_dir, owner)
    if count > len(pool):
        raise LaunchError(f"need {count} {noun}(s) but only {len(pool)} exist here: {pool}")
    _ensure_lock_dir(lock_dir)
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        fds: dict[int, int] = {}
        busy: list[int] = []
        for dev in pool:
            fd = _try_lock(lock_path(lock_dir, kind, dev), owner)
            if fd is None:
                busy.append(dev)
                continue
            fds[dev] = fd
            if len(fds) == count:
                return GpuLease(kind, tuple(fds), fds, lock_dir, owner)
        # Not enough: give back what we took so others can proceed.
        GpuLease(kind, tuple(fds), fds, lock_dir, owner).close()
        if time.monotonic() >= deadline:
            holders = "\n  ".join(f"{noun} {d}: held by {_read_holder(lock_path(lock_dir, kind, d))}"
                                  for d in busy)
            waited = f" after waiting {timeout_s:g} s" if timeout_s > 0 else ""
            raise LaunchError(f"need {count} free {noun}(s) of {pool} but only {len(pool) - len(busy)} "
                              f"are free{waited}; busy:\n  {holders}\n(leases live in {lock_dir})")
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
