"""Engines turn a topology into a launch plan: ``vllm`` (real), ``sim``, or ``endpoint``.

:func:`select_engine` resolves ``--engine auto|vllm|sim|endpoint`` once,
before anything boots, and returns the human reason shown on the first line
of the run (``"sim (no vLLM/GPUs found: ...)"``). ``endpoint`` runs against
servers given by URL: its plan starts no process.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..catalog.topology import Topology
from ..host.plan import LaunchPlan, ServerSpec
from .base import (
    Engine,
    EngineOptions,
    split_devices,
)
from .endpoint import EndpointEngine
from .sim import SimEngine
from .vllm import VllmEngine

__all__ = [
    "ENGINE_CHOICES",
    "Engine",
    "EngineOptions",
    "EndpointEngine",
    "EngineUnavailable",
    "LaunchPlan",
    "ServerSpec",
    "SimEngine",
    "VllmEngine",
    "get_engine",
    "parse_engine",
    "select_engine",
    "split_devices",
]

ENGINES: dict[str, type] = {"vllm": VllmEngine, "sim": SimEngine, "endpoint": EndpointEngine}
ENGINE_CHOICES = ("auto", *ENGINES)


def parse_engine(text: str) -> str:
    """An ``--engine`` value (argparse ``type=``): ``auto`` or one of the engines."""
    if text not in ENGINE_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown engine {text!r}; choose from {', '.join(ENGINE_CHOICES)}")
    return text


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]()
    except KeyError:
        raise ConfigError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})") from None


class EngineUnavailable(ConfigError):
    """No engine that the topology allows can run it here; ``reason`` says why,
    without the topology's name (so several topologies can share one line)."""

    def __init__(self, message: str, reason: str, **where: str | None):
        super().__init__(message, **where)
        self.reason = reason


def _unavailable(topology: Topology, reason: str, *, field: str | None = None,
                 message: str | None = None) -> EngineUnavailable:
    return EngineUnavailable(message or f"topology {topology.name!r} {reason}", reason,
                             source=None if message else str(topology.source), field=field)


def _refuse_excluded(name: str, topology: Topology) -> None:
    if name not in topology.engines:
        raise _unavailable(topology, f"does not run on the {name} engine (its engines = {list(topology.engines)})",
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
    if requested == "endpoint":
        endpoint = get_engine("endpoint")
        ok, why = endpoint.available(options, topology)
        if not ok:
            raise ConfigError(f"--engine endpoint: {why}", field="--endpoint")
        return endpoint, why
    vllm, sim = get_engine("vllm"), get_engine("sim")
    if requested == "sim":
        _refuse_excluded("sim", topology)
        ok, why = sim.available(options, topology)
        if not ok:
            raise _unavailable(topology, f"cannot run on --engine sim: {why}",
                               message=f"--engine sim cannot run topology {topology.name!r}: {why}")
        return sim, "sim (requested with --engine sim)"
    if requested == "vllm":
        _refuse_excluded("vllm", topology)
        ok, why = vllm.available(options, topology)
        if not ok:
            raise _unavailable(topology, f"cannot run on --engine vllm: {why}",
                               message=f"--engine vllm cannot run topology {topology.name!r}: {why}")
        return vllm, f"vllm ({why})"

    # auto
    if "vllm" in topology.engines:
        ok, why = vllm.available(options, topology)
        if ok:
            return vllm, f"vllm ({why})"
        if "sim" not in topology.engines:
            raise _unavailable(topology, f"runs only on vllm, which cannot run here: {why}", field="engines")
        ok_sim, why_sim = sim.available(options, topology)
        if not ok_sim:
            raise _unavailable(topology, f"cannot run on any engine here: vllm: {why}; sim: {why_sim}",
                               message=f"no engine can run topology {topology.name!r}: {why}; and sim: {why_sim}")
        return sim, f"sim (no vLLM/GPUs found: {why}; pass --engine vllm to require real servers)"
    ok_sim, why_sim = sim.available(options, topology)
    if not ok_sim:
        raise _unavailable(topology, f"runs only on sim, which cannot run: {why_sim}",
                           message=f"topology {topology.name!r} runs only on sim, which cannot run: {why_sim}")
    return sim, f"sim (topology {topology.name!r} runs only on the simulator)"
