"""How noisy a comparison is: the trial-to-trial scatter a baseline measured, and each level's own.

The pooling rule
================

Every ratio metric (throughput, TTFT and TPOT percentiles) is compared on
the log scale, so noise is one number per metric: the standard deviation of
the log of a trial. It comes from the **baseline**, the reference the run is
held against: the trial-to-trial sums of squares of every comparable level
of the baseline, pooled (a sweep of L levels with 3 trials gives 2·L degrees
of freedom, where one level alone gives 2). Nothing the run measured at other
levels enters it, so a level is judged the same way while the run is under
way (the level's test) and at its end (the session summary).

A level keeps its own noise instead (its baseline and run trials together)
when that scatter is significantly larger than the pool's (F-test at 99 %),
or when either side was front-end bound: a saturated API process scatters
more than the GPU does (on an H200, CV 9.6 % against 1.4 %), so pooled it
would raise false alarms, and pooling it would inflate every other level's
band. So does every level when the baseline has single trials (no pool).

With no repeated trials anywhere (single trials on both sides), there is no
trial-to-trial noise: the comparison uses the two levels' own within-level
noise (batch means for throughput, order statistics for percentiles, see
``loadgen.metrics``) with a normal quantile, and says so. Noise is never
assumed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..records.model import LevelResult, RunRecord, Trial
from .specs import ALL_METRICS, METRICS, MetricSpec
from ..stats import f_ppf, t_ppf

HETEROGENEITY_P = 0.99


@dataclass(frozen=True)
class Noise:
    """What one comparison's interval stands on: the standard error of the mean log change,
    the quantile it is multiplied by, and where the noise was measured."""

    se: float
    q: float
    source: str             # "12 df" (trial-to-trial), "within-level" (single trials)


def logs(values: Sequence[float | None]) -> list[float] | None:
    """Logs of positive finite values; None when any is missing (the metric is not comparable)."""
    if not values or any(v is None or v <= 0 or not math.isfinite(v) for v in values):
        return None
    return [math.log(v) for v in values]  # type: ignore[arg-type]


def ss_df(xs: Sequence[float]) -> tuple[float, int]:
    """Sum of squared deviations from the mean, and its degrees of freedom."""
    if len(xs) < 2:
        return 0.0, 0
    m = math.fsum(xs) / len(xs)
    return math.fsum((x - m) ** 2 for x in xs), len(xs) - 1


def trial_noise(trial: Trial, name: str) -> float | None:
    """A trial's own within-level standard error of metric ``name`` (relative), if it measured one."""
    value = (trial.noise or {}).get(name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value)
    return float(value) if ok else None


def within_noise(spec: MetricSpec, b_trials: Sequence[Trial], n_trials: Sequence[Trial],
                 confidence: float) -> Noise | None:
    """Single trials: the two levels' own within-level noise (batch means, order statistics)."""
    b = [trial_noise(t, spec.name) for t in b_trials]
    n = [trial_noise(t, spec.name) for t in n_trials]
    if not b or not n or any(se is None for se in (*b, *n)):
        return None
    var = math.fsum(se ** 2 for se in b) / len(b) ** 2 + math.fsum(se ** 2 for se in n) / len(n) ** 2  # type: ignore
    return Noise(math.sqrt(var), statistics.NormalDist().inv_cdf(confidence), "within-level")


def front_end_bound(level: LevelResult | None) -> bool:
    return bool(level) and any(t.front_end_bound for t in level.trials)   # type: ignore[union-attr]


@dataclass
class _Pool:
    ss: float = 0.0
    df: int = 0
    levels: dict[tuple[int, str], tuple[float, int]] = field(default_factory=dict)   # pooled levels' own ss, df
    apart: set[tuple[int, str]] = field(default_factory=set)                         # levels with their own noise


class NoiseModel:
    """The baseline's trial-to-trial noise per metric, and the rule that gives each comparison its noise.

    ``comparable(level, spec)`` says whether a baseline level's trials count
    (the comparison's own validity test); ``pool_levels=False`` gives every
    level its own noise (the rejected alternative, kept to measure it).
    """

    def __init__(self, baseline: RunRecord, comparable: Any, *, pool_levels: bool = True):
        self.pool_levels = pool_levels
        self.pools: dict[str, _Pool] = {}
        for spec in ALL_METRICS.values():
            if spec.absolute:
                continue
            pool = _Pool()
            for level in baseline.levels:
                if not comparable(level, spec):
                    continue
                xs = logs([spec.extract(t) for t in level.trials])
                if xs is None:
                    continue
                ss, df = ss_df(xs)
                if front_end_bound(level):
                    pool.apart.add(level.key)
                    continue
                pool.levels[level.key] = (ss, df)
            total_ss = math.fsum(ss for ss, _ in pool.levels.values())
            total_df = sum(df for _, df in pool.levels.values())
            for c, (ss, df) in list(pool.levels.items()):
                if _noisier_than(ss, df, total_ss - ss, total_df - df):
                    pool.apart.add(c)
                    del pool.levels[c]
            pool.ss = math.fsum(ss for ss, _ in pool.levels.values())
            pool.df = sum(df for _, df in pool.levels.values())
            self.pools[spec.name] = pool

    def for_level(self, spec: MetricSpec, c: int, b_logs: Sequence[float], n_logs: Sequence[float],
                  b_level: LevelResult, n_level: LevelResult, confidence: float) -> Noise | None:
        """The noise of comparing level ``c`` (see the module docstring); None when none was measured."""
        pool = self.pools[spec.name]
        key = b_level.key
        b_ss, b_df = ss_df(b_logs)
        n_ss, n_df = ss_df(n_logs)
        own_ss, own_df = b_ss + n_ss, b_df + n_df
        rest_ss = pool.ss - (b_ss if key in pool.levels else 0.0)
        rest_df = pool.df - (b_df if key in pool.levels else 0)
        apart = (not self.pool_levels or not pool.df or key in pool.apart or front_end_bound(n_level)
                 or _noisier_than(own_ss, own_df, rest_ss, rest_df))
        ss, df = (own_ss, own_df) if apart else (pool.ss, pool.df)
        if df:
            unit = math.sqrt(1 / len(b_logs) + 1 / len(n_logs))
            return Noise(math.sqrt(ss / df) * unit, t_ppf(confidence, df), f"{df} df" + (", own" if apart else ""))
        return within_noise(spec, b_level.trials, n_level.trials, confidence)

    def describe(self, spec: MetricSpec) -> str:
        pool = self.pools.get(spec.name)
        if pool is None:
            return ""
        apart = sorted(c if not case else f"{c}[{case}]" for c, case in pool.apart)
        text = (f"{spec.label} ±{math.expm1(math.sqrt(pool.ss / pool.df)):.1%}/trial ({pool.df} df)" if pool.df
                else f"{spec.label} within-level noise only (single trials: trial-to-trial noise not measured)")
        return text + (f", own noise at c={','.join(map(str, apart))}" if apart else "")


def _noisier_than(ss: float, df: int, ss_rest: float, df_rest: int) -> bool:
    """F-test: is this variance significantly larger than the rest's?"""
    if df < 1 or df_rest < 1:
        return False
    if ss_rest <= 0:
        return ss > 0
    return (ss / df) / (ss_rest / df_rest) > f_ppf(HETEROGENEITY_P, df, df_rest)


def record_noise(record: RunRecord, comparable: Any) -> dict[str, Any]:
    """The noise a record measured of itself, per gated metric: what a baseline carries.

    ``trial``: the trial-to-trial scatter (log sigma pooled over its levels,
    by the pooling rule, and its degrees of freedom); ``within``: the median
    of the trials' own within-level noise.
    """
    model = NoiseModel(record, comparable)
    out: dict[str, Any] = {}
    for spec in METRICS.values():
        if spec.absolute:
            continue
        pool = model.pools[spec.name]
        within = [se for lv in record.levels if comparable(lv, spec)
                  for t in lv.trials if (se := trial_noise(t, spec.name)) is not None]
        out[spec.name] = {"trial": math.expm1(math.sqrt(pool.ss / pool.df)) if pool.df else None, "df": pool.df,
                          "within": statistics.median(within) if within else None}
    return out


def noise_text(noise: Mapping[str, Any] | None) -> str:
    """``record_noise`` in a line: 'output_tok_s ±0.8%/trial (8 df), ±0.3% within a level; ...'."""
    parts = []
    for name, block in (noise or {}).items():
        spec = METRICS.get(name)
        if spec is None or not isinstance(block, Mapping):
            continue
        trial = f"±{block['trial']:.1%}/trial ({block.get('df')} df)" if block.get("trial") is not None \
            else "trial-to-trial not measured"
        within = f", ±{block['within']:.1%} within a level" if block.get("within") is not None else ""
        parts.append(f"{spec.label} {trial}{within}")
    return "; ".join(parts)
