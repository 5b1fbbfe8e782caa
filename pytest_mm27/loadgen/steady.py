"""Steady-state levels: warm up at the level, measure a window, stop at a stated precision.

Why
---
A closed loop that sends ``k x c`` requests and divides the tokens by the
time from first send to last completion measures the ramp (c prefills at
once), the drain (the last requests finishing with fewer than c in flight)
and, with fixed lengths, the lockstep waves of c requests that start and end
together. On an H200, 1-2 s levels of that kind scattered 10 % from trial to
trial. A steady level instead:

1. **warms up at the level**: every slot's first request asks for a share of
   the output length (slot k of c: ``ceil(L * (k + 1) / c)`` tokens), so the
   slots finish their first requests spread over one request time and refill
   at staggered phases, as a busy server's streams do. The warm-up ends when
   every first request is done (the server has met the level's batch sizes
   and no stream is left over from the ramp), or after ``warmup_s`` if that is
   longer;
2. **measures a window** ``[t0, t1)`` during which all c slots stay busy:
   output tok/s is the tokens that *arrived* inside the window over its
   length (whatever request they belong to), so ramp and drain are outside
   by construction. The requests *sent* inside the window are the measured
   requests: their TTFT, TPOT, ITL and E2EL keep vLLM's definitions;
3. **keeps the load on until the measured requests finish**: after ``t1``
   freed slots send *tail* requests just long enough (the longest remaining
   measured stream, plus two tokens) to keep c in flight until the last
   measured request ends, so no measured request runs in a draining batch
   and the level ends a few steps after it.

Precision
---------
The window's throughput is a mean over a correlated series (token arrivals
per 50 ms bin), so its uncertainty comes from **batch means**: the window is
cut into equal batches, the batch size doubled while the batch means' lag-1
autocorrelation is significant (``> 2 / sqrt(k)``, with at least 20
batches), and the 95 % t interval of their mean gives the relative
half-width. A level with an adaptive window ends when that half-width is
within the target (default 1 %) after at least ``min_window_s``, or at the
cap (default 60 s). While the level runs the rule watches chunk arrivals (a
token proxy read from the live streams); the figure kept in the record is
recomputed at the end from the server's token counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..stats import t_ppf

BIN_S = 0.05            # token arrivals are counted in bins this wide
MIN_BATCH_S = 0.25      # the shortest batch of the batch-means estimate
MAX_START_BATCHES = 64  # batch size starts where the window holds at most this many
MIN_BATCHES = 10        # fewer batches give no estimate
DOUBLE_WHILE_BATCHES = 20   # the batch size only doubles while at least this many remain
CONFIDENCE = 0.95
TAIL_MARGIN_TOKENS = 2  # a tail request outlives the last measured stream by about this many steps
CHECK_INTERVAL_S = 0.25

# stop reasons
PRECISION = "precision reached"
TIME_CAP = "time cap"
FIXED = "fixed window"
TIMED_OUT = "level timeout"


@dataclass(frozen=True)
class Precision:
    """How well a window's mean rate is known."""

    rate: float             # mean over the batches, per second
    half_width: float       # relative half-width of the 95 % interval (0.01 = ±1 %)
    batches: int
    batch_s: float
    lag1: float             # lag-1 autocorrelation of the batch means used

    @property
    def standard_error(self) -> float:
        """Relative standard error of the rate (the half-width over its t quantile)."""
        return self.half_width / t_ppf(0.5 + CONFIDENCE / 2, self.batches - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lag1(values: Sequence[float]) -> float:
    n = len(values)
    mean = math.fsum(values) / n
    dev = [v - mean for v in values]
    denom = math.fsum(d * d for d in dev)
    if denom <= 0:
        return 0.0
    return math.fsum(a * b for a, b in zip(dev, dev[1:])) / denom


def batch_means(series: Sequence[float], bin_s: float = BIN_S) -> Precision | None:
    """The 95 % interval of the mean rate of ``series`` (amounts per bin of ``bin_s`` seconds).

    None when the series is too short for ``MIN_BATCHES`` batches, or carries nothing.
    """
    size = max(1, math.ceil(MIN_BATCH_S / bin_s))
    size = max(size, math.ceil(len(series) / MAX_START_BATCHES))
    while True:
        k = len(series) // size
        if k < MIN_BATCHES:
            return None
        # the bins left over at the end are dropped, so every batch has the same length
        means = [math.fsum(series[i * size:(i + 1) * size]) / (size * bin_s) for i in range(k)]
        lag1 = _lag1(means)
        if lag1 > 2 / math.sqrt(k) and k // 2 >= DOUBLE_WHILE_BATCHES:
            size *= 2
            continue
        mean = math.fsum(means) / k
        if mean <= 0:
            return None
        sd = math.sqrt(math.fsum((m - mean) ** 2 for m in means) / (k - 1))
        half = t_ppf(0.5 + CONFIDENCE / 2, k - 1) * sd / math.sqrt(k) / mean
        return Precision(rate=mean, half_width=half, batches=k, batch_s=size * bin_s, lag1=lag1)


def binned(times: Sequence[float], weights: Sequence[float] | float, start: float, end: float,
           bin_s: float = BIN_S) -> list[float]:
    """Sum of ``weights`` per bin of ``[start, end)`` for events at ``times`` (a scalar weight applies to all)."""
    n = max(0, int((end - start) / bin_s))
    out = [0.0] * n
    scalar = not isinstance(weights, Sequence)
    for i, t in enumerate(times):
        k = int((t - start) / bin_s)
        if 0 <= k < n and t >= start:
            out[k] += weights if scalar else weights[i]      # type: ignore[index,operator]
    return out


@dataclass(frozen=True)
class WindowRule:
    """When a steady window stops taking measured requests.

    The window's throughput is counted until its last measured request is
    done, about one request time (``ahead``) after the last one is sent, with
    the load kept at c meanwhile by tail requests. So every rule looks that far
    ahead: a fixed ``window_s`` stops sending ``ahead`` before its end; the
    adaptive rule stops once the precision it will have reached by then (the
    half-width shrinks as one over the square root of the length) is within
    the target, the window will be at least ``min_window_s`` long, or the cap
    would be passed.
    """

    window_s: float | None = None     # fixed length; None: adaptive
    precision: float = 0.01
    min_window_s: float = 5.0
    max_window_s: float = 60.0

    def decide(self, elapsed: float, series: Sequence[float], bin_s: float = BIN_S,
               ahead: float = 0.0) -> str | None:
        """The stop reason once sending may stop, else None (``series``: arrivals per bin since t0)."""
        length = elapsed + ahead
        if self.window_s is not None:
            return FIXED if length >= self.window_s and elapsed >= self.window_s / 4 else None
        if length >= self.max_window_s:
            return TIME_CAP
        if length < self.min_window_s:
            return None
        p = batch_means(series, bin_s)
        if p is None:
            return None
        projected = p.half_width * math.sqrt(elapsed / length) if length > 0 else p.half_width
        return PRECISION if projected <= self.precision else None


def staggered_tokens(slot: int, slots: int, output_tokens: int) -> int:
    """Output length of slot ``slot``'s first request: an even share of one request time per slot."""
    return max(1, math.ceil(output_tokens * (slot + 1) / slots))


def tail_tokens(remaining: int, output_tokens: int) -> int:
    """A tail request's length: just outlive the longest remaining measured stream."""
    return max(1, min(output_tokens, remaining + TAIL_MARGIN_TOKENS))


NOTHING = "nothing served"


class WindowClock:
    """Decides when a steady window opens and when it stops taking measured requests (pure; any clock).

    One clock serves a level whether its slots run in this process or in
    several worker processes (the parent then ticks it with their sums).
    """

    def __init__(self, rule: WindowRule, start: float, warmup_s: float, concurrency: int):
        self.rule = rule
        self.start = start
        self.warmup_s = warmup_s
        self.concurrency = concurrency
        self.t0: float | None = None        # the window opens
        self.t1: float | None = None        # no measured request is sent from here on
        self.reason: str | None = None
        self.series: list[float] = []       # chunk arrivals per tick since t0
        self._last = 0

    def tick(self, now: float, chunks: int, warm: bool, measured_ok: int, measured_failed: int,
             request_s: float = 0.0) -> None:
        """``chunks``: arrivals so far; ``warm``: every first request is done; counts: measured requests
        done; ``request_s``: how long a full-length request took (the window runs that long after t1)."""
        if self.t1 is not None:
            return
        if self.t0 is None:
            if warm and now >= self.start + self.warmup_s:
                self.t0, self._last = now, chunks
            return
        self.series.append(chunks - self._last)
        self._last = chunks
        elapsed = now - self.t0
        reason = self.rule.decide(elapsed, self.series, CHECK_INTERVAL_S, ahead=request_s)
        if reason is None and measured_ok == 0 and (measured_failed >= self.concurrency or (
                elapsed >= self.rule.min_window_s and not any(self.series))):
            reason = NOTHING      # a server that answers only errors must not hold the level for its cap
        if reason is not None:
            self.t1, self.reason = now, reason


class SteadySlots:
    """One process's side of a steady level: what each slot sends, and what is in flight.

    ``claim`` and the ``started``/``finished`` hooks are called by the closed
    loop; ``t0``/``t1`` (this process's monotonic clock) are set by whoever
    ticks the level's :class:`WindowClock`.
    """

    def __init__(self, slots: int, output_tokens: int, base: int = 0, first_slot: int = 0,
                 level_slots: int | None = None):
        """``first_slot`` of ``level_slots``: where this process's slots sit among the level's,
        so the first requests are staggered across all processes, not within each."""
        self.slots = slots
        self.output_tokens = output_tokens
        self.base = base
        self.first_slot = first_slot
        self.level_slots = level_slots or slots
        self.next = 0
        self.first_left = slots
        self.warm_at: float | None = None
        self.request_s = 0.0        # the longest first request (full length): one request time
        self.t0: float | None = None
        self.t1: float | None = None
        self.ok = 0                 # measured requests done, by outcome
        self.failed = 0
        self.done_chunks = 0
        self.live: dict[int, tuple[Any, Any, int]] = {}     # index -> (record, parser, max_tokens)

    def claim(self) -> tuple[int, int | None] | None:
        i = self.next
        if i < self.slots:
            tokens: int | None = staggered_tokens(self.first_slot + i, self.level_slots, self.output_tokens)
        elif self.t1 is None or time.monotonic() < self.t1:
            tokens = None
        else:
            remaining = self.measured_remaining()
            if remaining <= 0:
                return None
            tokens = tail_tokens(remaining, self.output_tokens)
        self.next += 1
        return self.base + i, tokens

    def measured(self, sent: float) -> bool:
        return self.t0 is not None and sent >= self.t0 and (self.t1 is None or sent < self.t1)

    def measured_remaining(self) -> int:
        """Tokens still due on the longest measured stream in flight (chunks stand in for tokens)."""
        return max((mt - len(p.chunk_times) for rec, p, mt in self.live.values() if self.measured(rec.sent)),
                   default=0)

    def started(self, rec: Any, parser: Any, max_tokens: int) -> None:
        self.live[rec.index] = (rec, parser, max_tokens)

    def finished(self, rec: Any) -> None:
        _, parser, _ = self.live.pop(rec.index)
        self.done_chunks += len(parser.chunk_times)
        if rec.index - self.base < self.slots:
            self.first_left -= 1
            self.request_s = max(self.request_s, rec.end - rec.sent)
            if self.first_left == 0:
                self.warm_at = rec.end
        elif self.measured(rec.sent):
            if rec.ok:
                self.ok += 1
            else:
                self.failed += 1

    def chunks(self) -> int:
        return self.done_chunks + sum(len(p.chunk_times) for _, p, _ in self.live.values())
