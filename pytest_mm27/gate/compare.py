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
interval on log values, with the trial-to-trial variance pooled over the
baseline's comparable levels** plus the run's own trials at the level
(``gate.noise`` states the rule). Pooling is the important choice. With 3
trials per side a single level has only 4 degrees of freedom; its variance
estimate is so unsteady that any test built on it either raises false
alarms or misses real 10 % slowdowns (measured by ``python -m
pytest_mm27.benchmarks.gate_accuracy``). Levels that cannot be trusted
(client-bound, errors, timed out) are left out of the pool, and so is a level
whose scatter is significantly larger than the pool's, or that was front-end
bound: it keeps its own estimate, so it neither hides in the pool (false
alarms there) nor inflates it (missed regressions everywhere else). Because
a level's noise depends on the baseline and on that level alone, the verdict
a level's test gets while the run is under way is the verdict the session
summary gives it at the end.

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
(``gate.noise.within_noise``) and says so. A metric with no measured noise at
all (a p99 of too few requests, a record from an older harness) is shown and
not judged. Every message whose noise band is wider than the tolerance says
the smallest change it could have caught.

Trials within one session do not see slow drift between sessions (another
node, a driver update): the tolerance is what absorbs that, which is why it
is required on top of the noise test.

One level at a time, a single trial per side needs about a 10 % change to be
sure of it; a server 9 % slower at every level then passes every level. So
throughput is also judged across the sweep, at the end of the run: the mean
of the levels' log ratios, whose interval shrinks with the number of
comparable levels (independent runs), by the same rule (past tolerance and
outside the interval). Latencies are judged per level only: on a shared
machine their session-wide shifts are larger than the per-level noise model
allows.

Error rate is not a ratio: it fails when the run's error rate exceeds the
baseline's by more than its limit (absolute, default 0: any increase fails).
A level where either side had failed requests, was client-bound or timed out
is **invalid** for the performance metrics; it is reported, never silently
compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..host.hostfacts import facts_differences
from ..records.model import (
    IMPROVED, INVALID, MISSING, OK, REGRESSED, SWEEP, LevelComparison, LevelResult, MetricComparison,
    RecordComparison, RunRecord, Trial, as_record,
)
from .noise import Noise, NoiseModel, logs
from .noise import record_noise as noise_of
from .specs import ALL_METRICS, DEFAULT_TOLERANCES, METRICS, SLO_METRICS, MetricSpec
from .verdict import client_understatement

DEFAULT_CONFIDENCE = 0.99
SWEEP_MIN_LEVELS = 3    # fewer comparable levels add nothing to the per-level tests
SWEEP_METRICS = ("throughput",)
# A client-bound trial still counts for throughput when its requests waited this
# share of slot time or less to be sent: the client then cannot have hidden a
# change past any useful tolerance. Its latencies stay uncompared (blurred).
CLIENT_TRUST_SHARE = 0.01

# What a request is: a change here makes two records measure different things.
WORKLOAD_SHAPE = ("input_tokens", "output_tokens", "ignore_eos", "api", "temperature", "measure")
# How the servers were started: a change here is what the comparison is for, and is named.
TOPOLOGY_SETUP = ("tensor_parallel", "data_parallel", "dp_mode", "max_num_seqs", "gpu_memory_utilization",
                  "max_model_len", "vllm_args", "env", "api_server_count")


def _default_metrics(workload: Mapping[str, Any] | None, baseline: RunRecord) -> list[str]:
    """Every metric; goodput ones too when the workload (this run's, else the baseline's) has SLOs."""
    shape = workload if workload is not None else baseline.workload
    return [*METRICS, *(SLO_METRICS if (shape or {}).get("slo") else ())]


def invalid_reason(level: LevelResult | None, max_error_rate: float = 0.0, *,
                   throughput: bool = False) -> str | None:
    """Why a level's performance numbers cannot be compared, or None when they can.

    ``throughput``: judge for the throughput metric, which a client-bound trial
    does not invalidate when its dispatch delays were negligible.
    """
    trials = level.trials if level else []
    if not trials:
        problems = level.verdict.problems if level else ()
        return "not measured" + (f" ({problems[0].splitlines()[0]})" if problems else "")
    for i, t in enumerate(trials):
        tag = f" (trial {i + 1} of {len(trials)})" if len(trials) > 1 else ""
        if t.client_bound and not (throughput and client_understatement(t) <= CLIENT_TRUST_SHARE):
            return f"client-bound{tag}: {t.client_bound_reason or 'the client was the limit'}"
        rate = METRICS["error_rate"].extract(t) or 0.0
        if rate > max_error_rate or (max_error_rate == 0 and t.failed > 0):
            return f"had errors{tag}: {t.failed} of {t.requests} requests failed"
        if t.timed_out:
            return f"timed out{tag}: the level timeout cut the window short"
        if t.ok == 0:
            return f"no request succeeded{tag}"
    return None


def _differ(keys: Sequence[str], base: Mapping[str, Any], now: Mapping[str, Any], prefix: str) -> list[str]:
    out = []
    for key in keys:
        # "measure" came with steady windows: a record without it counted requests
        b, n = base.get(key, "count" if key == "measure" else None), now.get(key, "count" if key == "measure" else None)
        if b != n:
            out.append(f"{prefix}{key}: {b!r} (baseline) vs {n!r} (this run)")
    return out


def workload_differences(baseline: Mapping[str, Any] | None, record: Mapping[str, Any] | None) -> list[str]:
    return _differ(WORKLOAD_SHAPE, baseline or {}, record or {}, "workload ")


def topology_differences(baseline: Mapping[str, Any] | None, record: Mapping[str, Any] | None) -> list[str]:
    return _differ(TOPOLOGY_SETUP, baseline or {}, record or {}, "topology ")


def comparable(max_error_rate: float) -> Callable[[LevelResult, MetricSpec], bool]:
    """Whether a level's trials can be compared (and pooled) for a metric."""
    def check(level: LevelResult, spec: MetricSpec) -> bool:
        return invalid_reason(level, max_error_rate, throughput=spec.name == "throughput") is None
    return check


def record_noise(record: RunRecord | Mapping[str, Any], max_error_rate: float = 0.0) -> dict[str, Any]:
    """The noise block a baseline carries (``gate.noise.record_noise``)."""
    return noise_of(as_record(record), comparable(max_error_rate))


@dataclass(frozen=True)
class Judge:
    """Everything a comparison needs besides the two levels: set up once per baseline."""

    noise: NoiseModel
    tolerances: Mapping[str, float]
    confidence: float
    max_error_rate: float
    specs: tuple[MetricSpec, ...]
    shape: tuple[str, ...]          # workload differences: nothing is comparable then

    @classmethod
    def of(cls, baseline: RunRecord, workload: Mapping[str, Any] | None = None,
           tolerances: Mapping[str, float] | None = None, *, confidence: float = DEFAULT_CONFIDENCE,
           max_error_rate: float = 0.0, metrics: Sequence[str] | None = None, pool_levels: bool = True) -> Judge:
        if not 0.5 < confidence < 1.0:
            raise ValueError(f"confidence must be between 0.5 and 1, got {confidence}")

        return cls(NoiseModel(baseline, comparable(max_error_rate), pool_levels=pool_levels),
                   {**DEFAULT_TOLERANCES, **(tolerances or {})}, confidence, max_error_rate,
                   tuple(ALL_METRICS[name] for name in (metrics or _default_metrics(workload, baseline))),
                   tuple(workload_differences(baseline.workload, workload) if workload is not None else ()))

    def reason(self, b_level: LevelResult | None, n_level: LevelResult | None, throughput: bool) -> str | None:
        if b_level is None:
            return "no baseline for this level"
        if n_level is None:
            return "in the baseline but not measured in this run"
        if self.shape:
            return "the workload is not the baseline's (" + "; ".join(self.shape) + "); save a new baseline"
        bad_now = invalid_reason(n_level, self.max_error_rate, throughput=throughput)
        bad_base = invalid_reason(b_level, self.max_error_rate, throughput=throughput)
        return (f"this run: {bad_now}" if bad_now else None) or (f"baseline: {bad_base}" if bad_base else None)

    def level(self, c: int, b_level: LevelResult | None, n_level: LevelResult | None,
              case: str | None = None) -> LevelComparison:
        """One level of the run against the baseline's: every gated metric."""
        results = []
        for spec in self.specs:
            reason = self.reason(b_level, n_level, spec.name == "throughput")
            t = self.tolerances[spec.name]
            common = dict(concurrency=c, tolerance=t, higher_is_better=spec.higher_is_better, name=spec.name)
            if b_level is None or n_level is None:
                results.append(MetricComparison(spec.label, status=MISSING, message=(
                    f"{spec.label} missing at c={c}: {reason}"), **common))
                continue
            if spec.absolute and not self.shape:
                results.append(_compare_absolute(spec, c, b_level, n_level, t))
                continue
            if reason is not None:
                # shown for context, never judged
                bv, nv = _geomean(spec, b_level.trials), _geomean(spec, n_level.trials)
                results.append(MetricComparison(spec.label, status=INVALID, message=(
                    f"{spec.label} not compared at c={c}: {reason}"), baseline=bv, now=nv,
                    change=nv / bv - 1 if bv and nv else None, n_baseline=len(b_level.trials),
                    n_now=len(n_level.trials), **common))
                continue
            b_logs = logs([spec.extract(x) for x in b_level.trials])
            n_logs = logs([spec.extract(x) for x in n_level.trials])
            if b_logs is None or n_logs is None:
                results.append(MetricComparison(spec.label, status=MISSING, message=(
                    f"{spec.label} missing at c={c}: no positive value in the baseline or this run"), **common))
                continue
            noise = self.noise.for_level(spec, c, b_logs, n_logs, b_level, n_level, self.confidence)
            if noise is None:
                results.append(_unmeasured(spec, c, b_logs, n_logs, common))
                continue
            results.append(_compare_ratio(spec, c, b_logs, n_logs, t, noise, self.confidence))
        return LevelComparison(c, results, note=self.reason(b_level, n_level, False) or "", case=case)

    def sweep(self, levels: Sequence[LevelComparison], baseline: RunRecord, record: RunRecord) -> list[MetricComparison]:
        """Throughput across the sweep: the mean log change over the levels compared on pooled noise."""
        out = []
        for spec in self.specs:
            if spec.name not in SWEEP_METRICS:
                continue
            parts: list[tuple[int, list[float], list[float], Noise]] = []
            for lv in levels:
                m = lv.get(spec.name)
                b_level, n_level = baseline.level(lv.concurrency, lv.case), record.level(lv.concurrency, lv.case)
                if m is None or m.status == INVALID or m.status == MISSING or b_level is None or n_level is None:
                    continue
                if m.noise_source.endswith(", own"):
                    continue    # its own, larger noise: the pooled sigma does not describe it
                b_logs = logs([spec.extract(x) for x in b_level.trials])
                n_logs = logs([spec.extract(x) for x in n_level.trials])
                noise = self.noise.for_level(spec, lv.concurrency, b_logs, n_logs, b_level, n_level,  # type: ignore
                                             self.confidence)
                if b_logs and n_logs and noise is not None:
                    parts.append((lv.concurrency, b_logs, n_logs, noise))
            if len(parts) >= SWEEP_MIN_LEVELS:
                out.append(_compare_sweep(spec, parts, self.tolerances[spec.name], self.confidence))
        return out


def compare_records(
    baseline: RunRecord | Mapping[str, Any],
    record: RunRecord | Mapping[str, Any],
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
    trials only (kept to measure the alternative; see ``gate.noise``).
    The caller checks that the two records match (``baseline.check_match``).
    """
    base, now = as_record(baseline), as_record(record)
    judge = Judge.of(base, now.workload, tolerances, confidence=confidence, max_error_rate=max_error_rate,
                     metrics=metrics, pool_levels=pool_levels)
    keys = sorted({lv.key for lv in base.levels} | {lv.key for lv in now.levels})
    levels = [judge.level(c, base.level(c, case), now.level(c, case), case=case or None) for c, case in keys]
    return RecordComparison(
        topology=now.topology_name or base.topology_name, workload=now.workload_name or base.workload_name,
        profile=now.hardware.profile or base.hardware.profile,
        baseline_path=str(baseline_path) if baseline_path else None, levels=levels,
        tolerances=dict(judge.tolerances), confidence=2 * confidence - 1,
        noise_source="trial-to-trial noise pooled over levels: " + "; ".join(
            judge.noise.describe(spec) for spec in judge.specs if not spec.absolute),
        baseline_info={"created_at": base.created_at, "git_commit": base.git_commit, "engine": base.engine.name,
                       "engine_version": base.engine.version, "saved_at": (base.baseline or {}).get("saved_at")},
        sweep=judge.sweep(levels, base, now),
        host_differences=facts_differences(base.host, now.host),
        definition_differences=list(judge.shape) + topology_differences(base.topology, now.topology),
        baseline_note=str((base.baseline or {}).get("note") or ""),
    )


def _geomean(spec: MetricSpec, trials: Sequence[Trial]) -> float | None:
    xs = logs([spec.extract(t) for t in trials])
    return math.exp(math.fsum(xs) / len(xs)) if xs else None


def _fmt_band(noise: float, ci: tuple[float, float], confidence: float) -> str:
    return f"noise band ±{noise:.1%} ({confidence:.0%} CI of ratio [{ci[0]:.3f}, {ci[1]:.3f}])"


def _unmeasured(spec: MetricSpec, c: int, b_logs: Sequence[float], n_logs: Sequence[float],
                common: Mapping[str, Any]) -> MetricComparison:
    """Single trials and no within-level noise: shown, never judged against a guessed noise."""
    bv = math.exp(math.fsum(b_logs) / len(b_logs))
    nv = math.exp(math.fsum(n_logs) / len(n_logs))
    return MetricComparison(spec.label, status=INVALID, message=(
        f"{spec.label} not compared at c={c}: single trials and no within-level noise measured for it "
        "(too few requests for this percentile, or a record from an older harness); "
        "save the baseline with --trials 3"), baseline=bv, now=nv, change=nv / bv - 1,
        n_baseline=len(b_logs), n_now=len(n_logs), **common)


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


def _compare_ratio(spec: MetricSpec, c: int, b_logs: Sequence[float], n_logs: Sequence[float], tol: float,
                   noise: Noise, confidence: float) -> MetricComparison:
    nb, nn = len(b_logs), len(n_logs)
    mb, mn = math.fsum(b_logs) / nb, math.fsum(n_logs) / nn
    status, ratio, (lo, hi), band = _judge(spec, mn - mb, noise, tol)
    base_v, now_v = math.exp(mb), math.exp(mn)
    two_sided = 2 * confidence - 1
    message = (f"{spec.label} {status} at c={c}: baseline {spec.fmt(base_v)}, now {spec.fmt(now_v)} "
               f"({ratio - 1:+.1%}), " + _evidence(status, ratio, tol, band, (lo, hi), two_sided, nb, nn,
                                                     noise.source))
    return MetricComparison(spec.label, c, status, message, base_v, now_v, ratio - 1, tol, band, (lo, hi),
                            two_sided, nb, nn, spec.higher_is_better, spec.name, noise.source)


def _compare_sweep(spec: MetricSpec, parts: Sequence[tuple[int, list[float], list[float], Noise]], tol: float,
                   confidence: float) -> MetricComparison:
    """The whole sweep: the mean over levels of each level's mean log change.

    Levels count equally (a sweep is a curve, not a sum of requests); their
    runs are independent, so the variance of the mean is the sum of the
    levels' variances over L squared.
    """
    changes = [math.fsum(n) / len(n) - math.fsum(b) / len(b) for _, b, n, _ in parts]
    count = len(parts)
    d = math.fsum(changes) / count
    first = parts[0][3]
    noise = Noise(math.sqrt(math.fsum(x.se ** 2 for *_, x in parts)) / count, max(x.q for *_, x in parts),
                  first.source)
    status, ratio, (lo, hi), band = _judge(spec, d, noise, tol)
    two_sided = 2 * confidence - 1
    nb = min(len(b) for _, b, _, _ in parts)
    nn = min(len(n) for _, _, n, _ in parts)
    where = ",".join(str(c) for c, *_ in parts)
    message = (f"{spec.label} {status} across the sweep: {ratio - 1:+.1%} on average over {count} levels "
               f"(c={where}), " + _evidence(status, ratio, tol, band, (lo, hi), two_sided, nb, nn, noise.source))
    return MetricComparison(spec.label, SWEEP, status, message, None, None, ratio - 1, tol, band, (lo, hi),
                            two_sided, nb, nn, spec.higher_is_better, spec.name, noise.source)


def _compare_absolute(spec: MetricSpec, c: int, b_level: LevelResult, n_level: LevelResult,
                      limit: float) -> MetricComparison:
    b_trials, n_trials = b_level.trials, n_level.trials
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
    failed = sum(t.failed for t in n_trials)
    requests = sum(t.requests for t in n_trials)
    message = (f"{spec.label} {status} at c={c}: baseline {base_v:.2%}, now {now_v:.2%} "
               f"({diff * 100:+.2f} points; {failed} of {requests} requests failed), "
               f"limit +{limit * 100:.2f} points")
    return MetricComparison(spec.label, c, status, message, base_v, now_v, diff, limit, None, None, None,
                            len(b_trials), len(n_trials), False, spec.name)


def _pooled_rate(trials: Sequence[Trial], rates: Sequence[float]) -> float:
    if all(t.requests > 0 for t in trials):
        return sum(t.failed for t in trials) / sum(t.requests for t in trials)
    return math.fsum(rates) / len(rates)
