"""Workloads: the request shape and how many requests make one level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .datafile import Table, read_toml
from .topology import Catalog, load_catalog_files

Api = Literal["completions", "chat"]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    source: Path
    input_tokens: int
    output_tokens: int
    ignore_eos: bool
    # Closed loop: at concurrency c, send max(min_requests, ceil(k * c)) requests,
    # keeping c in flight; or, with duration_s, keep sending until it elapses.
    requests_per_concurrency: float
    min_requests: int
    duration_s: float | None
    warmup_requests: int        # sent before the measured window, not counted
    api: Api
    temperature: float
    request_timeout_s: float    # one request, first byte to last
    seed: int
    # No byte for this long (after the request was sent, or after the last
    # chunk) fails the request as "stalled"; None: derived, see stall_limit_s.
    stall_timeout_s: float | None = None

    @property
    def stall_limit_s(self) -> float:
        """The stall timeout in force: the field, else a quarter of the request
        timeout but at least 60 s (a queued request may wait long for its first
        token), never more than the request timeout."""
        if self.stall_timeout_s is not None:
            return min(self.stall_timeout_s, self.request_timeout_s)
        return min(self.request_timeout_s, max(60.0, self.request_timeout_s / 4))

    def requests_for(self, concurrency: int) -> int:
        return max(self.min_requests, math.ceil(self.requests_per_concurrency * concurrency))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source"] = str(self.source)
        return data


def parse_workload(path: Path) -> Workload:
    t = Table(read_toml(path), path)
    workload = Workload(
        name=t.string("name", path.stem),
        description=t.string("description", ""),
        source=path,
        input_tokens=t.integer("input_tokens"),
        output_tokens=t.integer("output_tokens"),
        ignore_eos=t.boolean("ignore_eos", True),
        requests_per_concurrency=t.number("requests_per_concurrency", 2.0, minimum=0.0, exclusive_min=True),
        min_requests=t.integer("min_requests", 4),
        duration_s=t.number("duration_s", None, minimum=0.0, exclusive_min=True),
        warmup_requests=t.integer("warmup_requests", 0, minimum=0),
        api=t.string("api", "completions", choices=("completions", "chat")),
        temperature=t.number("temperature", 0.0, minimum=0.0),
        request_timeout_s=t.number("request_timeout_s", 600.0, minimum=0.0, exclusive_min=True),
        seed=t.integer("seed", 0, minimum=0),
        stall_timeout_s=t.number("stall_timeout_s", None, minimum=0.0, exclusive_min=True),
    )
    t.finish()
    return workload


def load_workloads(dirs: Sequence[Path]) -> Catalog:
    """The workloads found in ``dirs`` (``workloads/`` folders)."""
    return load_catalog_files("workload", dirs, parse_workload)
