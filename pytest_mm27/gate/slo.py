"""Service-level objectives: limits on one level's numbers, from floors files or from a test.

A limit is direction-aware by its metric: throughput (``output_tok_s``,
``stream_output_tok_s``, ``steady_output_tok_s``, ``request_tok_s``) is held
from below, latency percentiles (``ttft_p99``, ``tpot_p50``, ``e2el_p99``...,
in milliseconds) and ``error_rate`` (a share) from above. A miss reads like a
floor's: the metric, what was measured, the limit, how far off, and where the
limit came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..catalog.floors import CEILING_METRICS, FLOOR_METRICS, Ceiling
from ..records.model import Trial

THROUGHPUT = (*FLOOR_METRICS, "request_tok_s", "slo_attainment")
KNOWN = (*THROUGHPUT, *CEILING_METRICS)


@dataclass(frozen=True)
class Slo:
    metric: str
    limit: float
    source: str         # where the limit came from: "rtx-pro-6000.toml: <note>", "test_x.py"

    @property
    def minimum(self) -> bool:
        return self.metric in THROUGHPUT

    @property
    def kind(self) -> str:
        return "floor" if self.minimum else "ceiling"

    def fmt(self, value: float) -> str:
        if self.metric in ("error_rate", "slo_attainment"):
            return f"{value:.2%}"
        if self.metric.endswith(("_req_s", "_rate")):
            return f"{value:,.2f}"
        if self.minimum:
            return f"{value:,.0f}"
        return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"

    @classmethod
    def of(cls, ceiling: Ceiling) -> Slo:
        return cls(ceiling.metric, ceiling.max, f"{ceiling.note}; {ceiling.source.name}")


def slo(metric: str, limit: float, source: str) -> Slo:
    """A limit named by a test or a file; an unknown metric is refused with the known ones."""
    if metric not in KNOWN:
        raise ValueError(f"unknown SLO metric {metric!r}; known: {', '.join(KNOWN)}")
    return Slo(metric, float(limit), source)


def value_of(trial: Trial, metric: str) -> float | None:
    """The level's figure for ``metric``: a field, or ``<block>_<pct>`` of a latency block (ms)."""
    if metric == "error_rate":
        return trial.failed / trial.requests if trial.requests else None
    if metric in THROUGHPUT:
        value = getattr(trial, metric, None)
    else:
        block, _, pct = metric.rpartition("_")
        value = getattr(getattr(trial, f"{block}_ms", None), pct, None)
    return float(value) if isinstance(value, (int, float)) else None


def misses(trial: Trial, slos: Sequence[Slo]) -> list[str]:
    """A message for every limit the trial misses (a figure it did not measure is a miss too)."""
    out = []
    for s in slos:
        value = value_of(trial, s.metric)
        where = f"at c={trial.concurrency}; {s.kind}: {s.fmt(s.limit)} ({s.source})"
        if value is None:
            out.append(f"{s.metric} was not measured {where}")
            continue
        if s.minimum and value < s.limit:
            short = 1 - value / s.limit if s.limit else 1.0
            out.append(f"{s.metric} {s.fmt(value)} is below its floor {s.fmt(s.limit)} ({short:.1%} short) {where}")
        elif not s.minimum and value > s.limit:
            over = f"{value / s.limit - 1:.1%} over" if s.limit else "over"
            out.append(f"{s.metric} {s.fmt(value)} is above its ceiling {s.fmt(s.limit)} ({over}) {where}")
    return out


def from_mapping(limits: Mapping[str, float], source: str) -> list[Slo]:
    return [slo(metric, limit, source) for metric, limit in limits.items()]
