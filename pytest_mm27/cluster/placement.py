"""Which node each server goes to, decided from the cluster's nodes before anything boots.

Pure (no Ray): the launcher hands in the nodes it read from the cluster. A
server needs its devices on one node (its TP GPUs, one placement-group
bundle); servers are spread, one per node while nodes last, then round
robin over the nodes used. A placement that cannot fit is refused with what
the cluster has, node by node, so the reader sees why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..catalog.topology import Placement
from ..errors import PlacementUnsatisfiable


@dataclass(frozen=True)
class NodeCapacity:
    """One cluster node as the placement sees it."""

    node_id: str
    address: str                                    # the node's IP: servers bind it, clients dial it
    total: Mapping[str, float] = field(default_factory=dict)
    free: Mapping[str, float] = field(default_factory=dict)
    alive: bool = True

    @property
    def short_id(self) -> str:
        return self.node_id[:8]

    def describe(self, resource: str) -> str:
        if not self.alive:
            return f"node {self.short_id} ({self.address}): dead"
        total = self.total.get(resource, 0.0)
        have = f"{resource} {_num(self.free.get(resource, 0.0))} free of {_num(total)}" if total else f"no {resource}"
        return f"node {self.short_id} ({self.address}): {have}, CPU {_num(self.total.get('CPU', 0.0))}"


@dataclass(frozen=True)
class ServerDemand:
    name: str
    devices: int                                    # of placement.resource, all on one node


def assign(topology_name: str, demands: Sequence[ServerDemand], nodes: Sequence[NodeCapacity],
           placement: Placement) -> list[NodeCapacity]:
    """The node for each demand, in order; :class:`PlacementUnsatisfiable` when they do not fit."""
    resource = placement.resource
    usable = [n for n in nodes if n.alive
              and (placement.gpus_per_node is None or n.total.get(resource, 0.0) >= placement.gpus_per_node)]
    free = {n.node_id: float(n.free.get(resource, 0.0)) for n in usable}
    count = {n.node_id: 0 for n in usable}
    order = {n.node_id: i for i, n in enumerate(usable)}
    used: list[str] = []
    chosen: list[NodeCapacity] = []
    for demand in demands:
        pool = [n for n in usable if free[n.node_id] >= demand.devices]
        if placement.nodes is not None and len(used) >= placement.nodes:
            pool = [n for n in pool if n.node_id in used]
        if not pool:
            raise PlacementUnsatisfiable(_refusal(topology_name, demands, nodes, placement, chosen))
        # Fewest servers first (spread), then the most room left, then the cluster's order.
        node = min(pool, key=lambda n: (count[n.node_id], -free[n.node_id], order[n.node_id]))
        free[node.node_id] -= demand.devices
        count[node.node_id] += 1
        if node.node_id not in used:
            used.append(node.node_id)
        chosen.append(node)
    if placement.nodes is not None and len(used) < placement.nodes:
        raise PlacementUnsatisfiable(_refusal(topology_name, demands, nodes, placement, chosen))
    return chosen


def _refusal(topology_name: str, demands: Sequence[ServerDemand], nodes: Sequence[NodeCapacity],
             placement: Placement, placed: Sequence[NodeCapacity]) -> str:
    resource = placement.resource
    sizes = sorted({d.devices for d in demands})
    each = f"{sizes[0]} {resource} each" if len(sizes) == 1 else f"{'/'.join(map(str, sizes))} {resource}"
    want = f"{len(demands)} server(s) of {each}, each on one node"
    if placement.nodes is not None:
        want += f", spread over {placement.nodes} node(s)"
    if placement.gpus_per_node is not None:
        want += f" offering at least {placement.gpus_per_node} {resource}"
    has = "; ".join(n.describe(resource) for n in nodes) or "no nodes"
    return (f"placement of topology {topology_name!r} cannot be satisfied: it needs {want} "
            f"(only {len(placed)} placed). The cluster has: {has}. Nothing was started.")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
