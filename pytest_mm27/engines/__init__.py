"""Engines turn a topology into a launch plan: ``vllm`` (real) or ``sim``.

:func:`select_engine` resolves ``--engine auto|vllm|sim`` once, before
anything boots, and returns the human reason shown on the first line of the
run (``"sim (no vLLM/GPUs found: ...)"``). The ``endpoint`` engine (servers
given by URL) is handled by the plugin, not here.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..topology import Topology
from .base import (
    REDACTED,
    Engine,
    EngineOptions,
    LaunchPlan,
    ServerSpec,
    redact_argv,
    redact_env,
    split_devices,
)
from .sim import SimEngine
from .vllm import VllmEngine

__all__ = [
    "ENGINE_CHOICES",
    "REDACTED",
    "Engine",
    "EngineOptions",
    "LaunchPlan",
    "ServerSpec",
    "SimEngine",
    "VllmEngine",
    "get_engine",
    "redact_argv",
    "redact_env",
    "select_engine",
    "split_devices",
]

ENGINE_CHOICES = ("auto", "vllm", "sim")


def get_engine(name: str) -> Engine:
    if name == "vllm":
        return VllmEngine()
    if name == "sim":
        return SimEngine()
    raise ConfigError(f"unknown engine {name!r} (known: vllm, sim)")


def _refuse_excluded(name: str, topology: Topology) -> None:
    if name not in topology.engines:
        raise ConfigError(f"topology {topology.name!r} does not run on the {name} engine "
                          f"(its engines = {list(topology.engines)})", source=str(topology.source),
                          field="engines")


def select_engine(requested: str, topology: Topology, options: EngineOptions) -> tuple[Engine, str]:
    """The engine to boot ``topology`` with, and why it was chosen.

    ``auto`` takes vllm when its command is found and enough GPUs are visible
    (for ``device = "cpu"`` topologies: when vLLM is found), else sim. An
    explicit ``vllm`` that cannot run raises :class:`ConfigError` with the
    reason; so does an engine the topology's ``engines`` list excludes.
    """
    if requested not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {requested!r} (choose one of {', '.join(ENGINE_CHOICES)})",
                          field="--engine")
    vllm, sim = VllmEngine(), SimEngine()
    if requested == "sim":
        _refuse_excluded("sim", topology)
        ok, why = sim.available(options, topology)
        if not ok:
            raise ConfigError(f"--engine sim cannot run topology {topology.name!r}: {why}")
        return sim, "sim (requested with --engine sim)"
    if requested == "vllm":
        _refuse_excluded("vllm", topology)
        ok, why = vllm.available(options, topology)
        if not ok:
            raise ConfigError(f"--engine vllm cannot run topology {topology.name!r}: {why}")
        return vllm, f"vllm ({why})"

    # auto
    if "vllm" in topology.engines:
        ok, why = vllm.available(options, topology)
        if ok:
            return vllm, f"vllm ({why})"
        if "sim" not in topology.engines:
            raise ConfigError(f"topology {topology.name!r} runs only on vllm, which cannot run here: {why}",
                              source=str(topology.source), field="engines")
        ok_sim, why_sim = sim.available(options, topology)
        if not ok_sim:
            raise ConfigError(f"no engine can run topology {topology.name!r}: {why}; and sim: {why_sim}")
        return sim, f"sim (no vLLM/GPUs found: {why}; pass --engine vllm to require real servers)"
    ok_sim, why_sim = sim.available(options, topology)
    if not ok_sim:
        raise ConfigError(f"topology {topology.name!r} runs only on sim, which cannot run: {why_sim}")
    return sim, f"sim (topology {topology.name!r} runs only on the simulator)"
