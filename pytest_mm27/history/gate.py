"""The history gate: fail when a series' newest change point is a regression past its tolerance.

Judged over the whole history of each (hardware, topology, workload, level,
metric) the session measured. The shift is measured from the segment before
the first of the newest run of regressions (a slow drift is a staircase of
small steps) to the newest runs of the newest segment, and the message names the first bad run,
its commit and engine version, and the shift with its interval. No pytest.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .changepoints import ChangePoint, Shift, find_change_points, regression_chain, welch
from .series import HISTORY_METRICS, Point, RunInfo, SeriesKey

# The "now" side of a shift: the newest segment's last runs, at most two weeks of nightlies.
# Under a slow drift the whole segment's mean lags the present; after a step the two agree.
# One week flagged drifts sooner but, in a third of them, before they had reached the
# tolerance (benchmarks/history_accuracy); two weeks halve that and still flag every one in time.
RECENT_RUNS = 14


@dataclass(frozen=True)
class SeriesVerdict:
    key: SeriesKey
    runs: list[RunInfo]             # the judged (valid) runs, oldest first
    change_points: list[ChangePoint]
    shift: Shift | None             # newest regression chain's total shift; None when the newest is no regression
    first_bad: RunInfo | None
    tolerance: float
    failed: bool

    def message(self) -> str:
        if self.shift is None or self.first_bad is None:
            return f"{self.key.label()}: no regression at the newest change point"
        metric = HISTORY_METRICS[self.key.metric]
        worse = "slower" if metric.higher_is_better else "higher"
        verdict = "regressed" if self.failed else "shifted (within tolerance)"
        return (f"history: {self.key.label()} {verdict} {self.shift.text()}, {worse}; tolerance "
                f"{self.tolerance:.0%}; first bad {self.first_bad.describe()}")


def judge_series(key: SeriesKey, history: Sequence[tuple[RunInfo, Point]], tolerance: float) -> SeriesVerdict:
    metric = HISTORY_METRICS[key.metric]
    valid = [(run, p) for run, p in history if p.valid and p.value > 0]
    runs = [run for run, _ in valid]
    values = [p.value for _, p in valid]
    cps = find_change_points(values, higher_is_better=metric.higher_is_better)
    return judge_values(key, runs, values, cps, tolerance)


def judge_values(key: SeriesKey, runs: list[RunInfo], values: Sequence[float], cps: list[ChangePoint],
                 tolerance: float) -> SeriesVerdict:
    chain = regression_chain(cps)
    if not chain:
        return SeriesVerdict(key, runs, cps, None, None, tolerance, False)
    first = chain[0]
    before_start = cps[cps.index(first) - 1].index if cps.index(first) > 0 else 0
    logs = [math.log(v) for v in values]
    recent = max(chain[-1].index, len(logs) - RECENT_RUNS)
    shift = welch(logs[before_start:first.index], logs[recent:])
    higher = HISTORY_METRICS[key.metric].higher_is_better
    past = shift.ratio < 1.0 - tolerance if higher else shift.ratio > 1.0 + tolerance
    # Past the tolerance and not noise: the interval leaves no-change out.
    sure = shift.high < 1.0 if higher else shift.low > 1.0
    return SeriesVerdict(key, runs, cps, shift, runs[first.index], tolerance, past and sure)


def history_gate(series: Mapping[SeriesKey, Sequence[tuple[RunInfo, Point]]],
                 tolerances: Mapping[str, float] | None = None,
                 groups: Collection[tuple[str, str, str]] | None = None) -> list[SeriesVerdict]:
    """Judge every series (of ``groups`` only, when given: this session's (hardware, topology, workload))."""
    out = []
    for key in sorted(series, key=lambda k: (k.group, k.case, k.concurrency, k.metric)):
        if groups is not None and key.group not in groups:
            continue
        if key.metric not in HISTORY_METRICS:
            continue            # a metric a newer harness stored: kept, not judged here
        tol = (tolerances or {}).get(key.metric, HISTORY_METRICS[key.metric].tolerance)
        out.append(judge_series(key, series[key], tol))
    return out
