"""What the history keeps of a run record: one point per (level, metric), keyed by series.

A series is (hardware, topology, workload, level, metric): the numbers that
can be compared night after night. A point's value is the geometric mean of
the level's trials (what the baseline gate judges too) with their min and
max as the trial spread. No database code here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..gate.specs import DEFAULT_TOLERANCES, METRICS
from ..records.model import ERROR, INVALID, RunRecord, Trial


@dataclass(frozen=True)
class HistoryMetric:
    name: str                   # tolerance key where the gate has one (throughput, ttft_p99, ...)
    label: str                  # what tables and plots call it
    unit: str
    higher_is_better: bool
    tolerance: float            # default relative tolerance of the history gate
    extract: Callable[[Trial], float | None]


def _pct(block: str, pct: str) -> Callable[[Trial], float | None]:
    def get(trial: Trial) -> float | None:
        value = getattr(getattr(trial, block, None), pct, None)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return get


# The gate's metrics (same extractors and tolerances), plus ITL and E2EL, which the
# baseline gate does not judge but a trend should show. Error rate is left out: it is
# mostly 0, and a ratio test on it means nothing (the baseline gate judges it absolutely).
METRIC_LIST: tuple[HistoryMetric, ...] = (
    *(HistoryMetric(s.name, s.label, s.unit, s.higher_is_better, s.default_tolerance, s.extract)
      for s in METRICS.values() if not s.absolute),
    HistoryMetric("itl_p50", "itl_p50", "ms", False, 0.10, _pct("itl_ms", "p50")),
    HistoryMetric("e2el_p50", "e2el_p50", "ms", False, 0.10, _pct("e2el_ms", "p50")),
)
HISTORY_METRICS: dict[str, HistoryMetric] = {m.name: m for m in METRIC_LIST}
assert set(DEFAULT_TOLERANCES) >= {m.name for m in METRIC_LIST if m.name in METRICS}


@dataclass(frozen=True)
class SeriesKey:
    hardware: str
    topology: str
    workload: str
    concurrency: int
    case: str                   # a user test's case id; "" for the suite's levels
    metric: str

    @property
    def group(self) -> tuple[str, str, str]:
        return self.hardware, self.topology, self.workload

    def label(self) -> str:
        level = f"c={self.concurrency}" + (f" [{self.case}]" if self.case else "")
        return f"{self.hardware}/{self.topology}/{self.workload} {level} {self.metric}"


@dataclass(frozen=True)
class Point:
    """One level's value of one metric in one run."""

    concurrency: int
    case: str
    metric: str
    value: float                # geometric mean over the level's trials
    low: float
    high: float
    trials: int
    valid: bool                 # False: the level was client-bound or broken; kept, never judged


@dataclass(frozen=True)
class RunInfo:
    """A run's header as the history keeps it."""

    run_id: str
    hardware: str
    topology: str
    workload: str
    simulated: bool = False
    git_commit: str | None = None
    harness_version: str = ""
    engine: str = ""
    engine_version: str | None = None
    created_at: str | None = None
    status: str = ""
    source: str = ""            # the run record's path
    seq: int = 0                # order of appending (the store's row id)

    @property
    def group(self) -> tuple[str, str, str]:
        return self.hardware, self.topology, self.workload

    def describe(self) -> str:
        commit = (self.git_commit or "?")[:12]
        engine = f"{self.engine or 'engine'} {self.engine_version or '?'}"
        return f"run {self.run_id} (commit {commit}, {engine}, {self.created_at or '?'})"


def hardware_of(record: RunRecord) -> str:
    """Simulated runs never mix with real hardware (the baselines' rule)."""
    profile = record.hardware.profile or "?"
    return f"sim-{profile}" if record.hardware.simulated else profile


def run_info(record: RunRecord, source: str = "") -> RunInfo:
    return RunInfo(run_id=record.run_id or "?", hardware=hardware_of(record), topology=record.topology_name,
                   workload=record.workload_name, simulated=record.hardware.simulated,
                   git_commit=record.git_commit, harness_version=record.harness_version,
                   engine=record.engine.name, engine_version=record.engine.version,
                   created_at=record.created_at, status=record.status, source=source)


def record_points(record: RunRecord) -> list[Point]:
    points: list[Point] = []
    for level in record.levels:
        # Client-bound numbers measure the client, not the server: kept, never judged (as the baseline gate).
        valid = level.verdict.status not in (INVALID, ERROR) and not any(t.client_bound for t in level.trials)
        for metric in METRIC_LIST:
            values = [v for v in (metric.extract(t) for t in level.trials) if v is not None and v > 0
                      and math.isfinite(v)]
            if not values:
                continue
            gm = math.exp(sum(math.log(v) for v in values) / len(values))
            points.append(Point(level.concurrency, level.case or "", metric.name, gm, min(values), max(values),
                                len(values), valid))
    return points
