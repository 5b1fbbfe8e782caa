"""Catalog files for driving the plugin on the simulator: for tests and benchmarks.

The harness's own tests and the fault suite write throwaway topologies and
floors into a scratch folder and run pytest on them; these builders keep that
file shape in one place, so a catalog schema change is made once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Same model spec and TP as the reference topologies, so the simulator's step
# times are the calibrated ones; a short start-up timeout for fast failures.
_TOPOLOGY = """\
name = "{name}"
hardware = "rtx-pro-6000"
concurrency_levels = {levels}
startup_timeout_s = 60
[model]
name = "test/model"
spec = "minimax-m2.7-nvfp4"
[parallel]
tensor = 2
data = {dp}
mode = "{mode}"
[serve]
max_model_len = 4096
{serve_extra}"""

_FLOOR = """\
[[floor]]
topology = "{topology}"
workload = "{workload}"
concurrency = {c}
tok_s = {value!r}
note = "{note}"
"""


def sim_topology(name: str = "tiny", levels: Sequence[int] | str = (1, 4), dp: int = 2,
                 mode: str = "replicas", serve_extra: str = "") -> str:
    """A TP=2 x DP=``dp`` topology file for the simulator; ``serve_extra``: more [serve] lines."""
    if not isinstance(levels, str):
        levels = "[" + ", ".join(str(c) for c in levels) + "]"
    extra = serve_extra if not serve_extra or serve_extra.endswith("\n") else serve_extra + "\n"
    return _TOPOLOGY.format(name=name, levels=levels, dp=dp, mode=mode, serve_extra=extra)


def floors_file(topology: str, workload: str, floors: Mapping[int, float], note: str = "test floor") -> str:
    """A floors file with one output tok/s floor per concurrency level."""
    return "".join(_FLOOR.format(topology=topology, workload=workload, c=c, value=float(v), note=note)
                   for c, v in floors.items())
