"""GPU telemetry during a level: power, SM utilisation, memory, energy, clocks.

A background thread samples NVML (``pynvml`` from nvidia-ml-py, imported
lazily) for the leased GPUs while the load runs. Energy comes from the
driver's cumulative energy counter where the GPU has one (Volta and newer),
which is exact between two reads; otherwise it is the integral of the power
samples. Without NVML the sampler is a no-op and records nothing.

The SM and memory clocks and the clocks-event ("throttle") reasons say
whether the GPU ran at the speed the baseline's did: a level measured while
the power cap or a thermal slowdown held the clocks down is slower for a
reason that is not the software under test.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SAMPLE_INTERVAL_S = 0.2

# nvml.h's bits, the same under the newer nvmlClocksEventReason* names and the
# older nvmlClocksThrottleReason* ones, so no binding's constants are needed.
CLOCKS_EVENT_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Idle between requests, and clocks set on purpose (host facts record the
# applications clocks): neither is the GPU slowing itself down under load.
BENIGN_REASONS = frozenset({"gpu_idle", "applications_clocks_setting"})
# A reason active in a few samples is a blip; past this share of a level it moved the level.
THROTTLE_NOTICE_SHARE = 0.05


def reason_names(mask: int) -> list[str]:
    """The names of the reasons set in a clocks-event bitmask; bits nvml.h did not define are kept by value."""
    names = [name for bit, name in CLOCKS_EVENT_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCKS_EVENT_REASONS)
    return names + [f"unknown_0x{1 << i:x}" for i in range(rest.bit_length()) if rest >> i & 1]


def clocks_event_reasons(nvml: Any, handle: Any) -> int:
    """The active clocks-event reasons bitmask, asked by the newer name, then the older.

    A newer binding over a driver older than the rename has the new function
    but not its symbol (the call fails), hence the fallback on failure too.
    """
    error: Exception = AttributeError("pynvml has neither nvmlDeviceGetCurrentClocksEventReasons "
                                      "nor nvmlDeviceGetCurrentClocksThrottleReasons")
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        query = getattr(nvml, name, None)
        if query is None:
            continue
        try:
            return int(query(handle))
        except Exception as exc:  # noqa: BLE001 - try the other name
            error = exc
    raise error


@dataclass
class _GpuSeries:
    index: int
    power_w: list[float] = field(default_factory=list)
    sm_util: list[float] = field(default_factory=list)
    mem_used_mb: list[float] = field(default_factory=list)
    sm_clock_mhz: list[float] = field(default_factory=list)
    mem_clock_mhz: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)     # samples each reason was active in
    reason_samples: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)  # what could not be read, and why
    energy_start_mj: int | None = None
    energy_end_mj: int | None = None
    integrated_j: float = 0.0

    def read(self, key: str, query: Callable[[], Any]) -> Any:
        """One optional reading; the first failure is recorded and the reading not asked again this level."""
        if key in self.unavailable:
            return None
        try:
            return query()
        except Exception as exc:  # noqa: BLE001 - unsupported on this GPU or binding
            self.unavailable[key] = f"{type(exc).__name__}: {exc}"
            return None


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
            self._sample_clocks(series, handle)

    def _sample_clocks(self, series: _GpuSeries, handle: Any) -> None:
        nvml = self._nvml
        sm = series.read("sm_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        if sm is not None:
            series.sm_clock_mhz.append(float(sm))
        mem = series.read("mem_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))
        if mem is not None:
            series.mem_clock_mhz.append(float(mem))
        mask = series.read("throttle_reasons", lambda: clocks_event_reasons(nvml, handle))
        if mask is not None:
            series.reason_samples += 1
            series.reasons.update(reason_names(mask))

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
                "sm_clock_mhz_mean": _mean(s.sm_clock_mhz), "sm_clock_mhz_min": min(s.sm_clock_mhz, default=None),
                "mem_clock_mhz_mean": _mean(s.mem_clock_mhz),
                # share of the samples each reason was active in; None when they could not be read
                "throttle_reasons": {name: round(s.reasons[name] / s.reason_samples, 3) for name in sorted(s.reasons)}
                if s.reason_samples else None,
                "unavailable": dict(s.unavailable),
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


def throttled(summary: Mapping[str, Any] | None) -> list[str]:
    """Phrases for reasons that cut clocks in more than THROTTLE_NOTICE_SHARE of a level's samples.

    Takes ``GpuSampler.summary()`` (or the same dict read back from a record),
    e.g. ``["GPU 0: sw_power_cap 35% of the level"]``. A compute-bound level
    can sit at the power cap throughout (an H200 under bf16 matmuls: every
    sample, 698 of 700 W): then the power limit, a host fact, set its speed.
    """
    out = []
    for gpu in (summary or {}).get("gpus") or ():
        for name, share in (gpu.get("throttle_reasons") or {}).items():
            if name not in BENIGN_REASONS and share > THROTTLE_NOTICE_SHARE:
                out.append(f"GPU {gpu['index']}: {name} {share:.0%} of the level")
    return out
