"""A level's metrics, computed once from the merged request records of all its workers.

Pure functions only: no I/O, no clocks. Definitions follow README.md's
"Metrics" section, which are those of vLLM's benchmark client:

- TTFT: request sent -> first chunk carrying generated text.
- ITL: every gap between consecutive text-bearing chunks (per chunk).
- TPOT: per request, (E2EL - TTFT) / (output_tokens - 1).
- E2EL: request sent -> last text-bearing chunk.
- output tokens: the server's ``usage.completion_tokens``.
- throughput: tokens of successful requests over the measured time: a
  counted level's first send to last completion (warm-up excluded), a steady
  level's window (``steady``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .precision import latency_noise, window_precision
from .samples import Percentiles, RequestRecord, steady_window, tokens_in_window

# --- client-bound thresholds (documented in README of the package, see __init__) ---
# The event loop overslept its 10 ms ticker by this much at p99: chunk
# timestamps are blurred by at least this much, so TTFT/ITL are not the server's.
LOOP_LAG_P99_LIMIT_MS = 10.0
# A request was sent this late after its slot freed (p99): the client, not the
# server, limited the offered concurrency.
DISPATCH_LAG_P99_LIMIT_MS = 10.0
# One worker process used this share of a core over the window: it had no
# headroom left, whatever the lags say.
CPU_UTIL_LIMIT = 0.90


@dataclass(frozen=True)
class SteadyWindow:
    """A steady level's window on the records' timeline (see ``steady``).

    Measured requests are those sent in ``[start, sends_end)``; throughput
    counts the tokens that arrived from ``start`` until the last of them was
    done, the load held at c by tail requests all along.
    """

    start: float
    sends_end: float
    level_end: float            # the last request of the level done
    reason: str | None          # why sending stopped: precision reached, time cap, fixed window, ...
    warmup_s: float             # level start -> window start
    wall_epoch: float           # wall-clock time of the timeline's zero


@dataclass
class SelfMeasurement:
    """What one worker process measured about itself over the measured window."""

    worker: int
    cpu_s: float                # process CPU time (user + system) over the window
    wall_s: float
    loop_lag_ms: list[float]    # oversleep of each ticker wake-up

    @property
    def cpu_util(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class LevelMetrics:
    """Everything measured at one concurrency level. JSON-safe via to_dict/from_dict."""

    concurrency: int
    requests: int               # measured requests sent (warm-up excluded)
    ok: int
    failed: int
    error_rate: float
    errors: dict[str, int]
    duration_s: float           # first send -> last completion of the measured window
    output_tokens: int
    prompt_tokens: int
    output_tok_s: float
    total_tok_s: float
    request_tok_s: float        # successful requests per second
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    itl_ms: Percentiles
    e2el_ms: Percentiles
    queue_ms: Percentiles       # dispatch lag: slot free -> request sent
    steady_output_tok_s: float | None = None
    steady_window_s: float | None = None
    # c x the mean per-stream decode rate (1/TPOT): output tok/s "summed over all
    # concurrent streams", as benchmark write-ups often report it; no ramp or drain.
    stream_output_tok_s: float | None = None
    # self-measurement
    workers: int = 1
    endpoints: list[str] = field(default_factory=list)
    loop_lag_ms: Percentiles = field(default_factory=lambda: Percentiles.of([]))
    client_cpu_s: float = 0.0           # all workers together
    client_cpu_util: float = 0.0        # busiest worker, share of one core
    worker_cpu_util: list[float] = field(default_factory=list)
    client_bound: bool = False
    client_bound_reason: str | None = None
    # server cross-check (vllm:generation_tokens_total over the measured window)
    server_output_tokens: int | None = None
    server_tokens_match: bool | None = None
    warmup_requests: int = 0
    timed_out: bool = False             # the level timeout cut the window short
    # prefix caching over the level (vllm:prefix_cache_queries/_hits, prompt tokens, all
    # endpoints); None where a server does not export them
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_hit_rate: float | None = None
    # steady levels (measure = "steady"): the window and how well its throughput is known
    measure: str = "count"
    precision: float | None = None      # relative half-width of the 95 % interval of output tok/s
    precision_batches: int | None = None
    precision_batch_s: float | None = None
    window_reason: str | None = None
    warmup_s: float | None = None
    tail_s: float | None = None
    window_wall: list[float] | None = None      # [start, end] on the wall clock (server CPU, GPU telemetry)
    # steady levels: the warm-up and tail requests around the measured ones
    unmeasured: dict[str, Any] = field(default_factory=dict)
    # Within-level noise: the relative standard error of each gated metric as
    # this one level measured it (batch means for throughput, order statistics
    # for percentiles); None where the sample is too small to say. The gate
    # uses it when single trials give no trial-to-trial scatter.
    noise: dict[str, float | None] = field(default_factory=dict)
    # open-loop levels (loadgen.arrivals): what was offered and what the client kept of it
    arrival: str | None = None          # "poisson 20/s", "trace x0.5", ...; None: closed loop
    offered_rate: float | None = None   # requests/s the schedule asked for
    schedule_rate: float | None = None  # requests/s of the schedule as drawn (a seeded Poisson draw is not exact)
    send_rate: float | None = None      # requests/s actually sent (first send -> last send)
    # requests/s completed, first completion -> last: follows send_rate (shifted by the latency)
    # until the server saturates; unlike ok / duration it has no drain at the end to dilute it
    completion_rate: float | None = None
    schedule_lag_ms: Percentiles = field(default_factory=lambda: Percentiles.of([]))   # due -> sent
    client_queue_ms: Percentiles = field(default_factory=lambda: Percentiles.of([]))   # due -> cap let it go
    max_in_flight: int | None = None
    # goodput (loadgen.goodput): requests meeting every SLO of the workload
    slo_attainment: float | None = None
    goodput_req_s: float | None = None
    goodput_tok_s: float | None = None
    slo_misses: dict[str, int] = field(default_factory=dict)   # per SLO, the requests past it
    # a rate sweep: this level is past the saturation point (loadgen.goodput.saturation)
    saturated: bool | None = None
    saturation_note: str | None = None
    wall_epoch: float | None = None     # wall-clock time of the level's timeline zero (its samples' times)
    # a rate search's level ([slo.search]): the highest rate that held the attainment target, and how
    max_good_rate: float | None = None
    rate_search: dict[str, Any] | None = None

    _NESTED = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "queue_ms", "loop_lag_ms", "schedule_lag_ms",
               "client_queue_ms")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._NESTED:
            data[name] = data[name].to_dict()
        data["errors"] = dict(self.errors)
        data["unmeasured"] = dict(self.unmeasured)
        data["noise"] = dict(self.noise)
        data["slo_misses"] = dict(self.slo_misses)
        data["endpoints"] = list(self.endpoints)
        data["worker_cpu_util"] = list(self.worker_cpu_util)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelMetrics:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for name in cls._NESTED:
            if name in kwargs and isinstance(kwargs[name], dict):
                kwargs[name] = Percentiles.from_dict(kwargs[name])
        return cls(**kwargs)

    def summary(self) -> str:
        steady = f"{self.steady_output_tok_s:.1f}" if self.steady_output_tok_s is not None else "-"
        line = (
            f"c={self.concurrency} req={self.requests} ok={self.ok} failed={self.failed} "
            f"out_tok/s={self.output_tok_s:.1f} steady={steady} "
            f"ttft p50={self.ttft_ms.p50:.1f}ms p99={self.ttft_ms.p99:.1f}ms "
            f"tpot p50={self.tpot_ms.p50:.2f}ms itl p99={self.itl_ms.p99:.2f}ms "
            f"e2el p50={self.e2el_ms.p50:.0f}ms queue p99={self.queue_ms.p99:.2f}ms "
            f"loop-lag p99={self.loop_lag_ms.p99:.2f}ms cpu={self.client_cpu_util:.0%}"
        )
        if self.server_tokens_match is not None:
            line += f" server-tokens={'match' if self.server_tokens_match else 'MISMATCH'}"
        if self.prefix_cache_hit_rate is not None:
            line += f" prefix-hits={self.prefix_cache_hit_rate:.1%}"
        if self.client_bound:
            line += f" CLIENT-BOUND ({self.client_bound_reason})"
        if self.errors:
            line += " errors=" + "; ".join(f"{n}x {r}" for r, n in self.errors.items())
        return line


def with_prefix_cache(metrics: LevelMetrics, counted: tuple[int, int] | None) -> LevelMetrics:
    """``metrics`` with the level's prefix-cache (queries, hits) and their ratio filled in."""
    if counted is not None:
        q, h = counted
        metrics.prefix_cache_queries, metrics.prefix_cache_hits = q, h
        metrics.prefix_cache_hit_rate = h / q if q > 0 else None
    return metrics


def judge_client_bound(
    queue: Percentiles, loop_lag: Percentiles, worker_cpu_util: Sequence[float]
) -> tuple[bool, str | None]:
    reasons = []
    if loop_lag.n and loop_lag.p99 > LOOP_LAG_P99_LIMIT_MS:
        reasons.append(f"event-loop lag p99 {loop_lag.p99:.1f} ms > {LOOP_LAG_P99_LIMIT_MS:g} ms")
    if queue.n and queue.p99 > DISPATCH_LAG_P99_LIMIT_MS:
        reasons.append(f"refill dispatch lag p99 {queue.p99:.1f} ms > {DISPATCH_LAG_P99_LIMIT_MS:g} ms")
    busiest = max(worker_cpu_util, default=0.0)
    if busiest > CPU_UTIL_LIMIT:
        reasons.append(f"worker CPU {busiest:.0%} of a core > {CPU_UTIL_LIMIT:.0%}")
    if reasons and busiest < 0.5:
        # Late wake-ups without CPU use: other processes took the cores.
        reasons.append(f"client got only {busiest:.0%} of a core: machine overloaded")
    return (bool(reasons), "; ".join(reasons) or None)


def compute_level_metrics(
    records: Sequence[RequestRecord],
    concurrency: int,
    *,
    self_measurements: Sequence[SelfMeasurement] = (),
    endpoints: Sequence[str] = (),
    warmup_requests: int = 0,
    server_output_tokens: int | None = None,
    timed_out: bool = False,
    window: SteadyWindow | None = None,
) -> LevelMetrics:
    """Metrics of one level from the merged records of all its workers, computed once.

    With a steady ``window`` the measured requests are those sent inside it
    (latencies, errors, request counts) and throughput is the tokens that
    arrived inside it, from any request, over its length.
    """
    if window is not None:
        return _steady_metrics(records, concurrency, window, self_measurements=self_measurements,
                               endpoints=endpoints, server_output_tokens=server_output_tokens, timed_out=timed_out)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    if records:
        duration = max(r.end for r in records) - min(r.sent for r in records)
    else:
        duration = 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    steady_rate = steady_span = None
    span = steady_window(records, concurrency)
    if span is not None:
        start, end = span
        steady_span = end - start
        steady_rate = sum(tokens_in_window(r, start, end) for r in ok) / steady_span

    match: bool | None = None
    if server_output_tokens is not None and not failed and not timed_out:
        match = server_output_tokens == out_tokens

    return LevelMetrics(
        concurrency=concurrency,
        requests=len(records),
        ok=len(ok),
        failed=len(failed),
        error_rate=len(failed) / len(records) if records else 0.0,
        errors=_errors(failed),
        duration_s=duration,
        output_tokens=out_tokens,
        prompt_tokens=prompt_tokens,
        output_tok_s=rate(out_tokens),
        total_tok_s=rate(out_tokens + prompt_tokens),
        request_tok_s=rate(len(ok)),
        queue_ms=Percentiles.of((r.sent - r.slot_free) * 1000.0 for r in records),
        steady_output_tok_s=steady_rate,
        steady_window_s=steady_span,
        **_latencies(ok, concurrency),
        endpoints=list(endpoints),
        **_client(records, self_measurements),
        server_output_tokens=server_output_tokens,
        server_tokens_match=match,
        warmup_requests=warmup_requests,
        timed_out=timed_out,
        noise=latency_noise(ok),
    )


def _latencies(ok: Sequence[RequestRecord], concurrency: int) -> dict[str, Any]:
    """The latency blocks and stream rate of successful requests (vLLM's definitions)."""
    ms = 1000.0
    tpot_values = [t for r in ok if (t := r.tpot) is not None]
    decode_rates = [1.0 / t for t in tpot_values if t > 0]
    itl_values: list[float] = []
    for r in ok:
        ct = r.chunk_times
        itl_values.extend((b - a) * ms for a, b in zip(ct, ct[1:]))
    return {
        "ttft_ms": Percentiles.of(r.ttft * ms for r in ok if r.chunk_times),
        "e2el_ms": Percentiles.of(r.e2el * ms for r in ok if r.chunk_times),
        "tpot_ms": Percentiles.of(t * ms for t in tpot_values),
        "itl_ms": Percentiles.of(itl_values),
        "stream_output_tok_s": concurrency * sum(decode_rates) / len(decode_rates) if decode_rates else None,
    }


def _client(records: Sequence[RequestRecord], self_measurements: Sequence[SelfMeasurement]) -> dict[str, Any]:
    """The client's measurement of itself, and whether it may have set the numbers."""
    lag_values: list[float] = []
    for sm in self_measurements:
        lag_values.extend(sm.loop_lag_ms)
    loop_lag = Percentiles.of(lag_values)
    worker_util = [sm.cpu_util for sm in sorted(self_measurements, key=lambda s: s.worker)]
    # The first c sends all fall due at once (ramp-up); only refills show
    # whether the client keeps up, so only they are judged.
    refill_queue = Percentiles.of((r.sent - r.slot_free) * 1000.0 for r in records if not r.ramp)
    bound, reason = judge_client_bound(refill_queue, loop_lag, worker_util)
    return {
        "workers": max(1, len(self_measurements)), "loop_lag_ms": loop_lag,
        "client_cpu_s": sum(sm.cpu_s for sm in self_measurements),
        "client_cpu_util": max(worker_util, default=0.0), "worker_cpu_util": worker_util,
        "client_bound": bound, "client_bound_reason": reason,
    }


def _errors(failed: Sequence[RequestRecord]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for r in failed:
        reason = r.error or "unknown error"
        errors[reason] = errors.get(reason, 0) + 1
    return errors


def _steady_metrics(records: Sequence[RequestRecord], concurrency: int, window: SteadyWindow, *,
                    self_measurements: Sequence[SelfMeasurement], endpoints: Sequence[str],
                    server_output_tokens: int | None, timed_out: bool) -> LevelMetrics:
    start, sends_end = window.start, window.sends_end
    measured = [r for r in records if start <= r.sent < sends_end]
    others = [r for r in records if not start <= r.sent < sends_end]
    end = max((r.end for r in measured), default=sends_end)
    span = max(0.0, end - start)
    ok = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    all_ok = [r for r in records if r.ok]
    window_tokens = math.fsum(tokens_in_window(r, start, end) for r in all_ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)

    def rate(x: float) -> float:
        return x / span if span > 0 else 0.0

    output_rate = rate(window_tokens)
    precision = window_precision(records, start, end) if span > 0 else None
    other_failed = [r for r in others if not r.ok]
    match: bool | None = None
    if server_output_tokens is not None and not failed and not other_failed and not timed_out:
        match = server_output_tokens == sum(r.output_tokens for r in all_ok)
    return LevelMetrics(
        concurrency=concurrency,
        requests=len(measured),
        ok=len(ok),
        failed=len(failed),
        error_rate=len(failed) / len(measured) if measured else 0.0,
        errors=_errors(failed),
        duration_s=span,
        output_tokens=sum(r.output_tokens for r in ok),
        prompt_tokens=prompt_tokens,
        output_tok_s=output_rate,
        total_tok_s=output_rate + rate(prompt_tokens),
        request_tok_s=rate(len(ok)),
        queue_ms=Percentiles.of((r.sent - r.slot_free) * 1000.0 for r in measured),
        steady_output_tok_s=output_rate,
        steady_window_s=span,
        **_latencies(ok, concurrency),
        endpoints=list(endpoints),
        **_client(measured, self_measurements),
        server_output_tokens=server_output_tokens,
        server_tokens_match=match,
        timed_out=timed_out,
        measure="steady",
        precision=precision.half_width if precision else None,
        precision_batches=precision.batches if precision else None,
        precision_batch_s=precision.batch_s if precision else None,
        window_reason=window.reason,
        warmup_s=window.warmup_s,
        tail_s=max(0.0, window.level_end - end),
        window_wall=[window.wall_epoch + start, window.wall_epoch + end],
        unmeasured={"requests": len(others), "ok": len(others) - len(other_failed), "failed": len(other_failed),
                    "output_tokens": sum(r.output_tokens for r in others if r.ok), "errors": _errors(other_failed)},
        noise={"throughput": precision.standard_error if precision else None, **latency_noise(ok)},
    )
