"""Floors and ceilings: what a (topology, workload, concurrency) must reach, and must not pass.

They live in ``floors/<hardware-profile>.toml``: ``[[floor]]`` entries bound
throughput from below, ``[[ceiling]]`` entries bound a latency percentile or
the error rate from above (a latency SLO). Each entry says where its number
came from, and that note is shown when it is missed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .datafile import Table, read_toml
from ..errors import ConfigError


# What a floor may bound. output_tok_s: tokens over the measured window (ramp-up
# and drain included); stream_output_tok_s: summed over the concurrent streams
# (c x mean 1/TPOT), the definition benchmark write-ups often use;
# steady_output_tok_s: over the window with all c requests in flight.
FLOOR_METRICS = {
    "output_tok_s": "output tok/s",
    "stream_output_tok_s": "stream output tok/s",
    "steady_output_tok_s": "steady output tok/s",
    # goodput (a workload with [slo]): output tok/s, or requests/s, of requests meeting every SLO
    "goodput_tok_s": "goodput tok/s",
    "goodput_req_s": "goodput req/s",
    # a rate search ([slo.search]): the highest rate holding the attainment target, requests/s
    "max_good_rate": "max good rate req/s",
}


@dataclass(frozen=True)
class Floor:
    topology: str
    workload: str
    concurrency: int
    tok_s: float                # the floor value, in the unit of ``metric``
    note: str
    source: Path
    metric: str = "output_tok_s"

    @property
    def label(self) -> str:
        return FLOOR_METRICS[self.metric]

    def fmt(self, value: float) -> str:
        """A value of this floor's metric: requests/s want decimals, tokens/s do not."""
        return f"{value:,.2f}" if self.metric.endswith(("_req_s", "_rate")) else f"{value:,.0f}"

    def describe(self) -> str:
        return f"{self.fmt(self.tok_s)} {self.label} ({self.note}; {self.source.name})"


# What a ceiling may bound: a latency percentile (milliseconds) or the error rate (a share).
CEILING_METRICS = (*(f"{block}_{pct}" for block in ("ttft", "tpot", "itl", "e2el")
                     for pct in ("p50", "p90", "p99", "mean")), "error_rate")


@dataclass(frozen=True)
class Ceiling:
    topology: str
    workload: str
    concurrency: int
    metric: str                 # one of CEILING_METRICS
    max: float                  # ms for latencies, a share (0.01 = 1 %) for error_rate
    note: str
    source: Path


FloorKey = tuple[str, str, int]


@dataclass(frozen=True)
class FloorTable:
    hardware: str
    floors: Mapping[FloorKey, Floor]
    ceilings: Mapping[FloorKey, tuple[Ceiling, ...]] = field(default_factory=dict)

    def get(self, topology: str, workload: str, concurrency: int) -> Floor | None:
        return self.floors.get((topology, workload, concurrency))

    def ceilings_for(self, topology: str, workload: str, concurrency: int) -> tuple[Ceiling, ...]:
        return self.ceilings.get((topology, workload, concurrency), ())


def _entries(root: Table, path: Path, kind: str) -> list[Table]:
    entries = root.raw(kind, [])
    if not isinstance(entries, list):
        raise ConfigError(f"must be an array of tables ([[{kind}]])", source=str(path), field=kind)
    tables = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError("must be a table", source=str(path), field=f"{kind}[{i}]")
        tables.append(Table(entry, path, prefix=f"{kind}[{i}]."))
    return tables


def parse_ceilings(path: Path) -> dict[FloorKey, tuple[Ceiling, ...]]:
    root = Table(read_toml(path), path)
    tables = _entries(root, path, "ceiling")
    out: dict[FloorKey, tuple[Ceiling, ...]] = {}
    for i, t in enumerate(tables):
        metric = t.string("metric", choices=CEILING_METRICS)
        ceiling = Ceiling(
            topology=t.string("topology"), workload=t.string("workload"), concurrency=t.integer("concurrency"),
            metric=metric,
            max=t.number("max", minimum=0.0, maximum=1.0 if metric == "error_rate" else None,
                         exclusive_min=metric != "error_rate"),
            note=t.string("note"), source=path,
        )
        t.finish()
        key = (ceiling.topology, ceiling.workload, ceiling.concurrency)
        if any(c.metric == metric for c in out.get(key, ())):
            raise ConfigError(f"duplicate {metric} ceiling for {key}", source=str(path), field=f"ceiling[{i}]")
        out[key] = (*out.get(key, ()), ceiling)
    return out


def parse_floors(path: Path) -> dict[FloorKey, Floor]:
    root = Table(read_toml(path), path)
    tables = _entries(root, path, "floor")
    root.raw("ceiling", None)      # read by parse_ceilings
    root.finish()
    floors: dict[FloorKey, Floor] = {}
    for i, t in enumerate(tables):
        floor = Floor(
            topology=t.string("topology"),
            workload=t.string("workload"),
            concurrency=t.integer("concurrency"),
            tok_s=t.number("tok_s", minimum=0.0, exclusive_min=True),
            note=t.string("note"),
            source=path,
            metric=t.string("metric", "output_tok_s", choices=tuple(FLOOR_METRICS)),
        )
        t.finish()
        key = (floor.topology, floor.workload, floor.concurrency)
        if key in floors:
            raise ConfigError(f"duplicate floor for {key}", source=str(path), field=f"floor[{i}]")
        floors[key] = floor
    return floors


def load_floors(dirs: Sequence[Path], hardware: str) -> FloorTable:
    """Floors and ceilings for one hardware profile; earlier folders shadow later ones per key."""
    merged: dict[FloorKey, Floor] = {}
    ceilings: dict[FloorKey, tuple[Ceiling, ...]] = {}
    for folder in reversed(list(dirs)):
        path = folder / f"{hardware}.toml"
        if path.is_file():
            merged.update(parse_floors(path))
            ceilings.update(parse_ceilings(path))
    return FloorTable(hardware, MappingProxyType(merged), MappingProxyType(ceilings))
