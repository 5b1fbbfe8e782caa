"""The simulator engine: ``python -m pytest_mm27.sim serve`` per server.

The simulator runs as a child process started by the same launcher as vLLM,
so boot, health, logs, crash and teardown follow the same code paths. It
owns no GPUs; replicas and native DP map to processes exactly as for vLLM.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..catalog.topology import Topology
from ..host.plan import LaunchPlan, ServerSpec, make_base_url
from .base import (
    DeviceKind,
    EngineOptions,
    check_devices,
    check_ports,
    frozen_env,
    server_name,
    spread_native_dp,
    startup_timeout,
)

# The topologies give real-model start-up times (tens of minutes); a simulator
# that has not answered in this long is broken, so fail sooner.
SIM_STARTUP_CAP_S = 120.0

# So the child imports this very checkout even when the package is not installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@functools.cache
def _fit_errors() -> dict[tuple[str, int], float]:
    from ..sim.specs import fit_errors

    return fit_errors()


class SimEngine:
    name = "sim"

    def available(self, options: EngineOptions, topology: Topology | None = None) -> tuple[bool, str]:
        if importlib.util.find_spec("pytest_mm27.sim") is None:
            return False, "the simulator package pytest_mm27.sim is missing"
        if topology is not None and not topology.model.spec:
            return False, f"topology {topology.name!r} has no model.spec for the simulator"
        return True, "built-in simulator"

    def version(self, options: EngineOptions) -> str:
        try:
            from .. import sim

            return str(getattr(sim, "__version__", __version__))
        except Exception:
            return __version__

    def prepare(self, topology: Topology, options: EngineOptions) -> Topology:
        return topology

    def device_kind(self, topology: Topology) -> DeviceKind | None:
        return None

    def devices_needed(self, topology: Topology) -> int:
        return 0

    def known_error(self, topology: Topology, concurrency: int) -> float | None:
        """The simulator's calibration error at this published point (predicted / published - 1)."""
        return _fit_errors().get((topology.name, concurrency))

    def plan(self, topology: Topology, options: EngineOptions, ports: Sequence[int] = (),
             devices: Sequence[tuple[int, ...]] = ()) -> LaunchPlan:
        if "sim" not in topology.engines:
            raise ConfigError(f"topology {topology.name!r} does not run on the sim engine "
                              f"(engines = {list(topology.engines)})", source=str(topology.source))
        if not topology.model.spec:
            raise ConfigError("is required when the topology runs on the sim engine",
                              source=str(topology.source), field="model.spec")
        ports = check_ports(topology, self.name, ports)
        devices = check_devices(topology, self.name, devices, required=False, exact=False)
        dp_per_server = topology.data_parallel if topology.dp_mode == "native" else 1
        served = topology.model.served_name
        pythonpath = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = frozen_env(
            topology.env,
            topology.engine_env.get("sim"),
            options.extra_env,
            {"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"},
            {"MM27_FIXTURES_DIR": str(options.fixtures_dir)} if options.fixtures_dir else None,
        )
        servers = []
        for i, (port, devs) in enumerate(zip(ports, devices, strict=True)):
            argv = [
                sys.executable, "-m", "pytest_mm27.sim", "serve",
                "--host", options.host, "--port", str(port),
                "--served-model-name", served,
                "--hardware", topology.hardware,
                "--model", topology.model.spec,
                "--tensor-parallel-size", str(topology.tensor_parallel),
                *(["--pipeline-parallel-size", str(topology.pipeline_parallel)] if topology.pipeline_parallel > 1
                  else []),
                "--data-parallel-size", str(dp_per_server),
                *(["--api-server-count", str(topology.api_server_count)] if topology.api_server_count else []),
                "--max-num-seqs", str(topology.max_num_seqs),
                "--max-model-len", str(topology.max_model_len),
                "--gpu-memory-utilization", str(topology.gpu_memory_utilization),
                "--seed", str(options.seed + i),
                *(["--api-key", options.api_key] if options.api_key else []),
                *options.sim_args,
            ]
            servers.append(ServerSpec(
                name=server_name(topology, i), argv=tuple(argv), env=env, host=options.host,
                port=port, gpus=devs, base_url=make_base_url(options.host, port), api_key=options.api_key,
            ))
        return spread_native_dp(LaunchPlan(
            topology=topology, engine=self.name, servers=tuple(servers),
            endpoints=tuple(s.base_url for s in servers), model=served,
            startup_timeout_s=startup_timeout(topology, options, cap=SIM_STARTUP_CAP_S),
        ), options)
