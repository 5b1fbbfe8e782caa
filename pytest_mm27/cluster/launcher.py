"""Boot a launch plan on a Ray cluster: the local launcher's interface, servers on the cluster's nodes.

Replica mode: one placement group per server (its devices in one bundle, so
on one node), servers spread over nodes (:mod:`.placement`), one
:class:`~.actor.ServerActor` per server started in its group; the actor
starts the server under a keeper (:mod:`.keeper`) on its node, binding the
node's address. The driver (this process) waits on ``/health`` and
``/v1/models`` over the network exactly as the local launcher does, with the
same start-up timeout and fail-fast log tail; logs are copied from the nodes
into the run folder as they grow. Devices come from Ray's resources; nothing
is leased on this host. Teardown stops each server from its node, checks
there that nothing of it is left, then kills the actors, removes the groups
and checks that no actor of ours is alive.

A node that goes away (its raylet, its actors, its servers) is
:class:`~pytest_mm27.errors.NodeLost`; a placement the cluster cannot hold
is :class:`~pytest_mm27.errors.PlacementUnsatisfiable`, raised before any
group or actor exists.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..catalog.topology import Placement
from ..errors import LaunchError, Mm27Error, NodeLost, PlacementUnsatisfiable
from ..host import exits, probe
from ..host.launcher import ADDR_IN_USE_RE, DEFAULT_GRACE_S, POLL_INTERVAL_S, TeardownReport, _model_ids
from ..host.plan import HEAD_ADDRESS, HEAD_RPC_PORT, LaunchPlan, ServerSpec, make_base_url
from ..host.serverlog import LOG_TAIL_LINES, open_log, read_log_tail
from . import connect
from .actor import NODE_PYTHON, ServerActor
from .placement import NodeCapacity, ServerDemand, assign

BootProgress = Callable[[float, float, str], None]

__all__ = ["RayLauncher", "cluster_nodes"]

CALL_TIMEOUT_S = 30.0           # an actor that does not answer a status call in this long is lost
READY_TIMEOUT_S = 60.0          # placement groups reserved in this long, or refused
NODE_DEATH_WAIT_S = 30.0        # for the cluster to mark a node dead after its actor died
GONE_WAIT_S = 20.0              # for killed actors to leave the cluster's table
LOG_PULL_S = 1.0
BUSY_WAIT_S = 15.0              # for busy resources to be freed before a placement that fits is refused
NO_DEVICE_CPU = 0.01            # what a server holding no devices reserves: a bundle cannot be empty


@dataclass
class _Server:
    spec: ServerSpec
    demand: ServerDemand
    log_path: Path
    picked_port: bool
    node: NodeCapacity | None = None
    pg: Any = None
    actor: Any = None
    actor_name: str = ""
    info: dict[str, Any] | None = None
    started_at: float = 0.0
    healthy: bool = False
    last_probe: str = "not probed yet"
    retried: bool = False
    log_offset: int = 0
    lost: str | None = None     # why the actor cannot be reached (its node is gone)

    @property
    def where(self) -> str:
        node = self.node
        return f"node {node.short_id} ({node.address})" if node else "no node"


def cluster_nodes(ray: Any) -> list[NodeCapacity]:
    """The cluster's nodes with their total and free resources, in the cluster's order."""
    free_by_node: dict[str, dict[str, float]] = {}
    try:
        from ray._private import state      # free resources per node: no public API without the dashboard

        free_by_node = dict(state.available_resources_per_node())
    except Exception:
        free_by_node = {}
    nodes = []
    for node in ray.nodes():
        total = {k: float(v) for k, v in node.get("Resources", {}).items()}
        nodes.append(NodeCapacity(node_id=node["NodeID"], address=node.get("NodeManagerAddress", "?"),
                                  total=total, free=free_by_node.get(node["NodeID"], total),
                                  alive=bool(node.get("Alive"))))
    return nodes


def node_alive(ray: Any, node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


class RayLauncher:
    """Boots a :class:`LaunchPlan` on the Ray cluster at ``address``; same calls as the local launcher."""

    def __init__(self, plan: LaunchPlan, log_dir: Path, address: str, *, run_id: str = "run",
                 placement: Placement | None = None, grace_s: float = DEFAULT_GRACE_S,
                 ready_timeout_s: float = READY_TIMEOUT_S):
        self.plan = plan
        self.log_dir = Path(log_dir)
        self.address = address
        self.run_id = run_id
        self.placement = placement or plan.topology.placement or Placement()
        self.grace_s = grace_s
        self.ready_timeout_s = ready_timeout_s
        self.teardown: TeardownReport | None = None
        self._servers: list[_Server] = []
        self._ray: Any = None
        self._started = False
        self._stopping = False

    # -- public ------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.plan.endpoints

    @property
    def log_paths(self) -> dict[str, Path]:
        return {s.spec.name: s.log_path for s in self._servers}

    @property
    def pids(self) -> dict[str, int]:
        """Empty: the servers' pids are on other nodes and mean nothing to this host's samplers."""
        return {}

    @property
    def nodes(self) -> dict[str, str]:
        """Each server's node, as ``node-id-prefix (address)``."""
        return {s.spec.name: s.where for s in self._servers}

    def placement_record(self) -> list[dict[str, Any]]:
        """Where each server ran: for the run record."""
        return [{"server": s.spec.name, "node_id": s.node.node_id if s.node else None,
                 "address": s.node.address if s.node else None,
                 "devices": (s.info or {}).get("gpus", []), "actor": s.actor_name,
                 "pid": (s.info or {}).get("keeper_pid")} for s in self._servers]

    def __enter__(self) -> RayLauncher:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def launch(self) -> RayLauncher:
        try:
            self.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def start(self) -> None:
        """Check the placement against the cluster, reserve it, and start every server (no health wait)."""
        if self._started:
            raise LaunchError("this launcher was already started; make a new one")
        self._started = True
        self._ray = connect.connect(self.address)
        exits.track(self)
        try:
            self._start()
        except Mm27Error:
            self.stop()
            raise
        except Exception as exc:        # Ray's own errors: an actor that could not start, a call timed out
            self.stop()
            raise LaunchError(f"starting topology {self.plan.topology.name!r} on the Ray cluster at "
                              f"{self.address!r} failed: {type(exc).__name__}: {str(exc).strip()[:2000]}\n"
                              "(every node needs pytest-mm27, at this version, importable by its Ray workers)"
                              ) from None
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, progress: BootProgress | None = None) -> None:
        if not self._started:
            raise LaunchError("start() the launcher before waiting for it")
        try:
            self._wait_healthy(progress)
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        """Raise :class:`NodeLost` if a server's node went away, :class:`LaunchError` if a server died."""
        dead = []
        for server in self._servers:
            code = self._status(server)
            if code is not None:
                dead.append(self._death_text(server, code, during="while serving"))
        if dead:
            raise LaunchError("\n\n".join(dead))

    def stop(self) -> TeardownReport:
        """Stop every server from its node, then the actors and the groups; idempotent."""
        if self.teardown is not None:
            return self.teardown
        if self._stopping:
            return TeardownReport(errors=("teardown already in progress",))
        self._stopping = True
        t0 = time.monotonic()
        try:
            report = self._stop()
        except BaseException as exc:
            report = TeardownReport(errors=(f"teardown failed: {exc!r}",))
            if not isinstance(exc, Exception):
                raise
        finally:
            exits.untrack(self)
            self._stopping = False
            if self._ray is not None:
                connect.disconnect()
        report.seconds = time.monotonic() - t0
        self.teardown = report
        return report

    # -- start ---------------------------------------------------------------

    def _log_path(self, name: str) -> Path:
        path, n = self.log_dir / f"{name}.log", 1
        while path.exists():
            n += 1
            path = self.log_dir / f"{name}.{n}.log"
        return path

    def _start(self) -> None:
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.log_dir.mkdir(parents=True, exist_ok=True)
        resource = self.placement.resource
        for spec in self.plan.servers:
            # A server's devices: those its plan gives it (a DP head's or rank's node share), else the
            # topology's per-server count; a head that leaves its ranks to Ray holds none.
            holds_none = not spec.gpus and any(
                flag in spec.argv and spec.argv[spec.argv.index(flag) + 1] == "ray"
                for flag in ("--data-parallel-backend", "--distributed-executor-backend"))
            count = 0 if holds_none else (len(spec.gpus) or max(1, self.plan.topology.gpus_per_server))
            demand = ServerDemand(spec.name, count)
            self._servers.append(_Server(spec=spec, demand=demand, log_path=self._log_path(spec.name),
                                         picked_port=spec.port == 0))
        # Refused here, before any group or actor exists.
        nodes, chosen = self._assign()
        target = _soft_target(placement_group)
        for server, node in zip(self._servers, chosen, strict=True):
            server.pg = placement_group([_bundle(resource, server.demand.devices)], strategy="STRICT_PACK",
                                        name=f"mm27-{self.run_id}-{server.spec.name}",
                                        **({target: node.node_id} if target else {}))
        ready = [s.pg.ready() for s in self._servers]
        done, waiting = ray.wait(ready, num_returns=len(ready), timeout=self.ready_timeout_s)
        if waiting:
            raise PlacementUnsatisfiable(
                f"{len(waiting)} of {len(ready)} placement group(s) of topology {self.plan.topology.name!r} not "
                f"reserved after {self.ready_timeout_s:g} s (the cluster's resources were taken meanwhile?). "
                f"The cluster has: {'; '.join(n.describe(resource) for n in cluster_nodes(ray))}")
        by_id = {n.node_id: n for n in nodes}
        remote = ray.remote(ServerActor)
        for server in self._servers:
            server.actor_name = f"mm27-{self.run_id}-{server.spec.name}"
            devices = float(server.demand.devices)
            gpu = ({"num_gpus": devices} if resource == "GPU" else {"resources": {resource: devices}}) \
                if devices else {"num_cpus": NO_DEVICE_CPU}
            server.actor = remote.options(
                name=server.actor_name, namespace=connect.NAMESPACE, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(server.pg, placement_group_bundle_index=0),
                **{"num_cpus": 0, **gpu},
            ).remote(server.spec.name)
        infos = ray.get([s.actor.info.remote() for s in self._servers], timeout=CALL_TIMEOUT_S * 2)
        for i, (server, info) in enumerate(zip(self._servers, infos, strict=True)):
            server.info = info
            server.node = by_id.get(info["node_id"]) or NodeCapacity(info["node_id"], info["address"])
            self._place(i, server)
        self._fill_head()
        for server in self._servers:
            self._spawn(server, retry=False)

    def _fill_head(self) -> None:
        """Write the head's address and a DP RPC port free on its node into every server's argv."""
        if not any(HEAD_ADDRESS in s.spec.argv or HEAD_RPC_PORT in s.spec.argv for s in self._servers):
            return
        head = self._servers[0]
        assert head.node is not None
        rpc_port = self._ray.get(head.actor.free_port.remote(head.node.address, [head.spec.port]),
                                 timeout=CALL_TIMEOUT_S)
        values = {HEAD_ADDRESS: head.node.address, HEAD_RPC_PORT: str(rpc_port)}
        for i, server in enumerate(self._servers):
            server.spec = replace(server.spec, argv=tuple(values.get(a, a) for a in server.spec.argv))
            self.plan = self.plan.with_server(i, server.spec)

    def _assign(self) -> tuple[list[NodeCapacity], list[NodeCapacity]]:
        """The cluster's nodes and each server's node. A placement that fits the cluster's totals but
        not what is free now waits a little (a teardown just before frees resources a moment later);
        one that cannot fit the totals is refused at once."""
        name, demands = self.plan.topology.name, [s.demand for s in self._servers]
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            nodes = cluster_nodes(self._ray)
            try:
                return nodes, assign(name, demands, nodes, self.placement)
            except PlacementUnsatisfiable:
                idle = [replace(n, free=n.total) for n in nodes]
                assign(name, demands, idle, self.placement)     # raises: it can never fit
                if time.monotonic() >= deadline:
                    raise
            time.sleep(POLL_INTERVAL_S * 2)

    def _place(self, index: int, server: _Server) -> None:
        """The spec on the actor's node: bind its address, a port free there, the devices Ray gave."""
        assert server.node is not None and server.info is not None
        spec = _on_host(server.spec, server.node.address)
        port = spec.port
        if server.picked_port:
            taken = [s.spec.port for s in self._servers if s is not server and s.node and
                     s.node.address == server.node.address]
            port = self._ray.get(server.actor.free_port.remote(spec.host, taken), timeout=CALL_TIMEOUT_S)
        spec = spec.with_port(port)
        gpus = tuple(server.info.get("gpus") or ())
        env = dict(spec.env)
        if "CUDA_VISIBLE_DEVICES" in env:
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
            else:               # a head that leaves its ranks to Ray: they get theirs from Ray
                del env["CUDA_VISIBLE_DEVICES"]
        spec = replace(spec, gpus=gpus, env=env)
        server.spec = spec
        self.plan = self.plan.with_server(index, spec)

    def _spawn(self, server: _Server, *, retry: bool) -> None:
        spec = server.spec
        argv = [NODE_PYTHON if a == sys.executable else a for a in spec.argv]
        with open_log(server.log_path, spec, self.plan, None, retry=retry) as fh:
            fh.write(f"# mm27: ray {server.where}, actor {server.actor_name}\n")
        pid = self._ray.get(server.actor.start.remote(argv, dict(spec.env), spec.private_tmp, retry),
                            timeout=CALL_TIMEOUT_S)
        assert server.info is not None
        server.info["keeper_pid"] = pid
        server.started_at = time.monotonic()
        server.healthy = False
        server.last_probe = "not probed yet"

    # -- watching ------------------------------------------------------------

    def _pull_log(self, server: _Server) -> None:
        """Copy what the node's log gained since the last pull into the run folder."""
        if server.actor is None or server.lost:
            return
        try:
            while True:
                data = self._ray.get(server.actor.read_log.remote(server.log_offset), timeout=CALL_TIMEOUT_S)
                if not data:
                    return
                with server.log_path.open("ab") as fh:
                    fh.write(data)
                server.log_offset += len(data)
        except Exception as exc:
            self._lost(server, exc)

    def _status(self, server: _Server) -> int | None:
        """The server's exit status; raises :class:`NodeLost` when its actor cannot be reached."""
        if server.actor is None:
            return None
        if server.lost is None:
            try:
                code = self._ray.get(server.actor.status.remote(), timeout=CALL_TIMEOUT_S)
            except Exception as exc:
                self._lost(server, exc)
            else:
                if code is not None:
                    self._pull_log(server)
                return code
        raise self._node_lost(server)

    def _lost(self, server: _Server, exc: BaseException) -> None:
        server.lost = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"

    def _node_lost(self, server: _Server) -> LaunchError:
        node_id = server.node.node_id if server.node else "?"
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        alive = node_alive(self._ray, node_id)
        while alive and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S * 5)
            alive = node_alive(self._ray, node_id)
        on_node = tuple(s.spec.name for s in self._servers if s.node and s.node.node_id == node_id)
        tail = (f"--- last {LOG_TAIL_LINES} lines of {server.log_path} (as copied before the loss) ---\n"
                f"{read_log_tail(server.log_path)}")
        if alive:
            return LaunchError(f"server {server.spec.name}: its actor on {server.where} cannot be reached "
                               f"({server.lost}) although the node is alive\n{tail}")
        for other in self._servers:
            if other.node and other.node.node_id == node_id and other.lost is None:
                other.lost = "its node is gone"
        return NodeLost(f"{server.where} was lost (its raylet is gone) with server(s) {', '.join(on_node)}: "
                        f"they are gone with it; {server.lost}\n{tail}", node=node_id, servers=on_node)

    def _wait_healthy(self, progress: BootProgress | None) -> None:
        timeout = self.plan.startup_timeout_s
        started = time.monotonic()
        deadline = started + timeout
        last_pull = 0.0
        while True:
            now = time.monotonic()
            if now - last_pull >= LOG_PULL_S:
                last_pull = now
                for server in self._servers:
                    self._pull_log(server)
                waiting = next((s for s in self._servers if not s.healthy), None)
                if progress is not None and waiting is not None:
                    last = read_log_tail(waiting.log_path, 1).strip().splitlines()
                    progress(now - started, timeout, last[-1] if last else "")
            for i, server in enumerate(self._servers):
                code = self._status(server)
                if code is not None:
                    self._exited(i, server, code)
                elif not server.healthy:
                    self._probe(server)
            if all(s.healthy for s in self._servers):
                return
            if time.monotonic() >= deadline:
                for server in self._servers:
                    self._pull_log(server)
                raise LaunchError(self._timeout_text(timeout))
            time.sleep(POLL_INTERVAL_S)

    def _exited(self, index: int, server: _Server, code: int) -> None:
        tail = read_log_tail(server.log_path, 200)
        if server.picked_port and not server.retried and not server.healthy and ADDR_IN_USE_RE.search(tail):
            server.retried = True           # the port was taken between the pick and the bind
            self._ray.get(server.actor.kill_now.remote(), timeout=CALL_TIMEOUT_S)
            self._place(index, server)      # picks another port on the node
            self._spawn(server, retry=True)
            return
        raise LaunchError(self._death_text(server, code, during="during start-up"))

    def _probe(self, server: _Server) -> None:
        spec = server.spec
        if not spec.serves:         # a headless rank: no HTTP; alive is all it can be
            server.healthy, server.last_probe = True, "running (serves no HTTP)"
            return
        health = probe.get(spec.base_url + "/health")
        if health.status != 200:
            server.last_probe = f"GET /health: {health.why}"
            return
        models = probe.get(spec.base_url + "/v1/models", spec.api_key)
        if models.status in (401, 403):
            raise LaunchError(f"server {spec.name} refused GET /v1/models with HTTP {models.status}: "
                              f"the API key the harness sends does not match the server's")
        if models.status != 200:
            server.last_probe = f"GET /v1/models: {models.why}"
            return
        served = _model_ids(models.body)
        if self.plan.model and served is not None and self.plan.model not in served:
            raise LaunchError(f"server {spec.name} is up but does not serve model {self.plan.model!r} "
                              f"(it serves: {', '.join(served) or 'nothing'}); check served_name")
        server.healthy = True
        server.last_probe = "healthy"

    def _death_text(self, server: _Server, code: int, *, during: str) -> str:
        from ..host.processes import exit_text

        age = time.monotonic() - server.started_at
        return (f"server {server.spec.name} on {server.where} exited {during} ({exit_text(code)}, "
                f"{age:.1f} s after start)\ncommand: {server.spec.command_line()}\n"
                f"--- last {LOG_TAIL_LINES} lines of {server.log_path} ---\n{read_log_tail(server.log_path)}")

    def _timeout_text(self, timeout: float) -> str:
        waiting = [s for s in self._servers if not s.healthy]
        names = ", ".join(f"{s.spec.name} on {s.where} ({s.last_probe})" for s in waiting)
        parts = [f"{len(waiting)} of {len(self._servers)} server(s) not healthy after the {timeout:g} s "
                 f"start-up timeout: {names}"]
        for s in waiting:
            parts.append(f"--- {s.spec.name}: last {LOG_TAIL_LINES} lines of {s.log_path} ---\n"
                         f"{read_log_tail(s.log_path)}")
        parts.append("(raise startup_timeout_s in the topology if the model just needs longer to load)")
        return "\n".join(parts)

    # -- stop ------------------------------------------------------------------

    def _stop(self) -> TeardownReport:
        ray = self._ray
        leftovers: list[str] = []
        killed: list[str] = []
        removed: list[str] = []
        errors: list[str] = []
        exit_codes: dict[str, int | None] = {}
        reachable = [s for s in self._servers if s.actor is not None and s.lost is None]
        for server in reachable:
            self._pull_log(server)
        # Every node stops its server at once; each answers with what it left.
        calls = {s.spec.name: (s, s.actor.stop.remote(self.grace_s)) for s in reachable if s.lost is None}
        for name, (server, ref) in calls.items():
            try:
                result = ray.get(ref, timeout=self.grace_s + 30.0)
            except Exception as exc:
                self._lost(server, exc)
                errors.append(f"{name}: could not be stopped from {server.where}: {server.lost}")
                continue
            exit_codes[name] = result["exit_code"]
            if result["killed"]:
                killed.append(name)
            leftovers += [f"{name} on {server.where}: {left}" for left in result["leftovers"]]
            removed += result["removed"]
            errors += [f"{name}: {e}" for e in result["errors"]]
            self._pull_log(server)
            try:
                ray.get(server.actor.close.remote(), timeout=CALL_TIMEOUT_S)
            except Exception as exc:
                errors.append(f"{name}: its folder on {server.where} was not removed: {exc}")
        for server in self._servers:
            if server.lost:
                # The node took its processes with it; there is nothing left to ask.
                errors.append(f"{server.spec.name}: {server.where} unreachable at teardown ({server.lost}); "
                              "its processes went with the node")
        leftovers += self._remove_actors_and_groups(errors)
        return TeardownReport(leftovers=tuple(leftovers), killed=tuple(killed), exit_codes=exit_codes,
                              removed=tuple(removed), errors=tuple(errors))

    def _remove_actors_and_groups(self, errors: list[str]) -> list[str]:
        """Kill the actors, remove the groups, and name any that are still there after a wait."""
        if self._ray is None:
            return []
        ray = self._ray
        from ray.util.placement_group import placement_group_table, remove_placement_group

        for server in self._servers:
            if server.actor is not None:
                try:
                    ray.kill(server.actor, no_restart=True)
                except Exception as exc:
                    errors.append(f"{server.spec.name}: killing actor {server.actor_name}: {exc}")
            if server.pg is not None:
                try:
                    remove_placement_group(server.pg)
                except Exception as exc:
                    errors.append(f"{server.spec.name}: removing its placement group: {exc}")
        names = {s.actor_name for s in self._servers if s.actor is not None}
        deadline = time.monotonic() + GONE_WAIT_S
        while True:
            alive = names & live_actor_names(ray)
            groups = [s for s in self._servers if s.pg is not None
                      and placement_group_table(s.pg).get("state") not in ("REMOVED", None)]
            if (not alive and not groups) or time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        return [f"actor {name}: still alive" for name in sorted(alive)] + \
            [f"placement group of {s.spec.name}: {placement_group_table(s.pg).get('state')}" for s in groups]


def _bundle(resource: str, devices: int) -> dict[str, float]:
    return {resource: float(devices)} if devices else {"CPU": NO_DEVICE_CPU}


def _soft_target(placement_group: Any) -> str | None:
    """The keyword that asks for a group on a given node, where this Ray has one."""
    import inspect

    name = "_soft_target_node_id"
    return name if name in inspect.signature(placement_group).parameters else None


def live_actor_names(ray: Any) -> set[str]:
    """Names of the live named actors in the harness's namespace."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == connect.NAMESPACE}


def _on_host(spec: ServerSpec, host: str) -> ServerSpec:
    """The same server bound to ``host`` (``--host`` in argv and the base URL)."""
    argv = list(spec.argv)
    for i, arg in enumerate(argv):
        if arg == "--host" and i + 1 < len(argv):
            argv[i + 1] = host
        elif arg.startswith("--host="):
            argv[i] = f"--host={host}"
    return replace(spec, argv=tuple(argv), host=host, base_url=make_base_url(host, spec.port))

