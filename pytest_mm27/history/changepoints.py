"""Change points of one series: where the distribution of a metric shifted, and by how much.

Detection is PELT (``ruptures``, a maintained, NumPy-only library) with an
L2 cost on log values scaled by a robust estimate of the night-to-night
noise, followed by Otava/Hunter's check: each candidate is kept only when a
Welch t-test between its neighbouring segments says the shift is real; the
weakest candidate is dropped and the rest re-tested until all pass.
Why ruptures: Apache Otava (E-Divisive means) pins an old NumPy and MongoDB's
signal-processing-algorithms does not install on Python 3.12; ruptures
installs everywhere as wheels and its PELT is exact for this cost.
Log values make a shift a ratio, the unit tolerances are written in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..stats import t_cdf, t_ppf
from .dialect import HistoryError

INSTALL_HINT = "pip install ruptures (or pip install 'pytest-mm27[history]')"


class ChangePointsUnavailable(HistoryError):
    """ruptures (and so NumPy and SciPy) is not installed: the history is kept, not analysed."""


def load_ruptures() -> object:
    try:
        import ruptures
    except ImportError as exc:
        raise ChangePointsUnavailable(f"change points need ruptures, which is not installed ({exc}); "
                                      f"{INSTALL_HINT}. The history is still written.") from None
    return ruptures

MIN_SIZE = 3            # runs on each side of a change: one odd night is not a shift
ALPHA = 0.001           # two-sided significance a change point must reach
CONFIDENCE = 0.95       # of the interval reported for each shift
PENALTY_PER_LOG_N = 5.0  # PELT's penalty per change point (noise units squared) per log(n): 0.3 false per 100 flat series


@dataclass(frozen=True)
class Shift:
    """The ratio of two segments' geometric means (after / before) and its interval."""

    ratio: float
    low: float
    high: float
    p_value: float
    n_before: int
    n_after: int

    @property
    def change(self) -> float:
        return self.ratio - 1.0

    def text(self) -> str:
        p = f"p={self.p_value:.2g}" if self.p_value >= 1e-15 else "p<1e-15"
        return (f"{self.change:+.1%} [{self.low - 1:+.1%}, {self.high - 1:+.1%}] "
                f"({CONFIDENCE:.0%} interval, {p}, {self.n_before} vs {self.n_after} runs)")


@dataclass(frozen=True)
class ChangePoint:
    index: int              # the first run of the new segment
    shift: Shift
    regression: bool        # the shift is in the metric's bad direction


def robust_sigma(logs: Sequence[float]) -> float:
    """Night-to-night noise from the median absolute first difference: a step or a slow
    drift barely moves it, where the plain standard deviation would absorb the shift."""
    diffs = sorted(abs(b - a) for a, b in zip(logs, logs[1:]))
    if not diffs:
        return 0.0
    mid = len(diffs) // 2
    med = diffs[mid] if len(diffs) % 2 else (diffs[mid - 1] + diffs[mid]) / 2
    return med / (0.6745 * math.sqrt(2.0))


def welch(before: Sequence[float], after: Sequence[float]) -> Shift:
    """Welch's t-test and interval on log values; returned as a ratio."""
    n1, n2 = len(before), len(after)
    m1, m2 = sum(before) / n1, sum(after) / n2
    v1 = sum((x - m1) ** 2 for x in before) / (n1 - 1) if n1 > 1 else 0.0
    v2 = sum((x - m2) ** 2 for x in after) / (n2 - 1) if n2 > 1 else 0.0
    se2 = v1 / n1 + v2 / n2
    diff = m2 - m1
    if se2 <= 0.0:          # two constant segments (a deterministic source): the shift is exact
        return Shift(math.exp(diff), math.exp(diff), math.exp(diff), 0.0 if diff else 1.0, n1, n2)
    denom = (v1 / n1) ** 2 / (n1 - 1) if n1 > 1 else 0.0
    denom += (v2 / n2) ** 2 / (n2 - 1) if n2 > 1 else 0.0
    df = se2 ** 2 / denom if denom > 0 else float(n1 + n2 - 2)
    se = math.sqrt(se2)
    t = diff / se
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    half = t_ppf(0.5 + CONFIDENCE / 2.0, df) * se
    return Shift(math.exp(diff), math.exp(diff - half), math.exp(diff + half), max(p, 0.0), n1, n2)


def _segments(bkps: list[int], n: int) -> list[tuple[int, int]]:
    edges = [0, *bkps, n]
    return list(zip(edges, edges[1:]))


def find_change_points(values: Sequence[float], *, higher_is_better: bool, min_size: int = MIN_SIZE,
                       alpha: float = ALPHA, penalty_per_log_n: float = PENALTY_PER_LOG_N) -> list[ChangePoint]:
    """Change points of ``values`` (positive numbers, oldest first), oldest first."""
    for i, v in enumerate(values):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"value {i} of the series is {v!r}; change points need positive numbers")
    n = len(values)
    if n < 2 * min_size:
        return []
    logs = [math.log(v) for v in values]
    sigma = robust_sigma(logs)
    if sigma <= 0.0:
        # Half the nights identical (a deterministic source): scale by the spread that is there.
        mean = sum(logs) / n
        sigma = math.sqrt(sum((x - mean) ** 2 for x in logs) / n) or 0.0
        if sigma <= 0.0:
            return []
    rpt = load_ruptures()
    import numpy as np  # a dependency of ruptures

    z = (np.asarray(logs) - float(np.median(logs))) / sigma
    algo = rpt.Pelt(  # type: ignore[attr-defined]
        model="l2", min_size=min_size, jump=1).fit(z.reshape(-1, 1))
    bkps = [b for b in algo.predict(pen=penalty_per_log_n * math.log(n)) if b < n]
    # Otava's pruning: drop the least significant candidate until every one passes.
    while bkps:
        segs = _segments(bkps, n)
        tests = [welch(logs[segs[i][0]:segs[i][1]], logs[segs[i + 1][0]:segs[i + 1][1]])
                 for i in range(len(bkps))]
        worst = max(range(len(tests)), key=lambda i: tests[i].p_value)
        if tests[worst].p_value <= alpha:
            return [ChangePoint(b, s, (s.ratio < 1.0) == higher_is_better) for b, s in zip(bkps, tests)]
        del bkps[worst]
    return []


def regression_chain(points: list[ChangePoint]) -> list[ChangePoint]:
    """The newest change points that are all regressions, oldest first ([] when the newest is not).

    A slow drift shows as a staircase of small steps, each within tolerance;
    their sum is the shift that matters, measured from before the first step.
    """
    chain: list[ChangePoint] = []
    for cp in reversed(points):
        if not cp.regression:
            break
        chain.insert(0, cp)
    return chain
