"""A served deployment as the simulator sees it: hardware, model, TP x DP, limits."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .perf import MemoryFit, PerfModel
from .scheduler import EngineCore
from .specs import Calibration, HardwareProfile, ModelSpec, load_calibration, load_hardware, load_model


@dataclass(frozen=True)
class SimSetup:
    hardware: HardwareProfile
    model: ModelSpec
    calibration: Calibration
    tp: int
    dp: int                          # engines behind this server (native DP) or in the deployment
    max_num_seqs: int
    gpu_memory_utilization: float
    max_model_len: int
    slowdown: float = 1.0

    def perf(self) -> PerfModel:
        return PerfModel(self.hardware, self.model, self.calibration, self.tp, self.slowdown)

    def memory(self) -> MemoryFit:
        return self.perf().memory(self.gpu_memory_utilization)

    def build_engines(self) -> list[EngineCore]:
        """One scheduler per DP rank; refuses, like vLLM, when the model or one request won't fit."""
        perf = self.perf()
        fit = perf.memory(self.gpu_memory_utilization)
        if not fit.fits:
            raise ConfigError(f"{self.model.name} does not fit on {self.hardware.name}: {fit.reason}")
        if fit.kv_tokens < self.max_model_len:
            raise ConfigError(f"KV cache holds {fit.kv_tokens:,} tokens, less than max_model_len "
                              f"{self.max_model_len:,}; lower max_model_len ({fit.reason})")
        cal = self.calibration
        return [EngineCore(i, perf, fit.kv_tokens, self.max_num_seqs, cal.max_num_batched_tokens, cal.block_size)
                for i in range(self.dp)]

    def with_(self, **changes: Any) -> "SimSetup":
        return replace(self, **changes)


def setup_for(hardware: str, model: str, tp: int, dp: int, max_num_seqs: int,
              gpu_memory_utilization: float, max_model_len: int, *, slowdown: float = 1.0,
              calibration: Calibration | None = None, extra_dirs: list[Path] | None = None) -> SimSetup:
    return SimSetup(
        hardware=load_hardware(hardware, extra_dirs),
        model=load_model(model, extra_dirs),
        calibration=calibration or load_calibration(extra_dirs),
        tp=tp, dp=dp, max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, slowdown=slowdown,
    )


def setup_for_topology(topology: Any, *, calibration: Calibration | None = None,
                       extra_dirs: list[Path] | None = None) -> SimSetup:
    """All DP ranks of a topology (native or replicas: the client balances either way)."""
    spec = topology.model.spec
    if not spec:
        raise ConfigError(f"topology {topology.name!r} has no model.spec, so the simulator cannot run it",
                          source=str(getattr(topology, "source", "")), field="model.spec")
    return setup_for(topology.hardware, spec, topology.tensor_parallel, topology.data_parallel,
                     topology.max_num_seqs, topology.gpu_memory_utilization, topology.max_model_len,
                     calibration=calibration, extra_dirs=extra_dirs)
