"""What an engine hands the launcher: a plan of server processes to start.

An engine turns a :class:`~pytest_mm27.catalog.topology.Topology` into a
:class:`LaunchPlan` (argv, environment, port and device set per server). It
boots nothing; :mod:`pytest_mm27.host.launcher` does. Secrets (the API key, env
variables that look like credentials) stay in the plan so the servers get
them, and are masked by every method that produces text for logs or records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

from ..errors import ConfigError
from ..host.plan import HEAD_ADDRESS, HEAD_RPC_PORT, LaunchPlan
from ..secrets import REDACTED, redact_argv, redact_env
from ..catalog.topology import Topology

DeviceKind = Literal["gpu", "cpu"]


@dataclass(frozen=True, repr=False)
class EngineOptions:
    """Settings that come from the user, not from the topology."""

    host: str = "127.0.0.1"
    api_key: str | None = field(default=None, repr=False)
    # How to run vLLM's CLI, e.g. ("/opt/venv/bin/vllm",) or
    # ("/venv/bin/python", "-m", "vllm.entrypoints.cli.main").
    vllm_command: tuple[str, ...] = ("vllm",)
    sim_args: tuple[str, ...] = ()      # extra simulator args, e.g. fault knobs
    seed: int = 0
    fixtures_dir: Path | None = None    # handed to the simulator as MM27_FIXTURES_DIR
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Overrides topology.startup_timeout_s when set.
    startup_timeout_s: float | None = None
    # The endpoint engine's servers (already running; nothing is booted).
    endpoints: tuple[str, ...] = ()
    # The servers go to a Ray cluster: native DP with [placement] nodes > 1 is then
    # planned across nodes (spread_native_dp).
    cluster: bool = False

    def __repr__(self) -> str:
        return (f"EngineOptions(host={self.host!r}, api_key={REDACTED if self.api_key else None!r}, "
                f"vllm_command={self.vllm_command!r}, sim_args={redact_argv(self.sim_args)!r}, seed={self.seed!r}, "
                f"fixtures_dir={self.fixtures_dir!r}, extra_env={redact_env(self.extra_env)!r}, "
                f"startup_timeout_s={self.startup_timeout_s!r})")


class Engine(Protocol):
    """What the harness asks of an engine, in the order it asks: can it run here, what it
    needs (devices, a generated model), its launch plan, its version, and how far its
    numbers are known to be off (the simulator's fit error; None for real servers)."""

    name: str

    def plan(self, topology: Topology, options: EngineOptions, ports: Sequence[int] = (),
             devices: Sequence[tuple[int, ...]] = ()) -> LaunchPlan:
        """``ports``: fixed ports (tests; servers that must sit on known ports); () lets the launcher pick."""
        ...

    def version(self, options: EngineOptions) -> str | None: ...

    def known_error(self, topology: Topology, concurrency: int) -> float | None: ...

    def available(self, options: EngineOptions, topology: Topology | None = None) -> tuple[bool, str]: ...

    def prepare(self, topology: Topology, options: EngineOptions) -> Topology: ...

    def device_kind(self, topology: Topology) -> DeviceKind | None: ...

    def devices_needed(self, topology: Topology) -> int: ...


def check_ports(topology: Topology, engine: str, ports: Sequence[int]) -> list[int]:
    """One port per server; an empty sequence means "launcher picks" (all 0)."""
    n = topology.replicas
    if not ports:
        return [0] * n
    if len(ports) != n:
        raise ConfigError(f"{engine} engine: topology {topology.name!r} starts {n} server(s), "
                          f"got {len(ports)} port(s)")
    for port in ports:
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"{engine} engine: port {port} is out of range")
    if len({p for p in ports if p}) != len([p for p in ports if p]):
        raise ConfigError(f"{engine} engine: the same port is given to two servers: {list(ports)}")
    return [int(p) for p in ports]


def split_devices(topology: Topology, devices: Sequence[int]) -> list[tuple[int, ...]]:
    """Share leased devices out between a topology's servers, in order.

    Replicas get disjoint, equal slices; a native-DP server gets them all.
    With more devices than ``topology.gpus`` (CPU cores), each server gets an
    equal share so every rank can own several cores.
    """
    n = topology.replicas
    devices = list(devices)
    if not devices:
        return [() for _ in range(n)]
    per = len(devices) // n
    if per < topology.gpus_per_server:
        raise ConfigError(f"topology {topology.name!r} needs {topology.gpus} device(s), got {len(devices)}")
    return [tuple(devices[i * per:(i + 1) * per]) for i in range(n)]


def check_devices(topology: Topology, engine: str, devices: Sequence[tuple[int, ...]], *,
                  required: bool, exact: bool) -> list[tuple[int, ...]]:
    n = topology.replicas
    if not devices:
        if required:
            raise ConfigError(f"{engine} engine: topology {topology.name!r} needs device sets for "
                              f"{n} server(s) of {topology.gpus_per_server} each, got none")
        return [() for _ in range(n)]
    if len(devices) != n:
        raise ConfigError(f"{engine} engine: topology {topology.name!r} starts {n} server(s), "
                          f"got {len(devices)} device set(s)")
    seen: set[int] = set()
    for i, devs in enumerate(devices):
        k = topology.gpus_per_server
        if required and (len(devs) < k or (exact and len(devs) != k) or len(devs) % k):
            want = f"exactly {k}" if exact else f"a multiple of {k}"
            raise ConfigError(f"{engine} engine: server {i} of topology {topology.name!r} needs {want} "
                              f"device(s), got {list(devs)}")
        overlap = seen.intersection(devs)
        if overlap:
            raise ConfigError(f"{engine} engine: device(s) {sorted(overlap)} given to two servers")
        seen.update(devs)
    return [tuple(int(d) for d in devs) for devs in devices]


def frozen_env(*layers: Mapping[str, str] | None) -> Mapping[str, str]:
    env: dict[str, str] = {}
    for layer in layers:
        if layer:
            env.update({str(k): str(v) for k, v in layer.items()})
    return MappingProxyType(env)


def server_name(topology: Topology, index: int) -> str:
    return f"{topology.name}-r{index}"


def startup_timeout(topology: Topology, options: EngineOptions, cap: float | None = None) -> float:
    if options.startup_timeout_s is not None:
        return float(options.startup_timeout_s)
    timeout = float(topology.startup_timeout_s)
    return min(timeout, cap) if cap else timeout


def dp_nodes(topology: Topology, options: EngineOptions) -> int:
    """Nodes a native-DP topology spans: its [placement] nodes on a cluster, else one."""
    placement = topology.placement
    if options.cluster and topology.dp_mode == "native" and placement and placement.nodes:
        return placement.nodes
    return 1


def _without(argv: tuple[str, ...], flag: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def spread_native_dp(plan: LaunchPlan, options: EngineOptions) -> LaunchPlan:
    """A one-server native-DP plan spread over the topology's nodes, as vLLM runs it there.

    ``dp_backend = "mp"``: the head (API server and ``dp / nodes`` local ranks)
    on the first node, one ``--headless`` server per other node with its
    ``--data-parallel-start-rank``; all dial the head's DP RPC port.
    ``"ray"``: one command on the head with ``--data-parallel-backend ray``;
    vLLM places the ranks through Ray itself, so the head holds no devices.
    The head's address and port are placeholders the Ray launcher fills in.
    ``executor = "ray"`` adds ``--distributed-executor-backend ray`` to every
    server, which then holds no devices of its own.
    """
    topology = plan.topology
    placement = topology.placement
    if options.cluster and placement is not None and placement.executor == "ray":
        # Each server's TP x PP workers go through Ray, which places them (over nodes if need be).
        servers = tuple(replace(spec, argv=(*spec.argv, "--distributed-executor-backend", "ray"), gpus=(),
                                env={**spec.env, "RAY_ADDRESS": "auto"}) for spec in plan.servers)
        plan = replace(plan, servers=servers)
    nodes = dp_nodes(topology, options)
    if nodes <= 1 or len(plan.servers) != 1:
        return plan
    assert topology.placement is not None
    (single,) = plan.servers
    dp, tp = topology.data_parallel, topology.tensor_parallel
    base = _without(single.argv, "--data-parallel-size")
    if topology.placement.dp_backend == "ray":
        argv = (*base, "--data-parallel-size", str(dp), "--data-parallel-backend", "ray",
                "--data-parallel-address", HEAD_ADDRESS)
        head = replace(single, argv=argv, gpus=(), env={**single.env, "RAY_ADDRESS": "auto"})
        return replace(plan, servers=(head,), endpoints=(head.base_url,))
    local = dp // nodes
    common = ["--data-parallel-size", str(dp), "--data-parallel-size-local", str(local),
              "--data-parallel-address", HEAD_ADDRESS, "--data-parallel-rpc-port", HEAD_RPC_PORT]
    per_node = local * tp
    servers = []
    for k in range(nodes):
        gpus = tuple(range(k * per_node, (k + 1) * per_node))
        if k == 0:
            servers.append(replace(single, argv=(*base, *common), gpus=gpus))
        else:
            argv = (*base, *common, "--headless", "--data-parallel-start-rank", str(k * local))
            servers.append(replace(single, name=f"{topology.name}-rank{k * local}", argv=argv, gpus=gpus,
                                   port=0, serves=False))
    return replace(plan, servers=tuple(servers), endpoints=(servers[0].base_url,))
