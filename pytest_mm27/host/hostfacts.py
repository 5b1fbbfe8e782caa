"""What a run was measured on, and which of those facts differ from a baseline's.

A throughput figure is comparable only with one from the same kind of box:
a lower GPU power limit, another driver or torch, fewer CPUs for the client
can each move the numbers by more than a gate's tolerance. The run record
keeps these facts so that a comparison can name the ones that differ before
it shows a number.

Reading them must never fail a run: a fact that cannot be read (no NVML, a
call this GPU does not support, an engine environment that does not import)
is None, with the reason under ``unavailable``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict, TypeVar

from .gpus import nvml_text

# The probe imports torch, which can take tens of seconds on a cold disk.
ENGINE_PROBE_TIMEOUT_S = 60.0


class GpuFacts(TypedDict):
    index: int                              # physical (NVML) index, as leased
    name: str | None
    uuid: str | None
    memory_total_mib: int | None
    max_sm_clock_mhz: int | None
    max_mem_clock_mhz: int | None
    app_sm_clock_mhz: int | None            # applications clocks: a setting, unlike the current clocks
    app_mem_clock_mhz: int | None
    default_app_sm_clock_mhz: int | None
    default_app_mem_clock_mhz: int | None
    power_limit_w: float | None             # the enforced one
    power_limit_default_w: float | None
    pcie_gen_max: int | None                # what the device and its slot allow
    pcie_width_max: int | None
    pcie_gen: int | None                    # the link now: it drops at idle, so never compared
    pcie_width: int | None


class EngineEnv(TypedDict):
    python: str                             # the interpreter asked
    python_version: str | None
    torch: str | None
    torch_cuda: str | None
    vllm: str | None


class HostFacts(TypedDict):
    hostname: str
    platform: str                           # these four are the older harness's whole host block
    python: str
    cpus: int | None
    cpus_usable: int | None
    cpu_model: str | None
    memory_total_gib: float | None
    os: str | None
    kernel: str
    driver: str | None
    cuda_driver: str | None
    gpus: list[GpuFacts]
    engine_env: EngineEnv | None
    unavailable: dict[str, str]             # fact key -> why it is None


T = TypeVar("T")


class _Reader:
    """Reads one fact at a time; a failure is recorded as a reason, never raised."""

    def __init__(self) -> None:
        self.unavailable: dict[str, str] = {}

    def __call__(self, key: str, read: Callable[[], T]) -> T | None:
        try:
            value = read()
        except Exception as exc:  # noqa: BLE001 - unsupported call, missing file: record it and go on
            self.miss(key, f"{type(exc).__name__}: {exc}")
            return None
        if value is None or value == "":
            self.miss(key, "empty")
            return None
        return value

    def miss(self, key: str, reason: str) -> None:
        self.unavailable[key] = reason


def collect_host_facts(gpus: Sequence[int] = (), engine_python: str | None = None, *,
                       engine_timeout_s: float = ENGINE_PROBE_TIMEOUT_S) -> HostFacts:
    """Facts about this host, the listed GPUs (physical indices) and the engine's Python environment."""
    read = _Reader()
    driver, cuda_driver, gpu_facts = _nvml_facts(gpus, read)
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        # the load generator's share of the box: a cgroup or taskset can hold it to a few cores
        "cpus_usable": read("cpus_usable", lambda: len(os.sched_getaffinity(0))),
        "cpu_model": read("cpu_model", _cpu_model),
        "memory_total_gib": read("memory_total_gib", _memory_total_gib),
        "os": read("os", lambda: platform.freedesktop_os_release()["PRETTY_NAME"]),
        "kernel": platform.release(),
        "driver": driver,
        "cuda_driver": cuda_driver,
        "gpus": gpu_facts,
        "engine_env": _engine_env(engine_python, engine_timeout_s, read) if engine_python else None,
        "unavailable": read.unavailable,
    }


def _cpu_model() -> str:
    # /proc/cpuinfo names the part; platform.processor() often says only "x86_64"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    if platform.processor():
        return platform.processor()
    raise LookupError("no 'model name' in /proc/cpuinfo and platform.processor() is empty")


def _memory_total_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def _cuda_version(packed: int) -> str:
    """NVML packs the CUDA version the driver supports as 1000 * major + 10 * minor."""
    return f"{packed // 1000}.{packed % 1000 // 10}"


def _clock(query: str, domain: str) -> Callable[[Any, Any], int]:
    return lambda nvml, h: int(getattr(nvml, query)(h, getattr(nvml, domain)))


# (key, read(nvml, handle)), one NVML call each, so one unsupported call costs one fact
_GPU_READS: tuple[tuple[str, Callable[[Any, Any], Any]], ...] = (
    ("name", lambda nvml, h: nvml_text(nvml.nvmlDeviceGetName(h))),
    ("uuid", lambda nvml, h: nvml_text(nvml.nvmlDeviceGetUUID(h))),
    ("memory_total_mib", lambda nvml, h: int(nvml.nvmlDeviceGetMemoryInfo(h).total // 2**20)),
    ("max_sm_clock_mhz", _clock("nvmlDeviceGetMaxClockInfo", "NVML_CLOCK_SM")),
    ("max_mem_clock_mhz", _clock("nvmlDeviceGetMaxClockInfo", "NVML_CLOCK_MEM")),
    ("app_sm_clock_mhz", _clock("nvmlDeviceGetApplicationsClock", "NVML_CLOCK_SM")),
    ("app_mem_clock_mhz", _clock("nvmlDeviceGetApplicationsClock", "NVML_CLOCK_MEM")),
    ("default_app_sm_clock_mhz", _clock("nvmlDeviceGetDefaultApplicationsClock", "NVML_CLOCK_SM")),
    ("default_app_mem_clock_mhz", _clock("nvmlDeviceGetDefaultApplicationsClock", "NVML_CLOCK_MEM")),
    ("power_limit_w", lambda nvml, h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),     # mW
    ("power_limit_default_w", lambda nvml, h: nvml.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1000),
    ("pcie_gen_max", lambda nvml, h: int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(h))),
    ("pcie_width_max", lambda nvml, h: int(nvml.nvmlDeviceGetMaxPcieLinkWidth(h))),
    ("pcie_gen", lambda nvml, h: int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(h))),
    ("pcie_width", lambda nvml, h: int(nvml.nvmlDeviceGetCurrPcieLinkWidth(h))),
)


def _blank_gpu(index: int) -> GpuFacts:
    return {"index": index, **dict.fromkeys(key for key, _ in _GPU_READS)}


def _nvml_facts(gpus: Sequence[int], read: _Reader) -> tuple[str | None, str | None, list[GpuFacts]]:
    """Driver, CUDA driver version and one GpuFacts per listed GPU, in the listed order."""
    if not gpus:
        read.miss("nvml", "no GPUs listed")
        return None, None, []
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no NVML: facts unknown, the run goes on
        read.miss("nvml", f"NVML unavailable: {type(exc).__name__}: {exc}")
        return None, None, [_blank_gpu(i) for i in gpus]
    try:
        driver = read("driver", lambda: nvml_text(pynvml.nvmlSystemGetDriverVersion()))
        cuda_driver = read("cuda_driver", lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion()))
        out = []
        for pos, index in enumerate(gpus):
            facts = _blank_gpu(index)
            handle = read(f"gpus[{pos}]", functools.partial(pynvml.nvmlDeviceGetHandleByIndex, index))
            if handle is not None:
                for key, get in _GPU_READS:
                    facts[key] = read(f"gpus[{pos}].{key}", functools.partial(get, pynvml, handle))
            out.append(facts)
        return driver, cuda_driver, out
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


# The probe's answer is the one stdout line with this prefix, so whatever an import prints is never read as it.
_PROBE_MARK = "mm27-engine-facts: "
# Runs in the engine's interpreter. vLLM's version comes from its package
# metadata: importing vllm is slow, may touch CUDA and logs to stdout.
_ENGINE_PROBE = """\
import importlib.metadata, json, platform
out = {"python_version": platform.python_version(), "errors": {}}
try:
    import torch
    out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
    if torch.version.cuda is None:
        out["errors"]["torch_cuda"] = "torch.version.cuda is None (a build without CUDA)"
except Exception as exc:
    out["errors"]["torch"] = out["errors"]["torch_cuda"] = f"{type(exc).__name__}: {exc}"
try:
    out["vllm"] = importlib.metadata.version("vllm")
except Exception as exc:
    out["errors"]["vllm"] = f"{type(exc).__name__}: {exc}"
""" + f"print({_PROBE_MARK!r} + json.dumps(out))\n"


def _engine_env(python: str, timeout_s: float, read: _Reader) -> EngineEnv:
    env: EngineEnv = {"python": python, "python_version": None, "torch": None, "torch_cuda": None, "vllm": None}
    try:
        done = subprocess.run([python, "-c", _ENGINE_PROBE], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        read.miss("engine_env", f"{python} did not answer within {timeout_s:g} s")
        return env
    except OSError as exc:
        read.miss("engine_env", f"cannot run {python}: {exc}")
        return env
    lines = [line for line in done.stdout.splitlines() if line.startswith(_PROBE_MARK)]
    try:
        found = json.loads(lines[-1][len(_PROBE_MARK):]) if done.returncode == 0 and lines else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        read.miss("engine_env", f"{python} exited {done.returncode}: {tail}")
        return env
    errors = found.get("errors") if isinstance(found.get("errors"), dict) else {}
    for key in ("python_version", "torch", "torch_cuda", "vllm"):
        value = found.get(key)
        if isinstance(value, str) and value:
            env[key] = value
        else:
            read.miss(f"engine_env.{key}", str(errors.get(key, "not reported")))
    return env


# --- differences --------------------------------------------------------------------------


class _Fact(NamedTuple):
    key: str
    label: str
    unit: str = ""
    tolerance: float = 0.0      # relative: for figures that wobble between boots of one box


_HOST_FACTS = (
    _Fact("hostname", "host"),
    _Fact("cpu_model", "CPU model"),
    _Fact("cpus", "logical CPUs"),
    _Fact("cpus_usable", "usable CPUs"),
    _Fact("memory_total_gib", "memory", "GiB", 0.01),     # the kernel's reservations move it a little
    _Fact("os", "OS"),
    _Fact("kernel", "kernel"),
    _Fact("platform", "platform"),                        # compared only with an older block (see below)
    _Fact("python", "Python"),
    _Fact("driver", "driver"),
    _Fact("cuda_driver", "CUDA driver"),
)
# Not compared: the UUID (another card of the same kind is not another kind of
# host) and the current PCIe link, which drops at idle.
_GPU_FACTS = (
    _Fact("name", "model"),
    _Fact("memory_total_mib", "memory", "MiB"),           # also moves when ECC is switched
    _Fact("max_sm_clock_mhz", "max SM clock", "MHz"),
    _Fact("max_mem_clock_mhz", "max memory clock", "MHz"),
    _Fact("app_sm_clock_mhz", "application SM clock", "MHz"),
    _Fact("app_mem_clock_mhz", "application memory clock", "MHz"),
    _Fact("default_app_sm_clock_mhz", "default application SM clock", "MHz"),
    _Fact("default_app_mem_clock_mhz", "default application memory clock", "MHz"),
    _Fact("power_limit_w", "power limit", "W"),
    _Fact("power_limit_default_w", "default power limit", "W"),
    _Fact("pcie_gen_max", "PCIe generation"),
    _Fact("pcie_width_max", "PCIe lanes"),
)
_ENGINE_FACTS = (
    _Fact("python_version", "engine Python"),
    _Fact("torch", "torch"),
    _Fact("torch_cuda", "torch CUDA"),
    _Fact("vllm", "vLLM"),
)


def _same(a: Any, b: Any, tolerance: float) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers and tolerance:
        return abs(a - b) <= tolerance * max(abs(a), abs(b))
    return bool(a == b)


def _show(value: Any, unit: str) -> str:
    if value is None:
        return "unreadable"
    if isinstance(value, str):
        return repr(value) if " " in value else value      # quotes only where the value has spaces
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def _differing(facts: Sequence[_Fact], base: Mapping[str, Any], run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, "A (baseline) vs B (this run)") for facts both sides record and that differ."""
    return [(f.label, f"{_show(base[f.key], f.unit)} (baseline) vs {_show(run[f.key], f.unit)} (this run)")
            for f in facts
            if f.key in base and f.key in run and not _same(base[f.key], run[f.key], f.tolerance)]


def _gpu_differences(base: Sequence[Mapping[str, Any]], run: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    if len(base) != len(run):
        out.append(f"GPU count: {len(base)} (baseline) vs {len(run)} (this run)")
    # the same difference on several GPUs (a power limit set host-wide) is one phrase
    positions: dict[tuple[str, str], list[int]] = {}
    for pos, (b, r) in enumerate(zip(base, run)):
        found = _differing(_GPU_FACTS, b, r)
        if found and found[0][0] == "model":
            found = found[:1]           # another GPU model: its clocks and limits differ with it
        for diff in found:
            positions.setdefault(diff, []).append(pos)
    for (label, text), where in positions.items():
        gpus = f"GPU {where[0]}" if len(where) == 1 else "GPUs " + ", ".join(map(str, where))
        out.append(f"{gpus} {label}: {text}")
    return out


def facts_differences(baseline: Mapping[str, Any] | None, run: Mapping[str, Any] | None) -> list[str]:
    """Phrases for the host facts that differ and matter for performance, baseline first.

    Takes the records' host blocks. GPUs are compared by position in the
    lease order. A block from an older harness (hostname, platform, Python
    and CPU count only) gets one phrase saying so, and what it has is still
    compared.
    """
    base, this = dict(baseline or {}), dict(run or {})
    out = []
    # Said only when the other side has them: two old blocks just compare what they hold.
    if "cpu_model" not in base and "cpu_model" in this:
        out.append("baseline records no host facts (saved by an older harness)")
    if "cpu_model" not in this and "cpu_model" in base:
        out.append("this run records no host facts")
    # platform.platform() is kernel + C library: with both sides' OS and kernel it only repeats them
    old = "kernel" not in base or "kernel" not in this
    host = [f for f in _HOST_FACTS if f.key != "platform" or old]
    out += [f"{label}: {text}" for label, text in _differing(host, base, this)]
    if isinstance(base.get("gpus"), list) and isinstance(this.get("gpus"), list):
        out += _gpu_differences(base["gpus"], this["gpus"])
    if isinstance(base.get("engine_env"), Mapping) and isinstance(this.get("engine_env"), Mapping):
        out += [f"{label}: {text}" for label, text in _differing(_ENGINE_FACTS, base["engine_env"], this["engine_env"])]
    return out
