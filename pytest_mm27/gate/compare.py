"""Comparing a run with its baseline: direction-aware, tolerance- and noise-aware.

Which statistic, and why
========================

Each level of a record holds ``trials`` (``--trials N`` repeats the level).
For every gated metric and level we compare the trials of the run with the
trials of the baseline on the **log scale**: performance noise is
multiplicative (a 3 % wobble is 3 % at 500 tok/s and at 50,000 tok/s), and
the difference of mean logs is the log of the ratio of geometric means, so
the point estimate *is* the ratio the tolerance speaks about.

Noise is measured from the trials themselves: a **two-sample Student t
interval on log values, with the trial-to-trial variance pooled over every
comparable level of the sweep** (both records, same metric). Pooling is the
important choice. With 3 trials per side a single level has only 4 degrees
of freedom; its variance estimate is so unsteady that any test built on it
either raises false alarms or misses real 10 % slowdowns (measured by
``python -m pytest_mm27.benchmarks.gate_accuracy``: per-level variance gives
1.3 % false alarms at 96 % detection, or 0.4 % at 69 %). A sweep of L
levels gives 4·L degrees of freedom, and the relative noise of one server
at different concurrencies is similar enough (it is the same machine, clock
and software) for the pooled estimate to stand for each level. Levels that
cannot be trusted (client-bound, errors, timed out) are left out of the pool,
and so is a level whose scatter is significantly larger than the rest's
(F-test at 99 %; e.g. TTFT p99 at c=4, a p99 of a handful of requests): it
keeps its own estimate, so it neither hides in the pool (false alarms there)
nor inflates it (missed regressions everywhere else).

A metric at a level is **regressed only when both hold**:

1. the point estimate is past the tolerance (ratio < 1 - tol for
   throughput, > 1 + tol for latency): the change is big enough to matter;
2. the whole confidence interval of the ratio is on the bad side of 1 (a
   one-sided test at ``confidence``, default 99 %, so the interval shown is
   the two-sided 98 % one): the change is outside the noise measured across
   trials.

"improved" mirrors this on the good side; anything else is "ok". The
tolerance alone decides when the trials agree perfectly (a seeded
simulator); the noise alone cannot flag a change smaller than the tolerance.

Why not "the interval's bound lies beyond the tolerance" (confident the
ratio is worse than 1 - tol)? With 3 trials at 3 % noise that rule catches a
10 % slowdown only about half the time: it asks for the change to exceed the
tolerance *plus* the noise band. Why not a bootstrap? With 3 trials a
resample has 10 distinct values; its interval is too narrow and false alarms
follow.

Noise is never assumed. A nightly run of one trial against a baseline saved
with three (``--save-baseline`` measures three unless told otherwise) stands
on the baseline's measured trial-to-trial scatter. With single trials on both
sides there is none; the gate then uses what each level measured of itself
(the window's batch-means interval for throughput, order-statistic intervals
for the latency percentiles, see ``loadgen.metrics``) with a normal quantile,
and says so: that noise leaves the trial-to-trial scatter out. A metric with
no measured noise at all (a p99 of too few requests, a record from an older
harness) is shown and not judged. Every message whose noise band is wider
than the tolerance says the smallest change it could have caught.

Trials within one session do not see slow drift between sessions (another
node, a driver update): the tolerance is what absorbs that, which is why it
is required on top of the noise test.

One level at a time, a single trial per side needs about a 10 % change to be
sure of it; a server 9 % slower at every level then passes every level. So
throughput is also judged across the sweep: the mean of the levels' log
ratios, whose interval shrinks with the number of comparable levels
(independent runs), by the same rule (past tolerance and outside the
interval). Latencies are judged per level only: on a shared machine their
session-wide shifts are larger than the per-level noise model allows.

Error rate is not a ratio: it fails when the run's error rate exceeds the
baseline's by more than its limit (absolute, default 0: any increase fails).
A level where either side had failed requests, was client-bound or timed out
is **invalid** for the performance metrics; it is reported, never silently
compared.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from ..host.hostfacts import facts_differences
from .stats import f_ppf, t_cdf, t_ppf
from .verdict import client_understatement, verdict_label

OK = "ok"
REGRESSED = "regressed"
IMPROVED = "improved"
INVALID = "invalid"
MISSING = "missing"
# worst first: a level (or record) takes the worst status of its metrics
STATUS_ORDER = (REGRESSED, INVALID, MISSING, IMPROVED, OK)

DEFAULT_CONFIDENCE = 0.99


def _pct_of(key: str, pct: str) -> Callable[[Mapping[str, Any]], float | None]:
    def get(trial: Mapping[str, Any]) -> float | None:
        block = trial.get(key)
        value = block.get(pct) if isinstance(block, Mapping) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return get


def _field(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def get(trial: Mapping[str, Any]) -> float | None:
        value = trial.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return get


def _error_rate(trial: Mapping[str, Any]) -> float | None:
    if isinstance(trial.get("error_rate"), (int, float)):
        return float(trial["error_rate"])
    requests = trial.get("requests")
    if isinstance(requests, int) and requests > 0:
        return float(trial.get("failed", 0)) / requests
    return None


@dataclass(frozen=True)
class MetricSpec:
    name: str                # tolerance key: throughput, ttft_p99, ...
    label: str               # what messages call it: output_tok_s, ttft_p99, ...
    unit: str
    higher_is_better: bool
    default_tolerance: float
    extract: Callable[[Mapping[str, Any]], float | None]
    absolute: bool = False   # compared by difference (error rate), not by ratio

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.absolute:
            return f"{value:.2%}"
        if self.unit == "tok/s":
            return f"{value:,.0f}"
        return f"{value:,.1f} {self.unit}" if value < 100 else f"{value:,.0f} {self.unit}"


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("throughput", "output_tok_s", "tok/s", True, 0.05, _field("output_tok_s")),
    MetricSpec("ttft_p50", "ttft_p50", "ms", False, 0.10, _pct_of("ttft_ms", "p50")),
    MetricSpec("ttft_p99", "ttft_p99", "ms", False, 0.10, _pct_of("ttft_ms", "p99")),
    MetricSpec("tpot_p50", "tpot_p50", "ms", False, 0.10, _pct_of("tpot_ms", "p50")),
    MetricSpec("tpot_p99", "tpot_p99", "ms", False, 0.10, _pct_of("tpot_ms", "p99")),
    MetricSpec("error_rate", "error_rate", "", False, 0.0, _error_rate, absolute=True),
)}
# other spellings accepted by parse_tolerances; "latency" sets all four latency metrics
ALIASES: dict[str, tuple[str, ...]] = {
    "output_tok_s": ("throughput",), "tok_s": ("throughput",), "errors": ("error_rate",),
    "ttft": ("ttft_p50", "ttft_p99"), "tpot": ("tpot_p50", "tpot_p99"),
    "latency": ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"),
}
DEFAULT_TOLERANCES: dict[str, float] = {name: spec.default_tolerance for name, spec in METRICS.items()}


def _parse_amount(text: str, name: str) -> float:
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tolerance for {name} must be a percentage like 5% or a fraction "
                                         f"like 0.05, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"tolerance for {name} must be 0 or more, got {text!r}")
    if not raw.endswith("%") and value >= 1:
        raise argparse.ArgumentTypeError(f"tolerance for {name} is {text!r}: write {raw}% for a percentage, "
                                         f"or a fraction below 1 (0.05 = 5%)")
    return value


def parse_tolerances(text: str) -> dict[str, float]:
    """``"throughput=5%,ttft_p99=10%"`` -> every metric's tolerance (unnamed ones keep their default).

    Usable as an argparse ``type=``: bad input raises ``argparse.ArgumentTypeError``.
    Throughput and latency tolerances are relative (5% = a ratio of 0.95 or
    1.05); ``error_rate`` is absolute (``error_rate=0.5%`` allows the error
    rate to rise by half a percentage point).
    """
    out = dict(DEFAULT_TOLERANCES)
    known = ", ".join([*METRICS, *ALIASES])
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep or not value.strip():
            raise argparse.ArgumentTypeError(f"tolerance must be METRIC=VALUE (e.g. throughput=5%), got {part!r}")
        targets = (name,) if name in METRICS else ALIASES.get(name)
        if not targets:
            raise argparse.ArgumentTypeError(f"unknown metric {name!r} in tolerance {part!r}; known: {known}")
        amount = _parse_amount(value, name)
        for target in targets:
            if METRICS[target].higher_is_better and amount >= 1:
                raise argparse.ArgumentTypeError(f"tolerance for {target} must be below 100%, got {value.strip()!r}")
            out[target] = amount
    return out


# ---- the comparison ------------------------------------------------------------------------

SWEEP = 0               # MetricComparison.concurrency of a whole-sweep comparison
SWEEP_MIN_LEVELS = 3    # fewer comparable levels add nothing to the per-level tests
SWEEP_METRICS = ("throughput",)


@dataclass
class MetricComparison:
    metric: str                       # label, e.g. output_tok_s
    concurrency: int                  # SWEEP (0) for the whole sweep
    status: str
    message: str
    baseline: float | None = None     # geometric mean of the baseline's trials (arithmetic for error rate)
    now: float | None = None
    change: float | None = None       # now / baseline - 1 (difference for error rate)
    tolerance: float | None = None
    noise: float | None = None        # half-width of the interval, relative (0.012 = ±1.2 %)
    ci: tuple[float, float] | None = None   # interval of the ratio now / baseline
    confidence: float | None = None   # two-sided level of ``ci``
    n_baseline: int = 0
    n_now: int = 0
    higher_is_better: bool = True
    name: str = ""                    # tolerance key, e.g. throughput
    noise_source: str = ""            # "12 df" (trial-to-trial, pooled) or "within-level" (single trials)

    @property
    def blind(self) -> bool:
        """The noise band is wider than the tolerance: a change between the two would pass unseen."""
        return self.noise is not None and self.tolerance is not None and self.noise > self.tolerance

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["ci"] = list(self.ci) if self.ci else None
        return data


@dataclass
class LevelComparison:
    concurrency: int
    metrics: list[MetricComparison]
    note: str = ""                    # why the level is invalid or missing

    @property
    def status(self) -> str:
        return worst(m.status for m in self.metrics) if self.metrics else MISSING

    def get(self, name: str) -> MetricComparison | None:
        spec = METRICS.get(name)
        for m in self.metrics:
            if m.name == name or m.metric == name or (spec and m.metric == spec.label):
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "status": self.status, "note": self.note,
                "metrics": [m.to_dict() for m in self.metrics]}


@dataclass
class RecordComparison:
    topology: str
    workload: str
    profile: str
    baseline_path: str | None
    levels: list[LevelComparison]
    tolerances: dict[str, float]
    confidence: float
    noise_source: str                 # how the noise was measured, for the report
    baseline_info: dict[str, Any] = field(default_factory=dict)
    sweep: list[MetricComparison] = field(default_factory=list)    # whole-sweep comparisons
    # What the two hosts differ in (CPU, GPU clocks and power limit, driver, torch...),
    # said before any number: a change may be the box, not the software.
    host_differences: list[str] = field(default_factory=list)
    # What the workload and the topology say differently: a changed serve flag is
    # what a regression often is; a changed request shape makes nothing comparable.
    definition_differences: list[str] = field(default_factory=list)
    baseline_note: str = ""

    @property
    def status(self) -> str:
        if not self.levels:
            return MISSING
        return worst([lv.status for lv in self.levels] + [m.status for m in self.sweep])

    def with_status(self, *statuses: str) -> list[MetricComparison]:
        return [m for lv in self.levels for m in lv.metrics if m.status in statuses] + [
            m for m in self.sweep if m.status in statuses]

    @property
    def regressions(self) -> list[MetricComparison]:
        return self.with_status(REGRESSED)

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    def level(self, concurrency: int) -> LevelComparison | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)

    def summary(self) -> str:
        counts = {s: len(self.with_status(s)) for s in STATUS_ORDER}
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return (f"{self.topology} vs baseline {self.baseline_path or '-'}: {self.status}"
                + (f" ({parts})" if parts else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"topology": self.topology, "workload": self.workload, "profile": self.profile,
                "baseline_path": self.baseline_path, "status": self.status, "tolerances": self.tolerances,
                "confidence": self.confidence, "noise_source": self.noise_source,
                "baseline_info": self.baseline_info, "levels": [lv.to_dict() for lv in self.levels],
                "sweep": [m.to_dict() for m in self.sweep], "host_differences": list(self.host_differences),
                "definition_differences": list(self.definition_differences), "baseline_note": self.baseline_note}


def worst(statuses: Iterable[str]) -> str:
    ranked = [STATUS_ORDER.index(s) for s in statuses]
    return STATUS_ORDER[min(ranked)] if ranked else OK


def level_trials(level: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The trials of a level; older records with only ``metrics`` count it as one trial."""
    if not level:
        return []
    trials = [t for t in level.get("trials") or [] if isinstance(t, Mapping)]
    if not trials and isinstance(level.get("metrics"), Mapping):
        trials = [level["metrics"]]
    return trials


# A client-bound trial still counts for throughput when its requests waited this
# share of slot time or less to be sent: the client then cannot have hidden a
# change past any useful tolerance. Its latencies stay uncompared (blurred).
CLIENT_TRUST_SHARE = 0.01


def invalid_reason(level: Mapping[str, Any] | None, max_error_rate: float = 0.0, *,
                   throughput: bool = False) -> str | None:
    """Why a level's performance numbers cannot be compared, or None when they can.

    ``throughput``: judge for the throughput metric, which a client-bound trial
    does not invalidate when its dispatch delays were negligible.
    """
    trials = level_trials(level)
    if not trials:
        problems = ((level or {}).get("verdict") or {}).get("problems") or []
        return "not measured" + (f" ({problems[0].splitlines()[0]})" if problems else "")
    for i, t in enumerate(trials):
        tag = f" (trial {i + 1} of {len(trials)})" if len(trials) > 1 else ""
        if t.get("client_bound") and not (throughput and client_understatement(t) <= CLIENT_TRUST_SHARE):
            return f"client-bound{tag}: {t.get('client_bound_reason') or 'the client was the limit'}"
        rate = _error_rate(t) or 0.0
        if rate > max_error_rate or (max_error_rate == 0 and int(t.get("failed") or 0) > 0):
            return f"had errors{tag}: {t.get('failed', '?')} of {t.get('requests', '?')} requests failed"
        if t.get("timed_out"):
            return f"timed out{tag}: the level timeout cut the window short"
        if int(t.get("ok", 1) or 0) == 0:
            return f"no request succeeded{tag}"
    return None


@dataclass
class _Sample:
    logs_base: list[float]
    logs_now: list[float]

    @property
    def ss_df(self) -> tuple[float, int]:
        ss, df = 0.0, 0
        for xs in (self.logs_base, self.logs_now):
            if len(xs) > 1:
                m = math.fsum(xs) / len(xs)
                ss += math.fsum((x - m) ** 2 for x in xs)
                df += len(xs) - 1
        return ss, df


def _logs(values: Sequence[float | None]) -> list[float] | None:
    if not values or any(v is None or v <= 0 or not math.isfinite(v) for v in values):
        return None
    return [math.log(v) for v in values]  # type: ignore[arg-type]


def _geomean(values: Sequence[float | None]) -> float | None:
    logs = _logs(values)
    return math.exp(math.fsum(logs) / len(logs)) if logs else None


def _fmt_band(noise: float, ci: tuple[float, float], confidence: float) -> str:
    return f"noise band ±{noise:.1%} ({confidence:.0%} CI of ratio [{ci[0]:.3f}, {ci[1]:.3f}])"


def compare_records(
    baseline: Mapping[str, Any],
    record: Mapping[str, Any],
    tolerances: Mapping[str, float] | None = None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    max_error_rate: float = 0.0,
    baseline_path: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    pool_levels: bool = True,
) -> RecordComparison:
    """Compare every level and gated metric of ``record`` with ``baseline``.

    ``tolerances`` as returned by ``parse_tolerances`` (missing keys take the
    defaults). ``confidence`` is the one-sided level of the noise test.
    ``max_error_rate``: a level whose error rate is above it is invalid for
    the performance metrics (0: any failed request makes it invalid).
    ``pool_levels=False`` estimates the noise of each level from its own
    trials only (kept to measure the alternative; see the module docstring).
    The caller checks that the two records match (``baseline.check_match``).
    """
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0.5 and 1, got {confidence}")
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    specs = [METRICS[name] for name in (metrics or METRICS)]
    base_levels = {lv["concurrency"]: lv for lv in baseline.get("levels") or []}
    now_levels = {lv["concurrency"]: lv for lv in record.get("levels") or []}
    concurrencies = sorted(set(base_levels) | set(now_levels))

    shape = workload_differences(baseline.get("workload"), record.get("workload"))

    def reason_for(c: int, throughput: bool) -> str | None:
        if c not in base_levels:
            return "no baseline for this level"
        if c not in now_levels:
            return "in the baseline but not measured in this run"
        if shape:
            return "the workload is not the baseline's (" + "; ".join(shape) + "); save a new baseline"
        bad_base = invalid_reason(base_levels[c], max_error_rate, throughput=throughput)
        bad_now = invalid_reason(now_levels[c], max_error_rate, throughput=throughput)
        return (f"this run: {bad_now}" if bad_now else None) or (f"baseline: {bad_base}" if bad_base else None)

    latency_reasons = {c: reason_for(c, False) for c in concurrencies}
    throughput_reasons = {c: reason_for(c, True) for c in concurrencies}

    def reasons_of(spec: MetricSpec) -> dict[int, str | None]:
        return throughput_reasons if spec.name == "throughput" else latency_reasons

    # Pool the trial-to-trial variance of each ratio metric over the comparable levels.
    samples: dict[tuple[str, int], _Sample] = {}
    pooled: dict[str, tuple[float, int]] = {}
    own_noise: set[tuple[str, int]] = set()
    for spec in specs:
        if spec.absolute:
            continue
        ss_sum, df_sum = 0.0, 0
        reasons = reasons_of(spec)
        for c in concurrencies:
            if reasons[c] is not None:
                continue
            lb = _logs([spec.extract(t) for t in level_trials(base_levels[c])])
            ln = _logs([spec.extract(t) for t in level_trials(now_levels[c])])
            if lb is None or ln is None:
                continue
            sample = _Sample(lb, ln)
            samples[(spec.name, c)] = sample
            ss, df = sample.ss_df
            ss_sum += ss
            df_sum += df
        # A level that scatters far more than the others (F-test against the rest) keeps its own
        # noise estimate and leaves the pool, so it can neither hide in it nor inflate it; so does
        # a front-end-bound one, whatever the test says: its noise is the saturated API process's
        # (on an H200, CV 9.6 % at c=256 against 1.4 % at c=16), not the GPU's.
        for c in concurrencies:
            sample = samples.get((spec.name, c))
            if sample is None or not pool_levels:
                continue
            ss, df = sample.ss_df
            if _front_end_bound(base_levels[c], now_levels[c]) or _noisier_than_the_rest(ss, df, ss_sum, df_sum):
                own_noise.add((spec.name, c))
        for name_c in own_noise:
            if name_c[0] == spec.name:
                ss, df = samples[name_c].ss_df
                ss_sum -= ss
                df_sum -= df
        pooled[spec.name] = (math.sqrt(ss_sum / df_sum) if df_sum else 0.0, df_sum)

    two_sided = 2 * confidence - 1
    levels: list[LevelComparison] = []
    for c in concurrencies:
        results: list[MetricComparison] = []
        for spec in specs:
            reason = reasons_of(spec)[c]
            t = tol[spec.name]
            common = dict(concurrency=c, tolerance=t, higher_is_better=spec.higher_is_better, name=spec.name)
            if c not in base_levels or c not in now_levels:
                results.append(MetricComparison(spec.label, status=MISSING, message=(
                    f"{spec.label} missing at c={c}: {reason}"), **common))
                continue
            b_trials, n_trials = level_trials(base_levels[c]), level_trials(now_levels[c])
            if spec.absolute:
                results.append(_compare_absolute(spec, c, b_trials, n_trials, t, base_levels[c], now_levels[c]))
                continue
            if reason is not None:
                # shown for context, never judged
                bv, nv = _geomean([spec.extract(t) for t in b_trials]), _geomean([spec.extract(t) for t in n_trials])
                change = nv / bv - 1 if bv and nv else None
                results.append(MetricComparison(spec.label, status=INVALID, message=(
                    f"{spec.label} not compared at c={c}: {reason}"), baseline=bv, now=nv, change=change,
                    n_baseline=len(b_trials), n_now=len(n_trials), **common))
                continue
            sample = samples.get((spec.name, c))
            if sample is None:
                results.append(MetricComparison(spec.label, status=MISSING, message=(
                    f"{spec.label} missing at c={c}: no positive value in the baseline or this run"), **common))
                continue
            sigma, df = pooled[spec.name]
            if not pool_levels or (spec.name, c) in own_noise:
                own_ss, own_df = sample.ss_df
                sigma, df = (math.sqrt(own_ss / own_df) if own_df else 0.0), own_df
            if df:
                noise = Noise(sigma * math.sqrt(1 / len(sample.logs_base) + 1 / len(sample.logs_now)),
                              t_ppf(confidence, df), f"{df} df")
            else:
                noise = within_noise(spec, b_trials, n_trials, confidence)
                if noise is None:
                    results.append(_unmeasured(spec, c, sample, common))
                    continue
            results.append(_compare_ratio(spec, c, sample, t, noise, confidence))
        levels.append(LevelComparison(c, results, note=latency_reasons[c] or ""))

    sources = []
    for spec in specs:
        if spec.name in pooled:
            sigma, df = pooled[spec.name]
            apart = sorted(c for name, c in own_noise if name == spec.name)
            sources.append((f"{spec.label} ±{math.expm1(sigma):.1%}/trial ({df} df)" if df
                            else f"{spec.label} within-level noise only (single trials: trial-to-trial "
                                 "noise not measured)")
                           + (f", own noise at c={','.join(map(str, apart))}" if apart else ""))
    sweep = []
    for spec in specs:
        if spec.name not in SWEEP_METRICS or spec.name not in pooled:
            continue
        # levels with their own (larger) noise stay out: the pooled sigma does not describe them
        parts = [(c, samples[(spec.name, c)]) for c in concurrencies
                 if (spec.name, c) in samples and (spec.name, c) not in own_noise]
        sigma, df = pooled[spec.name]
        if df:
            noises = [Noise(sigma * math.sqrt(1 / len(p.logs_base) + 1 / len(p.logs_now)), t_ppf(confidence, df),
                            f"{df} df") for _, p in parts]
        else:
            found = [within_noise(spec, level_trials(base_levels[c]), level_trials(now_levels[c]), confidence)
                     for c, _ in parts]
            kept = [(part, n) for part, n in zip(parts, found) if n is not None]
            parts, noises = [part for part, _ in kept], [n for _, n in kept]
        if len(parts) >= SWEEP_MIN_LEVELS:
            sweep.append(_compare_sweep(spec, parts, noises, tol[spec.name], confidence))
    key_b, key_n = _key(baseline), _key(record)
    engine = baseline.get("engine") or {}
    return RecordComparison(
        topology=key_n[1] or key_b[1], workload=key_n[2] or key_b[2], profile=key_n[0] or key_b[0],
        baseline_path=str(baseline_path) if baseline_path else None, levels=levels, tolerances=tol,
        confidence=two_sided,
        noise_source="trial-to-trial noise pooled over levels: " + "; ".join(sources),
        baseline_info={"created_at": baseline.get("created_at"), "git_commit": baseline.get("git_commit"),
                       "engine": engine.get("name"), "engine_version": engine.get("version"),
                       "saved_at": (baseline.get("baseline") or {}).get("saved_at")},
        sweep=sweep,
        host_differences=facts_differences(baseline.get("host"), record.get("host")),
        definition_differences=shape + topology_differences(baseline.get("topology"), record.get("topology")),
        baseline_note=str((baseline.get("baseline") or {}).get("note") or ""),
    )


def record_noise(record: Mapping[str, Any], max_error_rate: float = 0.0) -> dict[str, Any]:
    """The noise a record measured of itself, per gated metric: what a baseline carries.

    ``trial``: the trial-to-trial scatter (log sigma pooled over the levels
    that can be compared, and its degrees of freedom); ``within``: the median
    of the trials' own within-level noise. Comparisons recompute the pooled
    figure from the trials; this block states it where a reader sees it.
    """
    out: dict[str, Any] = {}
    for spec in METRICS.values():
        if spec.absolute:
            continue
        ss, df, within = 0.0, 0, []
        for level in record.get("levels") or []:
            if invalid_reason(level, max_error_rate, throughput=spec.name == "throughput"):
                continue
            trials = level_trials(level)
            logs = _logs([spec.extract(t) for t in trials])
            if logs and len(logs) > 1:
                mean = math.fsum(logs) / len(logs)
                ss += math.fsum((x - mean) ** 2 for x in logs)
                df += len(logs) - 1
            within += [se for t in trials if (se := trial_noise(t, spec.name)) is not None]
        out[spec.name] = {"trial": math.expm1(math.sqrt(ss / df)) if df else None, "df": df,
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


HETEROGENEITY_P = 0.99


# What a request is: a change here makes two records measure different things.
WORKLOAD_SHAPE = ("input_tokens", "output_tokens", "ignore_eos", "api", "temperature", "measure")
# How the servers were started: a change here is what the comparison is for, and is named.
TOPOLOGY_SETUP = ("tensor_parallel", "data_parallel", "dp_mode", "max_num_seqs", "gpu_memory_utilization",
                  "max_model_len", "vllm_args", "env", "api_server_count")


def _differ(fields: Sequence[str], base: Mapping[str, Any] | None, now: Mapping[str, Any] | None,
            prefix: str) -> list[str]:
    base, now = base or {}, now or {}
    out = []
    for key in fields:
        # "measure" came with steady windows: a record without it counted requests
        b, n = base.get(key, "count" if key == "measure" else None), now.get(key, "count" if key == "measure" else None)
        if b != n:
            out.append(f"{prefix}{key}: {b!r} (baseline) vs {n!r} (this run)")
    return out


def workload_differences(baseline: Mapping[str, Any] | None, record: Mapping[str, Any] | None) -> list[str]:
    return _differ(WORKLOAD_SHAPE, baseline, record, "workload ")


def topology_differences(baseline: Mapping[str, Any] | None, record: Mapping[str, Any] | None) -> list[str]:
    return _differ(TOPOLOGY_SETUP, baseline, record, "topology ")


def _front_end_bound(*levels: Mapping[str, Any]) -> bool:
    return any(t.get("front_end_bound") for level in levels for t in level_trials(level))


def _noisier_than_the_rest(ss: float, df: int, ss_all: float, df_all: int) -> bool:
    """F-test: is this level's variance significantly larger than that of the other levels?"""
    ss_rest, df_rest = ss_all - ss, df_all - df
    if df < 1 or df_rest < 1:
        return False
    if ss_rest <= 0:
        return ss > 0
    return (ss / df) / (ss_rest / df_rest) > f_ppf(HETEROGENEITY_P, df, df_rest)


def _key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return ((record.get("hardware") or {}).get("profile") or "", (record.get("topology") or {}).get("name") or "",
            (record.get("workload") or {}).get("name") or "")


@dataclass(frozen=True)
class Noise:
    """What one comparison's interval stands on: the standard error of the mean log change,
    the quantile it is multiplied by, and where the noise was measured."""

    se: float
    q: float
    source: str             # "12 df" (trial-to-trial), "within-level" (single trials)


def trial_noise(trial: Mapping[str, Any], name: str) -> float | None:
    """A trial's own within-level standard error of metric ``name`` (relative), if it measured one."""
    value = (trial.get("noise") or {}).get(name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value)
    return float(value) if ok else None


def within_noise(spec: MetricSpec, b_trials: Sequence[Mapping[str, Any]], n_trials: Sequence[Mapping[str, Any]],
                 confidence: float) -> Noise | None:
    """Single trials: the two levels' own within-level noise (batch means, order statistics).

    Within one level is all a single trial can measure; it leaves the
    trial-to-trial scatter out, which is why ``--save-baseline`` measures
    three trials and the message says which noise the gate stood on.
    """
    ses = [trial_noise(t, spec.name) for t in (*b_trials, *n_trials)]
    if not ses or any(se is None for se in ses):
        return None
    var_b = math.fsum(trial_noise(t, spec.name) ** 2 for t in b_trials) / len(b_trials) ** 2  # type: ignore[operator]
    var_n = math.fsum(trial_noise(t, spec.name) ** 2 for t in n_trials) / len(n_trials) ** 2  # type: ignore[operator]
    return Noise(math.sqrt(var_b + var_n), statistics.NormalDist().inv_cdf(confidence), "within-level")


def _unmeasured(spec: MetricSpec, c: int, sample: _Sample, common: Mapping[str, Any]) -> MetricComparison:
    """Single trials and no within-level noise: shown, never judged against a guessed noise."""
    bv, nv = math.exp(math.fsum(sample.logs_base) / len(sample.logs_base)), \
        math.exp(math.fsum(sample.logs_now) / len(sample.logs_now))
    return MetricComparison(spec.label, status=INVALID, message=(
        f"{spec.label} not compared at c={c}: single trials and no within-level noise measured for it "
        "(too few requests for this percentile, or a record from an older harness); "
        "save the baseline with --trials 3"), baseline=bv, now=nv, change=nv / bv - 1,
        n_baseline=len(sample.logs_base), n_now=len(sample.logs_now), **common)


def _judge(spec: MetricSpec, d: float, noise: Noise, tol: float) -> tuple[str, float, tuple[float, float], float]:
    """Status, ratio, interval and relative half-width for a mean log change ``d``."""
    half = noise.q * noise.se
    ratio = math.exp(d)
    lo, hi = math.exp(d - half), math.exp(d + half)
    if spec.higher_is_better:
        worse, better = ratio < 1 - tol and hi < 1, ratio > 1 + tol and lo > 1
    else:
        worse, better = ratio > 1 + tol and lo > 1, ratio < 1 - tol and hi < 1
    return (REGRESSED if worse else IMPROVED if better else OK), ratio, (lo, hi), math.expm1(half)


def _evidence(status: str, ratio: float, tol: float, noise: float, ci: tuple[float, float], two_sided: float,
              nb: int, nn: int, source: str) -> str:
    """The tail every ratio message shares: tolerance, noise band, trials, sensitivity."""
    trials = f"{nb} vs {nn} trials" + (", within-level noise only" if source == "within-level" else "")
    text = f"tolerance {tol:.0%}, {_fmt_band(noise, ci, two_sided)}; {trials}"
    if status == OK and (ratio < 1 - tol or ratio > 1 + tol):
        text += "; past tolerance but within the noise"
    if noise > tol:
        text += f"; could not have caught a change under {noise:.1%} (the noise band is wider than the tolerance)"
    return text


def _compare_ratio(spec: MetricSpec, c: int, sample: _Sample, tol: float, noise: Noise,
                   confidence: float) -> MetricComparison:
    nb, nn = len(sample.logs_base), len(sample.logs_now)
    mb = math.fsum(sample.logs_base) / nb
    mn = math.fsum(sample.logs_now) / nn
    status, ratio, (lo, hi), band = _judge(spec, mn - mb, noise, tol)
    base_v, now_v = math.exp(mb), math.exp(mn)
    two_sided = 2 * confidence - 1
    message = (f"{spec.label} {status} at c={c}: baseline {spec.fmt(base_v)}, now {spec.fmt(now_v)} "
               f"({ratio - 1:+.1%}), " + _evidence(status, ratio, tol, band, (lo, hi), two_sided, nb, nn,
                                                     noise.source))
    return MetricComparison(spec.label, c, status, message, base_v, now_v, ratio - 1, tol, band, (lo, hi),
                            two_sided, nb, nn, spec.higher_is_better, spec.name, noise.source)


def _compare_sweep(spec: MetricSpec, parts: Sequence[tuple[int, _Sample]], noises: Sequence[Noise], tol: float,
                   confidence: float) -> MetricComparison:
    """The whole sweep: the mean over levels of each level's mean log change.

    Levels count equally (a sweep is a curve, not a sum of requests); their
    runs are independent, so the variance of the mean is the sum of the
    levels' variances over L squared.
    """
    changes = [math.fsum(s.logs_now) / len(s.logs_now) - math.fsum(s.logs_base) / len(s.logs_base)
               for _, s in parts]
    n = len(parts)
    d = math.fsum(changes) / n
    noise = Noise(math.sqrt(math.fsum(x.se ** 2 for x in noises)) / n, noises[0].q, noises[0].source)
    status, ratio, (lo, hi), band = _judge(spec, d, noise, tol)
    two_sided = 2 * confidence - 1
    nb = min(len(s.logs_base) for _, s in parts)
    nn = min(len(s.logs_now) for _, s in parts)
    where = ",".join(str(c) for c, _ in parts)
    message = (f"{spec.label} {status} across the sweep: {ratio - 1:+.1%} on average over {n} levels (c={where}), "
               + _evidence(status, ratio, tol, band, (lo, hi), two_sided, nb, nn, noise.source))
    return MetricComparison(spec.label, SWEEP, status, message, None, None, ratio - 1, tol, band, (lo, hi),
                            two_sided, nb, nn, spec.higher_is_better, spec.name, noise.source)


def _compare_absolute(spec: MetricSpec, c: int, b_trials: Sequence[Mapping[str, Any]],
                      n_trials: Sequence[Mapping[str, Any]], limit: float,
                      b_level: Mapping[str, Any], n_level: Mapping[str, Any]) -> MetricComparison:
    common = dict(tolerance=limit, higher_is_better=False, name=spec.name, n_baseline=len(b_trials),
                  n_now=len(n_trials))
    if not n_trials:
        # a level that could not be measured at all is worse than any error rate
        why = invalid_reason(n_level) or "not measured"
        return MetricComparison(spec.label, c, INVALID, f"{spec.label} not compared at c={c}: this run: {why}",
                                **common)
    if not b_trials:
        why = invalid_reason(b_level) or "not measured"
        return MetricComparison(spec.label, c, INVALID, f"{spec.label} not compared at c={c}: baseline: {why}",
                                **common)
    b_vals = [spec.extract(t) for t in b_trials]
    n_vals = [spec.extract(t) for t in n_trials]
    if any(v is None for v in b_vals + n_vals):
        return MetricComparison(spec.label, c, MISSING, f"{spec.label} missing at c={c}: no request counts",
                                **common)
    # pooled over trials: failed / requests of the level as a whole
    base_v = _pooled_rate(b_trials, b_vals)   # type: ignore[arg-type]
    now_v = _pooled_rate(n_trials, n_vals)    # type: ignore[arg-type]
    diff = now_v - base_v
    status = REGRESSED if diff > limit else IMPROVED if diff < -max(limit, 0.0) and diff < 0 else OK
    failed = sum(int(t.get("failed") or 0) for t in n_trials)
    requests = sum(int(t.get("requests") or 0) for t in n_trials)
    message = (f"{spec.label} {status} at c={c}: baseline {base_v:.2%}, now {now_v:.2%} "
               f"({diff * 100:+.2f} points; {failed} of {requests} requests failed), "
               f"limit +{limit * 100:.2f} points")
    return MetricComparison(spec.label, c, status, message, base_v, now_v, diff, limit, None, None, None,
                            len(b_trials), len(n_trials), False, spec.name)


def _pooled_rate(trials: Sequence[Mapping[str, Any]], rates: Sequence[float]) -> float:
    requests = [t.get("requests") for t in trials]
    if all(isinstance(r, int) and r > 0 for r in requests):
        failed = sum(int(t.get("failed") or 0) for t in trials)
        return failed / sum(requests)  # type: ignore[arg-type]
    return math.fsum(rates) / len(rates)


# ---- terminal lines --------------------------------------------------------------------------

def _delta(m: MetricComparison | None) -> str:
    if m is None or m.change is None:
        return "-" if m is None or m.status != INVALID else "invalid"
    mark = {REGRESSED: " !", IMPROVED: " +", INVALID: " ?"}.get(m.status, "")
    if m.name == "error_rate":
        return f"{m.change * 100:+.2f}pt{mark}"
    return f"{m.change:+.1%}{mark}"


def _val(m: MetricComparison | None, which: str) -> str:
    if m is None:
        return "-"
    spec = METRICS[m.name]
    return spec.fmt(getattr(m, which))


COMPARISON_COLUMNS = ("conc", "output tok/s", "baseline", "Δ", "TTFT p99", "baseline", "Δ",
                      "TPOT p50", "baseline", "Δ", "errors Δ", "noise", "floor", "verdict", "gate")


def comparison_rows(comparison: RecordComparison, record: Mapping[str, Any] | None = None) -> list[tuple[str, ...]]:
    """One row per level; ``record`` adds its floor and floor verdict columns."""
    by_c = {lv["concurrency"]: lv for lv in (record or {}).get("levels") or []}
    rows = []
    for lv in comparison.levels:
        tp, ttft, tpot, err = (lv.get(n) for n in ("throughput", "ttft_p99", "tpot_p50", "error_rate"))
        noise = f"±{tp.noise:.1%}" if tp is not None and tp.noise is not None else "-"
        entry = by_c.get(lv.concurrency) or {}
        floor = f"{entry['floor']:,.0f}" if isinstance(entry.get("floor"), (int, float)) else "-"
        verdict = verdict_label(entry)
        rows.append((str(lv.concurrency), _val(tp, "now"), _val(tp, "baseline"), _delta(tp),
                     _val(ttft, "now"), _val(ttft, "baseline"), _delta(ttft),
                     _val(tpot, "now"), _val(tpot, "baseline"), _delta(tpot),
                     _delta(err), noise, floor, verdict, lv.status))
    return rows


def tolerance_text(tolerances: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" if k != "error_rate" else f"{k} +{v * 100:.2f}pt" for k, v in tolerances.items())


def comparison_lines(comparison: RecordComparison, record: Mapping[str, Any] | None = None, *,
                     verbose: bool = False) -> list[str]:
    """Terminal lines: a table with baseline columns and deltas, then one-line messages.

    Call once per topology (from ``pytest_terminal_summary``). Values are
    geometric means over trials. Regressions and improvements always get
    their message, invalid and missing levels their reason; ``verbose``
    adds every metric's message.
    """
    from ..report.terminal import (  # report is the terminal-table module; one-way import
        record_title,
        render_table,
    )

    info = comparison.baseline_info
    engine = f"{info.get('engine') or '?'} {info.get('engine_version') or ''}".rstrip()
    status = comparison.status.upper() if comparison.status == REGRESSED else comparison.status
    lines = [record_title(record) if record else comparison.topology,
             f"  vs baseline {comparison.baseline_path or '-'} (engine {engine}, saved "
             f"{info.get('saved_at') or info.get('created_at') or '?'}): {status}"]
    if comparison.baseline_note:
        lines.append(f"  baseline note: {comparison.baseline_note}")
    if comparison.host_differences:
        lines.append("  measured on another host: " + "; ".join(comparison.host_differences))
    if comparison.definition_differences:
        lines.append("  defined differently: " + "; ".join(comparison.definition_differences))
    lines += ["  " + ln for ln in render_table(COMPARISON_COLUMNS, comparison_rows(comparison, record))]
    lines.append("  (Δ: change vs baseline; ! regressed, + improved, ? not compared; noise: "
                 f"{comparison.confidence:.0%} interval of the throughput ratio; tolerances "
                 f"{tolerance_text(comparison.tolerances)})")
    lines.append(f"  {comparison.noise_source}")
    for lv in comparison.levels:
        for m in lv.metrics:
            if verbose or m.status in (REGRESSED, IMPROVED):
                lines.append(f"  {m.message}")
        if lv.note:
            lines.append(f"  c={lv.concurrency} {lv.status}: {lv.note}")
    for m in comparison.sweep:
        if verbose or m.status in (REGRESSED, IMPROVED):
            lines.append(f"  {m.message}")
    lines += ["  " + ln for ln in sensitivity_lines(comparison)]
    return lines


def sensitivity_lines(comparison: RecordComparison) -> list[str]:
    """Where the gate was blind: metrics whose noise band is wider than their tolerance."""
    blind: dict[str, list[MetricComparison]] = {}
    for m in [*(m for lv in comparison.levels for m in lv.metrics), *comparison.sweep]:
        if m.blind and m.status == OK:
            blind.setdefault(m.metric, []).append(m)
    out = []
    for metric, ms in blind.items():
        where = ", ".join(f"{'the sweep' if m.concurrency == SWEEP else f'c={m.concurrency}'} ±{m.noise:.1%}"
                          for m in ms)
        out.append(f"gate sensitivity: {metric} could not have caught a change smaller than its noise band "
                   f"({where}; tolerance {ms[0].tolerance:.0%}); more trials (--trials) or longer windows "
                   "(--precision) narrow it")
    return out


__all__ = [
    "ALIASES",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_TOLERANCES",
    "IMPROVED",
    "INVALID",
    "METRICS",
    "MISSING",
    "OK",
    "REGRESSED",
    "LevelComparison",
    "MetricComparison",
    "MetricSpec",
    "RecordComparison",
    "SWEEP",
    "compare_records",
    "comparison_lines",
    "comparison_rows",
    "sensitivity_lines",
    "invalid_reason",
    "level_trials",
    "noise_text",
    "record_noise",
    "parse_tolerances",
    "t_cdf",
    "t_ppf",
    "tolerance_text",
    "worst",
]
