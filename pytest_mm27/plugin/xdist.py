"""One topology per pytest-xdist worker, whatever the pytest version.

Imported only when pytest-xdist is installed (the plugin asks for it from
``pytest_xdist_make_scheduler``). xdist's loadgroup mode groups tests by an
``@group`` suffix its workers write into node ids; pytest 9.2 made node ids
structured, that write no longer takes effect, and loadgroup silently
degrades to plain load (pytest-dev/pytest-xdist#1386). A topology's levels
spread over workers would boot it once per worker on the same GPUs. So the
group of a level is read from what the node id already says: its parameter
id ``<topology>-c<concurrency>`` (the suite's levels) or ``<topology>`` (a
test taking the ``mm27_topology`` fixture).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from xdist.scheduler import LoadGroupScheduling


def topology_of(nodeid: str, topologies: Iterable[str]) -> str | None:
    """The topology ``nodeid`` runs, from its ``[<topology>-c<N>]`` or ``[<topology>]`` parameter id."""
    open_at, close_at = nodeid.find("["), nodeid.rfind("]")
    if open_at < 0 or close_at < open_at:
        return None
    params = nodeid[open_at + 1:close_at]
    for name in sorted(topologies, key=len, reverse=True):      # "tp4-fp8" before "tp4"
        if re.search(rf"(?:^|-){re.escape(name)}(?:-c\d+)?(?:-|$)", params):
            return name
    return None


class TopologyScheduling(LoadGroupScheduling):
    """loadgroup scheduling in which each topology's levels form one group."""

    def __init__(self, config: Any, log: Any = None, topologies: Iterable[str] = ()):
        super().__init__(config, log)
        self.topologies = tuple(topologies)

    def _split_scope(self, nodeid: str) -> str:
        name = topology_of(nodeid, self.topologies)
        return f"mm27 topology {name}" if name else super()._split_scope(nodeid)
