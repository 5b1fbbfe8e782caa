"""Per-request SLOs for goodput: a workload's ``[slo]`` table.

A request meets the SLOs when it succeeded and its TTFT, TPOT and E2EL are
each at or below the ceilings given (an absent ceiling is no limit; a TPOT
undefined for a one-token answer is no miss). A level's SLO attainment is
the share of its measured requests that meet every ceiling; its goodput is
their requests/s and output tok/s (``loadgen.goodput``).

``[slo.search]`` asks for the highest open-loop rate whose attainment is at
least ``attainment``: bisection between ``min_rate`` and ``max_rate`` that
stops when the bracket is narrower than ``tolerance`` (relative) or after
``max_steps`` probes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .datafile import Table


@dataclass(frozen=True)
class RateSearch:
    attainment: float = 0.9         # share of requests meeting every SLO
    min_rate: float = 0.5           # requests/s
    max_rate: float = 64.0
    tolerance: float = 0.1          # stop when (hi - lo) / hi is below this
    max_steps: int = 8

    def to_dict(self) -> dict[str, float | int]:
        return {"attainment": self.attainment, "min_rate": self.min_rate, "max_rate": self.max_rate,
                "tolerance": self.tolerance, "max_steps": self.max_steps}


@dataclass(frozen=True)
class SloSpec:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    search: RateSearch | None = None

    def to_dict(self) -> dict[str, object]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2el_ms": self.e2el_ms,
                "search": self.search.to_dict() if self.search else None}


def parse_slo(t: Table) -> SloSpec:
    ceilings = {key: t.number(key, None, minimum=0.0, exclusive_min=True) for key in ("ttft_ms", "tpot_ms", "e2el_ms")}
    search = None
    if t.has("search"):
        s = t.table("search")
        search = RateSearch(
            attainment=s.number("attainment", 0.9, minimum=0.0, maximum=1.0, exclusive_min=True),
            min_rate=s.number("min_rate", 0.5, minimum=0.0, exclusive_min=True),
            max_rate=s.number("max_rate", 64.0, minimum=0.0, exclusive_min=True),
            tolerance=s.number("tolerance", 0.1, minimum=0.0, maximum=1.0, exclusive_min=True),
            max_steps=s.integer("max_steps", 8, minimum=1),
        )
        s.finish()
        if search.min_rate >= search.max_rate:
            raise ConfigError(f"min_rate {search.min_rate:g} must be below max_rate {search.max_rate:g}",
                              source=t.source, field="slo.search.min_rate")
    t.finish()
    if not any(v is not None for v in ceilings.values()):
        raise ConfigError("needs at least one of ttft_ms, tpot_ms, e2el_ms", source=t.source, field="slo")
    return SloSpec(search=search, **ceilings)
