"""Host facts for the run record, and the phrases naming those that differ from a baseline's."""

from __future__ import annotations

import json
import platform
import sys
import types

from pytest_mm27.host.hostfacts import collect_host_facts, facts_differences


class NVMLError(Exception):
    """Shaped like pynvml's: built from an NVML return code, printed as NVML's error string."""

    STRINGS = {3: "Not Supported", 9: "Driver Not Loaded"}

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.STRINGS.get(self.value, "Unknown Error")


H200 = {"name": b"NVIDIA H200", "uuid": b"GPU-aaaa", "total": 143771 * 2**20, "max": {1: 1980, 2: 3201},
        "app": {1: 1755, 2: 3201}, "default_app": {1: 1755, 2: 3201}, "limit_mw": 700_000,
        "default_mw": 700_000, "pcie_max": (5, 16), "pcie": (1, 16)}


class FakeNvml(types.ModuleType):
    """Stands in for nvidia-ml-py's ``pynvml``: same function names, constants and error class."""

    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVMLError = NVMLError

    def __init__(self, gpus=None, unsupported=(), init_error=None):
        super().__init__("pynvml")
        self.gpus = gpus or {0: dict(H200), 1: {**H200, "uuid": "GPU-bbbb"}}
        self.unsupported = set(unsupported)
        self.init_error = init_error
        self.shut_down = False

    def _ask(self, name, value):
        if name in self.unsupported:
            raise NVMLError(3)
        return value

    def nvmlInit(self):
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self): self.shut_down = True
    def nvmlSystemGetDriverVersion(self): return self._ask("driver", b"580.159.03")
    def nvmlSystemGetCudaDriverVersion(self): return self._ask("cuda", 13000)
    def nvmlDeviceGetHandleByIndex(self, i): return self._ask("handle", i)
    def nvmlDeviceGetName(self, h): return self.gpus[h]["name"]
    def nvmlDeviceGetUUID(self, h): return self.gpus[h]["uuid"]
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(total=self.gpus[h]["total"], used=2**30)
    def nvmlDeviceGetMaxClockInfo(self, h, kind): return self.gpus[h]["max"][kind]
    def nvmlDeviceGetApplicationsClock(self, h, kind): return self._ask("app", self.gpus[h]["app"][kind])
    def nvmlDeviceGetDefaultApplicationsClock(self, h, kind): return self.gpus[h]["default_app"][kind]
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return self.gpus[h]["limit_mw"]
    def nvmlDeviceGetPowerManagementDefaultLimit(self, h): return self.gpus[h]["default_mw"]
    def nvmlDeviceGetMaxPcieLinkGeneration(self, h): return self._ask("pcie", self.gpus[h]["pcie_max"][0])
    def nvmlDeviceGetMaxPcieLinkWidth(self, h): return self._ask("pcie", self.gpus[h]["pcie_max"][1])
    def nvmlDeviceGetCurrPcieLinkGeneration(self, h): return self._ask("pcie", self.gpus[h]["pcie"][0])
    def nvmlDeviceGetCurrPcieLinkWidth(self, h): return self._ask("pcie", self.gpus[h]["pcie"][1])


def fake_interpreter(tmp_path, body: str) -> str:
    """An executable standing in for the engine's python: ignores ``-c PROBE`` and runs ``body``."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


# ---- collecting ---------------------------------------------------------------------------------


def test_collects_host_and_gpu_facts_in_lease_order(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    facts = collect_host_facts([1, 0])
    assert json.loads(json.dumps(facts)) == facts
    assert facts["python"] == platform.python_version() and facts["kernel"] == platform.release()
    assert facts["cpus"] >= facts["cpus_usable"] >= 1 and facts["memory_total_gib"] > 0
    assert facts["cpu_model"] and facts["hostname"]
    assert (facts["driver"], facts["cuda_driver"]) == ("580.159.03", "13.0")
    assert [g["index"] for g in facts["gpus"]] == [1, 0]
    gpu = facts["gpus"][1]
    assert gpu == {
        "index": 0, "name": "NVIDIA H200", "uuid": "GPU-aaaa", "memory_total_mib": 143771,
        "max_sm_clock_mhz": 1980, "max_mem_clock_mhz": 3201, "app_sm_clock_mhz": 1755, "app_mem_clock_mhz": 3201,
        "default_app_sm_clock_mhz": 1755, "default_app_mem_clock_mhz": 3201,
        "power_limit_w": 700.0, "power_limit_default_w": 700.0,
        "pcie_gen_max": 5, "pcie_width_max": 16, "pcie_gen": 1, "pcie_width": 16,
    }
    assert facts["gpus"][0]["uuid"] == "GPU-bbbb"                  # str as well as bytes from the binding
    assert not any(key.startswith(("gpus", "driver", "nvml")) for key in facts["unavailable"])
    assert nvml.shut_down and facts["engine_env"] is None


def test_unsupported_and_missing_nvml_calls_are_recorded_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(unsupported={"app", "pcie", "cuda"}))
    monkeypatch.delattr(FakeNvml, "nvmlDeviceGetPowerManagementDefaultLimit")    # an older binding
    facts = collect_host_facts([0])
    gpu, missing = facts["gpus"][0], facts["unavailable"]
    assert gpu["app_sm_clock_mhz"] is None and gpu["pcie_gen_max"] is None and gpu["power_limit_default_w"] is None
    assert missing["gpus[0].app_sm_clock_mhz"] == "NVMLError: Not Supported"
    assert missing["cuda_driver"] == "NVMLError: Not Supported" and facts["cuda_driver"] is None
    assert "AttributeError" in missing["gpus[0].power_limit_default_w"]
    assert gpu["power_limit_w"] == 700.0 and gpu["max_sm_clock_mhz"] == 1980 and facts["driver"] == "580.159.03"


def test_without_nvml_the_gpus_are_listed_with_nothing_known(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    facts = collect_host_facts([3])
    assert facts["gpus"][0]["index"] == 3 and facts["gpus"][0]["name"] is None
    assert facts["unavailable"]["nvml"].startswith("NVML unavailable: ")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_error=9))      # library present, no driver
    assert collect_host_facts([0])["unavailable"]["nvml"] == "NVML unavailable: NVMLError: Driver Not Loaded"
    handle_fails = FakeNvml(unsupported={"handle"})
    monkeypatch.setitem(sys.modules, "pynvml", handle_fails)
    facts = collect_host_facts([0])
    assert facts["gpus"][0]["name"] is None and "gpus[0]" in facts["unavailable"] and handle_fails.shut_down


def test_no_gpus_listed_means_nvml_is_not_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_error=9))
    facts = collect_host_facts()
    assert facts["gpus"] == [] and facts["unavailable"]["nvml"] == "no GPUs listed"


# ---- the engine's environment -------------------------------------------------------------------


def test_engine_versions_come_from_its_interpreter(tmp_path):
    reply = {"python_version": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "vllm": "0.12.0", "errors": {}}
    python = fake_interpreter(tmp_path, f"echo 'INFO noise on stdout'\necho 'mm27-engine-facts: {json.dumps(reply)}'")
    facts = collect_host_facts(engine_python=python)
    assert facts["engine_env"] == {"python": python, "python_version": "3.12.3", "torch": "2.11.0+cu130",
                                   "torch_cuda": "13.0", "vllm": "0.12.0"}
    assert not any(key.startswith("engine") for key in facts["unavailable"])


def test_engine_probe_runs_in_a_real_interpreter():
    facts = collect_host_facts(engine_python=sys.executable)
    env, missing = facts["engine_env"], facts["unavailable"]
    assert env["python_version"] == platform.python_version()
    for key in ("torch", "torch_cuda", "vllm"):                 # whichever this environment lacks says why
        assert (env[key] is None) == (f"engine_env.{key}" in missing)


def test_engine_probe_failures_are_recorded(tmp_path):
    broken = fake_interpreter(tmp_path, "echo 'ImportError: libcudart.so.13' >&2\nexit 1")
    facts = collect_host_facts(engine_python=broken)
    assert facts["engine_env"]["torch"] is None
    assert facts["unavailable"]["engine_env"] == f"{broken} exited 1: ImportError: libcudart.so.13"

    facts = collect_host_facts(engine_python=str(tmp_path / "no-such-python"))
    assert facts["unavailable"]["engine_env"].startswith("cannot run ")

    (tmp_path / "slow").mkdir()
    slow = fake_interpreter(tmp_path / "slow", "exec sleep 5")
    facts = collect_host_facts(engine_python=slow, engine_timeout_s=0.2)
    assert facts["unavailable"]["engine_env"] == f"{slow} did not answer within 0.2 s"


# ---- differences --------------------------------------------------------------------------------


def block(**changes):
    gpu = {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-aaaa", "memory_total_mib": 143771,
           "max_sm_clock_mhz": 1980, "max_mem_clock_mhz": 3201, "app_sm_clock_mhz": 1755, "app_mem_clock_mhz": 3201,
           "default_app_sm_clock_mhz": 1755, "default_app_mem_clock_mhz": 3201, "power_limit_w": 700.0,
           "power_limit_default_w": 700.0, "pcie_gen_max": 5, "pcie_width_max": 16, "pcie_gen": 5, "pcie_width": 16}
    facts = {
        "hostname": "vm-a", "platform": "Linux-6.8.0-49-generic-x86_64-with-glibc2.39", "python": "3.12.3",
        "cpus": 64, "cpus_usable": 32, "cpu_model": "AMD EPYC 9654 96-Core Processor", "memory_total_gib": 503.7,
        "os": "Ubuntu 24.04.1 LTS", "kernel": "6.8.0-49-generic", "driver": "580.159.03", "cuda_driver": "13.0",
        "gpus": [gpu, {**gpu, "index": 1, "uuid": "GPU-bbbb"}],
        "engine_env": {"python": "/opt/vllm/bin/python", "python_version": "3.12.3", "torch": "2.11.0+cu130",
                       "torch_cuda": "13.0", "vllm": "0.12.0"},
        "unavailable": {},
    }
    return {**facts, **changes}


def test_same_host_has_no_differences_even_when_volatile_facts_move():
    run = block(memory_total_gib=503.2)
    run["gpus"] = [{**g, "uuid": "GPU-other", "pcie_gen": 1} for g in run["gpus"]]
    assert facts_differences(block(), run) == []


def test_differences_are_named_baseline_first():
    run = block(hostname="vm-b", cpu_model="Intel(R) Xeon(R) Platinum 8480+", cpus_usable=16, driver="580.159.04",
                kernel="6.8.0-51-generic", platform="Linux-6.8.0-51-generic-x86_64-with-glibc2.39")
    run["gpus"] = [{**g, "power_limit_w": 600.0} for g in run["gpus"]]
    run["gpus"][1]["app_sm_clock_mhz"] = None                           # unreadable on this run
    run["engine_env"] = {**run["engine_env"], "torch": "2.10.0+cu130"}
    assert facts_differences(block(), run) == [
        "host: vm-a (baseline) vs vm-b (this run)",
        "CPU model: 'AMD EPYC 9654 96-Core Processor' (baseline) vs 'Intel(R) Xeon(R) Platinum 8480+' (this run)",
        "usable CPUs: 32 (baseline) vs 16 (this run)",
        "kernel: 6.8.0-49-generic (baseline) vs 6.8.0-51-generic (this run)",
        "driver: 580.159.03 (baseline) vs 580.159.04 (this run)",
        "GPUs 0, 1 power limit: 700 W (baseline) vs 600 W (this run)",
        "GPU 1 application SM clock: 1755 MHz (baseline) vs unreadable (this run)",
        "torch: 2.11.0+cu130 (baseline) vs 2.10.0+cu130 (this run)",
    ]


def test_another_gpu_model_is_one_phrase_and_gpus_compare_by_position():
    run = block()
    run["gpus"] = [{**run["gpus"][0], "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "power_limit_w": 700.0}]
    assert facts_differences(block(), run) == [
        "GPU count: 2 (baseline) vs 1 (this run)",
        "GPU 0 model: 'NVIDIA H200' (baseline) vs 'NVIDIA H100 80GB HBM3' (this run)",
    ]


def test_an_older_baseline_is_said_so_and_what_it_has_is_compared():
    old = {"hostname": "vm-a", "platform": "Linux-5.15.0-91-generic-x86_64-with-glibc2.35", "python": "3.11.7", "cpus": 128}
    assert facts_differences(old, block()) == [
        "baseline records no host facts (saved by an older harness)",
        "logical CPUs: 128 (baseline) vs 64 (this run)",
        "platform: Linux-5.15.0-91-generic-x86_64-with-glibc2.35 (baseline)"
        " vs Linux-6.8.0-49-generic-x86_64-with-glibc2.39 (this run)",
        "Python: 3.11.7 (baseline) vs 3.12.3 (this run)",
    ]
    assert facts_differences(None, block()) == ["baseline records no host facts (saved by an older harness)"]
    assert facts_differences(block(), None) == ["this run records no host facts"]
