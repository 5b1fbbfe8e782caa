"""The terminal table built from run records, and GPU telemetry summaries."""

from __future__ import annotations

import sys
import types

from pytest_mm27.report import record_table
from pytest_mm27.telemetry import GpuSampler


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
