"""GPU telemetry during a level: power, SM utilisation, memory, energy.

A background thread samples NVML (``pynvml`` from nvidia-ml-py, imported
lazily) for the leased GPUs while the load runs. Energy comes from the
driver's cumulative energy counter where the GPU has one (Volta and newer),
which is exact between two reads; otherwise it is the integral of the power
samples. Without NVML the sampler is a no-op and records nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SAMPLE_INTERVAL_S = 0.2


@dataclass
class _GpuSeries:
    index: int
    power_w: list[float] = field(default_factory=list)
    sm_util: list[float] = field(default_factory=list)
    mem_used_mb: list[float] = field(default_factory=list)
    energy_start_mj: int | None = None
    energy_end_mj: int | None = None
    integrated_j: float = 0.0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class GpuSampler:
    """``with GpuSampler([0, 1]) as s: ...`` then ``s.summary(output_tokens)``."""

    def __init__(self, gpus: Sequence[int], interval_s: float = SAMPLE_INTERVAL_S):
        self.gpus = list(gpus)
        self.interval_s = interval_s
        self._series = [_GpuSeries(i) for i in self.gpus]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handles: list[Any] = []
        self.error: str | None = None
        self._t0 = self._t1 = 0.0

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not self.gpus:
            return
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpus]
        except Exception as exc:  # noqa: BLE001 - NVML missing or broken: no telemetry, not a failure
            self.error = f"NVML unavailable: {exc}"
            self._nvml = None
            return
        for series, handle in zip(self._series, self._handles):
            series.energy_start_mj = self._energy(handle)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mm27-gpu-telemetry", daemon=True)
        self._thread.start()

    def _energy(self, handle: Any) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:  # noqa: BLE001 - not supported on this GPU
            return None

    def _sample(self, dt: float) -> None:
        nvml = self._nvml
        for series, handle in zip(self._series, self._handles):
            try:
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                series.power_w.append(power)
                series.integrated_j += power * dt
                series.sm_util.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                series.mem_used_mb.append(nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            except Exception as exc:  # noqa: BLE001 - keep sampling the others
                self.error = f"NVML read failed on GPU {series.index}: {exc}"

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            self._sample(now - last)
            last = now

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        self._t1 = time.monotonic()
        for series, handle in zip(self._series, self._handles):
            series.energy_end_mj = self._energy(handle)
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    def summary(self, output_tokens: int) -> dict[str, Any] | None:
        """Per-GPU and total figures for the record; None when nothing was sampled."""
        if not any(s.power_w for s in self._series):
            return {"error": self.error} if self.error else None
        per_gpu = []
        total_j = 0.0
        for s in self._series:
            if s.energy_start_mj is not None and s.energy_end_mj is not None:
                energy_j, source = (s.energy_end_mj - s.energy_start_mj) / 1000.0, "counter"
            else:
                energy_j, source = s.integrated_j, "integrated"
            total_j += energy_j
            per_gpu.append({
                "index": s.index, "power_w_mean": _mean(s.power_w), "power_w_max": max(s.power_w, default=None),
                "sm_util_mean": _mean(s.sm_util), "mem_used_mb_max": max(s.mem_used_mb, default=None),
                "energy_j": energy_j, "energy_source": source, "samples": len(s.power_w),
            })
        seconds = self._t1 - self._t0
        return {
            "seconds": seconds,
            "energy_j": total_j,
            "power_w_mean": total_j / seconds if seconds > 0 else None,
            "j_per_output_token": total_j / output_tokens if output_tokens else None,
            "gpus": per_gpu,
            "error": self.error,
        }
