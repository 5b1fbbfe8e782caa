"""The terminal table built from run records, and GPU telemetry summaries."""

from __future__ import annotations

import sys
import types

from pytest_mm27.report.terminal import record_table
from pytest_mm27.host.telemetry import GpuSampler, reason_names, throttled


def level(c, tok_s, gpu=None, verdict="pass", floor=None):
    metrics = {"concurrency": c, "output_tok_s": tok_s, "requests": 2 * c, "failed": 0,
               "ttft_ms": {"p50": 50.0, "p99": 80.0}, "tpot_ms": {"p50": 12.34}}
    if gpu:
        metrics["gpu"] = gpu
    return {"concurrency": c, "floor": floor, "metrics": metrics, "verdict": {"status": verdict}}


RECORD = {
    "topology": {"name": "dp3", "tensor_parallel": 2, "data_parallel": 3, "dp_mode": "replicas"},
    "engine": {"name": "sim", "version": "0.1.0"}, "workload": {"name": "quick"},
    "hardware": {"profile": "rtx-pro-6000"}, "errors": [],
}


def test_table_marks_peak_and_floor():
    record = {**RECORD, "levels": [level(1, 90.0), level(640, 10_217.0, floor=10_000), level(896, 9_000.0)]}
    lines = record_table(record)
    assert lines[0].startswith("dp3 (TP=2 x DP=3 replicas) · engine sim 0.1.0 · workload quick")
    header = lines[1].split()
    assert header[:3] == ["conc", "output", "tok/s"] and "power" not in header
    row640 = next(ln for ln in lines if ln.split()[:1] == ["640"])
    assert "10,217 *" in row640 and "10,000" in row640 and row640.rstrip().endswith("pass")
    assert "(* peak output tok/s)" in lines[-1]


def test_verdict_column_says_why_a_level_is_not_gated():
    sim_error = level(640, 9_760.0, verdict="invalid", floor=10_000)
    sim_error["verdict"]["tag"] = "within sim error"
    sim_error["metrics"]["client_bound"] = True      # the tag, not the flag, is the reason shown
    flagged = level(384, 7_000.0)
    flagged["metrics"]["client_bound"] = True        # an old record without tags: the flag is shown
    lines = record_table({**RECORD, "levels": [flagged, sim_error]})
    row = {ln.split()[0]: ln.rstrip() for ln in lines if ln.split()[:1] in (["384"], ["640"])}
    assert row["640"].endswith("invalid (within sim error)")
    assert row["384"].endswith("pass (client-bound)")


def test_table_shows_power_and_energy_per_token_when_measured():
    gpu = {"power_w_mean": 612.4, "j_per_output_token": 0.0512, "energy_j": 100.0}
    lines = record_table({**RECORD, "levels": [level(8, 500.0, gpu=gpu)]})
    assert "power W" in lines[1] and "J/tok" in lines[1]
    assert "612" in lines[3] and "0.051" in lines[3]


class FakeNvml(types.ModuleType):
    """Stands in for NVML's Python module (a third-party driver binding)."""

    def __init__(self):
        super().__init__("pynvml")
        self.energy = {0: 1_000_000, 1: 2_000_000}

    def nvmlInit(self): ...
    def nvmlShutdown(self): ...
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetPowerUsage(self, h): return 300_000 + 100_000 * h        # mW
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=90)
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=40 * 2**30)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.energy[h] += 50_000        # mJ per read
        return self.energy[h]


def test_sampler_uses_energy_counters(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    sampler = GpuSampler([0, 1], interval_s=0.01)
    with sampler:
        import time
        time.sleep(0.1)
    summary = sampler.summary(output_tokens=1000)
    assert [g["index"] for g in summary["gpus"]] == [0, 1]
    assert summary["energy_j"] == 100.0          # 50 J between the two counter reads, per GPU
    assert summary["j_per_output_token"] == 0.1
    assert summary["gpus"][1]["power_w_mean"] == 400.0
    assert summary["gpus"][0]["mem_used_mb_max"] == 40 * 1024


def test_sampler_without_nvml_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    sampler = GpuSampler([0])
    with sampler:
        pass
    assert "NVML unavailable" in sampler.summary(10)["error"]
    assert GpuSampler([]).summary(10) is None


class NVMLError(Exception):
    """Shaped like pynvml's: built from an NVML return code, printed as NVML's error string."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {3: "Not Supported", 13: "Function Not Found"}.get(self.value, "Unknown Error")


class Clocks(FakeNvml):
    """Adds clocks and a reasons mask, scripted per sample: ``script[gpu][k] = (sm MHz, reasons mask)``."""

    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVMLError = NVMLError

    def __init__(self, script):
        super().__init__()
        self.script = script
        self.samples = {h: 0 for h in script}

    def nvmlDeviceGetPowerUsage(self, h):          # first read of each sample: counts the samples
        self.samples[h] += 1
        return super().nvmlDeviceGetPowerUsage(h)

    def now(self, h):
        return self.script[h][self.samples[h] - 1]

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self.now(h)[0] if kind == self.NVML_CLOCK_SM else 3201


class ClockedNvml(Clocks):
    """A current binding: the reasons by their newer name."""

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.now(h)[1]


def sample(nvml, monkeypatch, gpus, n):
    """Run a sampler over exactly ``n`` samples (its own thread waits far longer than the test)."""
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuSampler(gpus, interval_s=3600)
    with sampler:
        for _ in range(n):
            sampler._sample(0.2)
    return sampler.summary(output_tokens=1000)


def test_sampler_reports_clocks_and_the_share_of_each_throttle_reason(monkeypatch):
    script = {0: [(1500, 0x4)] * 7 + [(1980, 0x0)] * 12 + [(1980, 0x1)],       # power cap 35%, idle 5%
              1: [(1755, 0x2)] * 19 + [(1755, 0x22)]}                          # app clocks, one thermal blip
    summary = sample(ClockedNvml(script), monkeypatch, [0, 1], 20)
    gpu0, gpu1 = summary["gpus"]
    assert gpu0["sm_clock_mhz_mean"] == (7 * 1500 + 13 * 1980) / 20 and gpu0["sm_clock_mhz_min"] == 1500
    assert gpu0["mem_clock_mhz_mean"] == 3201
    assert gpu0["throttle_reasons"] == {"gpu_idle": 0.05, "sw_power_cap": 0.35}
    assert gpu1["throttle_reasons"] == {"applications_clocks_setting": 1.0, "sw_thermal_slowdown": 0.05}
    assert list(gpu1["throttle_reasons"]) == sorted(gpu1["throttle_reasons"])
    assert gpu0["unavailable"] == {} and summary["error"] is None
    assert summary["gpus"][0]["power_w_mean"] == 300.0 and summary["gpus"][0]["samples"] == 20
    # idle and applications clocks are not throttling; 5% is a blip, not more than a few %
    assert throttled(summary) == ["GPU 0: sw_power_cap 35% of the level"]


def test_throttle_reasons_by_the_older_name_and_on_an_older_driver(monkeypatch):
    class OlderBinding(Clocks):                   # only the older name exists
        def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
            return self.now(h)[1]

    class OlderDriver(OlderBinding):              # both names, but the driver lacks the newer symbol
        def nvmlDeviceGetCurrentClocksEventReasons(self, h):
            raise NVMLError(13)

    for nvml in (OlderBinding({0: [(1400, 0x8 | 0x40)] * 4}), OlderDriver({0: [(1400, 0x8 | 0x40)] * 4})):
        summary = sample(nvml, monkeypatch, [0], 4)
        assert summary["gpus"][0]["throttle_reasons"] == {"hw_slowdown": 1.0, "hw_thermal_slowdown": 1.0}
        assert throttled(summary) == ["GPU 0: hw_slowdown 100% of the level", "GPU 0: hw_thermal_slowdown 100% of the level"]


def test_unreadable_clocks_are_recorded_once_and_power_is_still_sampled(monkeypatch):
    class NoClocks(ClockedNvml):
        asked = 0

        def nvmlDeviceGetClockInfo(self, h, kind):
            NoClocks.asked += 1
            raise NVMLError(3)

    summary = sample(NoClocks({0: [(0, 0x4)] * 5}), monkeypatch, [0], 5)
    gpu = summary["gpus"][0]
    assert gpu["sm_clock_mhz_mean"] is gpu["sm_clock_mhz_min"] is gpu["mem_clock_mhz_mean"] is None
    assert gpu["unavailable"] == {"sm_clock_mhz": "NVMLError: Not Supported", "mem_clock_mhz": "NVMLError: Not Supported"}
    assert NoClocks.asked == 2                     # once per clock, not once per sample
    assert gpu["throttle_reasons"] == {"sw_power_cap": 1.0} and gpu["power_w_mean"] == 300.0
    assert summary["error"] is None

    gpu = sample(FakeNvml(), monkeypatch, [0], 3)["gpus"][0]      # a binding with none of these calls
    assert gpu["throttle_reasons"] is None and gpu["samples"] == 3
    assert set(gpu["unavailable"]) == {"sm_clock_mhz", "mem_clock_mhz", "throttle_reasons"}


def test_reason_names_and_throttled_without_telemetry():
    assert reason_names(0) == []
    assert reason_names(0x1FF) == ["gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown",
                                   "sync_boost", "sw_thermal_slowdown", "hw_thermal_slowdown",
                                   "hw_power_brake_slowdown", "display_clock_setting"]
    assert reason_names(0x4 | 0x400) == ["sw_power_cap", "unknown_0x400"]
    assert throttled(None) == [] and throttled({"error": "NVML unavailable: no pynvml"}) == []
