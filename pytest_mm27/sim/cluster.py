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
    # Front end: API server processes per server; "native" DP puts every engine
    # behind one server, "replicas" gives each engine its own.
    api_server_count: int = 1
    dp_mode: str = "native"
    pp: int = 1                      # pipeline stages per engine (each of TP GPUs)
    gpus_per_node: int | None = None # None: every GPU in one box

    def placement(self) -> tuple[int, int]:
        """(pipeline boundaries over the network, GPUs per node sharing the network for TP, 0 if
        none) of the worst engine, engines and stages laid out on consecutive GPUs, node after node."""
        g = self.gpus_per_node
        if g is None:
            return 0, 0
        tp_cross = g if self.tp > g else 0
        worst = 0
        for replica in range(self.dp):
            base = replica * self.tp * self.pp
            hops = sum((base + s * self.tp) // g != (base + (s - 1) * self.tp) // g for s in range(1, self.pp))
            worst = max(worst, hops)
        return worst, tp_cross

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def api_processes(self) -> int:
        servers = self.dp if self.dp_mode == "replicas" else 1
        return servers * self.api_server_count

    def api_process_for(self, engine: int, request: int) -> int:
        """Which API process streams a request served by ``engine`` (round-robin within a server)."""
        server = engine // self.pp if self.dp_mode == "replicas" else 0
        return server * self.api_server_count + request % self.api_server_count

    def perf(self) -> PerfModel:
        hops, tp_cross = self.placement()
        return PerfModel(self.hardware, self.model, self.calibration, self.tp, self.slowdown,
                         pp=self.pp, net_hops=hops, tp_over_network=tp_cross)

    def memory(self) -> MemoryFit:
        return self.perf().memory(self.gpu_memory_utilization)

    def build_engines(self) -> list[EngineCore]:
        """One scheduler per DP rank and pipeline micro-batch; refuses, like vLLM, when the model
        or one request won't fit.

        vLLM keeps PP micro-batches in flight at once, each passing every stage:
        a PP=p engine runs as p schedulers sharing its KV cache and max_num_seqs
        (split evenly), each step costing the whole model's time plus the hops.
        """
        perf = self.perf()
        fit = perf.memory(self.gpu_memory_utilization)
        if not fit.fits:
            raise ConfigError(f"{self.model.name} does not fit on {self.hardware.name}: {fit.reason}")
        if fit.kv_tokens < self.max_model_len:
            raise ConfigError(f"KV cache holds {fit.kv_tokens:,} tokens, less than max_model_len "
                              f"{self.max_model_len:,}; lower max_model_len ({fit.reason})")
        cal = self.calibration
        pp = self.pp
        return [EngineCore(i, perf, fit.kv_tokens // pp, max(1, self.max_num_seqs // pp),
                           cal.max_num_batched_tokens, cal.block_size)
                for i in range(self.dp * pp)]

    def with_(self, **changes: Any) -> "SimSetup":
        return replace(self, **changes)


def setup_for(hardware: str, model: str, tp: int, dp: int, max_num_seqs: int,
              gpu_memory_utilization: float, max_model_len: int, *, slowdown: float = 1.0,
              calibration: Calibration | None = None, extra_dirs: list[Path] | None = None,
              api_server_count: int = 1, dp_mode: str = "native", pp: int = 1,
              gpus_per_node: int | None = None) -> SimSetup:
    return SimSetup(
        hardware=load_hardware(hardware, extra_dirs),
        model=load_model(model, extra_dirs),
        calibration=calibration or load_calibration(extra_dirs),
        tp=tp, dp=dp, max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, slowdown=slowdown,
        api_server_count=api_server_count, dp_mode=dp_mode, pp=pp, gpus_per_node=gpus_per_node,
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
                     calibration=calibration, extra_dirs=extra_dirs,
                     api_server_count=topology.api_server_count or 1, dp_mode=topology.dp_mode)
