"""GPU discovery, and whether a GPU's memory is free before a boot and after a teardown.

Discovery asks NVML (``pynvml`` from the nvidia-ml-py package, imported
lazily), else ``nvidia-smi``, else finds nothing. Indices are physical
(NVML / nvidia-smi order); ``CUDA_VISIBLE_DEVICES`` in our environment limits
which of them count as visible. Leases of GPUs live in :mod:`.leases`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LaunchError

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


def nvml_text(value: Any) -> str:
    """An NVML string: bytes from older pynvml bindings, str from newer ones."""
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
        driver = nvml_text(pynvml.nvmlSystemGetDriverVersion())
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuInfo(index=i, uuid=nvml_text(pynvml.nvmlDeviceGetUUID(h)),
                               name=nvml_text(pynvml.nvmlDeviceGetName(h)),
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
