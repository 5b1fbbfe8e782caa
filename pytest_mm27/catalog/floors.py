"""Throughput floors: the least a (topology, workload, concurrency) must reach.

Floors live in ``floors/<hardware-profile>.toml``; each entry says where its
number came from, and that note is shown when a floor is missed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    def describe(self) -> str:
        return f"{self.tok_s:,.0f} {self.label} ({self.note}; {self.source.name})"


FloorKey = tuple[str, str, int]


@dataclass(frozen=True)
class FloorTable:
    hardware: str
    floors: Mapping[FloorKey, Floor]

    def get(self, topology: str, workload: str, concurrency: int) -> Floor | None:
        return self.floors.get((topology, workload, concurrency))


def parse_floors(path: Path) -> dict[FloorKey, Floor]:
    root = Table(read_toml(path), path)
    entries = root.raw("floor", [])
    root.finish()
    if not isinstance(entries, list):
        raise ConfigError("must be an array of tables ([[floor]])", source=str(path), field="floor")
    floors: dict[FloorKey, Floor] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError("must be a table", source=str(path), field=f"floor[{i}]")
        t = Table(entry, path, prefix=f"floor[{i}].")
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
    """Floors for one hardware profile; earlier folders shadow later ones per key."""
    merged: dict[FloorKey, Floor] = {}
    for folder in reversed(list(dirs)):
        path = folder / f"{hardware}.toml"
        if path.is_file():
            merged.update(parse_floors(path))
    return FloorTable(hardware, MappingProxyType(merged))
