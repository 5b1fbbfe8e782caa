"""Goodput against per-request SLOs, the saturation point of a rate sweep, and the rate search.

Pure functions (no I/O, no clocks), except :func:`search_rate`, which calls
the measuring function it is given.

- A request meets the SLOs when it succeeded and its TTFT, TPOT and E2EL are
  at or below each ceiling given (vLLM's ``--goodput`` definition; a TPOT
  undefined for a one-token answer is no miss). Attainment: met / measured
  requests (failures count as misses). Goodput: met requests, and their
  output tokens, over the level's measured time.
- Saturation (open-loop sweeps): a level is past the saturation point when
  the achieved request rate falls short of the offered one by more than
  ``SHORTFALL`` while its latency climbed against the level below it
  (TTFT, E2EL or client queue time p50 up by more than ``CLIMB`` and at
  least ``CLIMB_MIN_MS``). Achieved is the completion rate (first to last
  completion) and offered the schedule's rate as drawn, where measured: a
  seeded Poisson draw is faster or slower than its nominal rate, and
  ok / duration would count the drain after the last send. Against the drawn
  schedule a max-concurrency cap that holds requests back in the client
  shows as saturation too (its queue time climbs), as a user would see it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..catalog.slo import RateSearch, SloSpec
from .metrics import LevelMetrics
from .samples import RequestRecord

SHORTFALL = 0.10    # achieved below offered by this share
CLIMB = 0.50        # a latency p50 up by this share against the level below
CLIMB_MIN_MS = 1.0  # ... and by at least this much (a queue time of 0.01 -> 0.02 ms is no climb)


def missed(rec: RequestRecord, slo: SloSpec) -> list[str]:
    """The SLOs ``rec`` misses ("failed" for a failed request)."""
    if not rec.ok:
        return ["failed"]
    out = []
    ttft, e2el, tpot = rec.ttft, rec.e2el, rec.tpot
    if slo.ttft_ms is not None and (ttft is None or ttft * 1000.0 > slo.ttft_ms):
        out.append("ttft_ms")
    if slo.tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo.tpot_ms:
        out.append("tpot_ms")
    if slo.e2el_ms is not None and (e2el is None or e2el * 1000.0 > slo.e2el_ms):
        out.append("e2el_ms")
    return out


@dataclass(frozen=True)
class Goodput:
    attainment: float | None
    req_s: float
    tok_s: float
    misses: dict[str, int]


def goodput(measured: Sequence[RequestRecord], slo: SloSpec, duration_s: float) -> Goodput:
    misses: dict[str, int] = {}
    met_n = met_tokens = 0
    for rec in measured:
        why = missed(rec, slo)
        for name in why:
            misses[name] = misses.get(name, 0) + 1
        if not why:
            met_n += 1
            met_tokens += rec.output_tokens
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return Goodput(met_n / len(measured) if measured else None, rate(met_n), rate(met_tokens), misses)


def apply_goodput(metrics: LevelMetrics, measured: Sequence[RequestRecord], slo: SloSpec | None) -> None:
    """Fill the level's goodput fields from its measured requests (nothing without SLOs)."""
    if slo is None:
        return
    g = goodput(measured, slo, metrics.duration_s)
    metrics.slo_attainment, metrics.goodput_req_s, metrics.goodput_tok_s = g.attainment, g.req_s, g.tok_s
    metrics.slo_misses = g.misses


def saturation(below: LevelMetrics | None, level: LevelMetrics) -> tuple[bool | None, str | None]:
    """Whether ``level`` (an open-loop rate level) is past saturation, judged against the rate ``below`` it."""
    if level.offered_rate is None or not level.offered_rate > 0:
        return None, None
    achieved = level.completion_rate if level.completion_rate is not None else level.request_tok_s
    offered = level.schedule_rate or level.offered_rate
    short = 1 - achieved / offered
    if below is None or short <= SHORTFALL:
        return False, None
    climbs = []
    for name in ("ttft_ms", "e2el_ms", "client_queue_ms"):
        b, n = getattr(below, name).p50, getattr(level, name).p50
        if n > b * (1 + CLIMB) and n - b >= CLIMB_MIN_MS:
            climbs.append(f"{name[:-3].replace('_', ' ')} p50 {b:.0f} -> {n:.0f} ms")
    if not climbs:
        return False, None
    sent = f" (drawn {level.schedule_rate:.2f}/s)" if level.schedule_rate else ""
    return True, (f"saturated: offered {level.offered_rate:g} req/s{sent}, completed {achieved:.2f} req/s "
                  f"({short:.0%} short) while {', '.join(climbs)} against {below.offered_rate:g} req/s")


def saturation_point(levels: Sequence[LevelMetrics]) -> float | None:
    """The offered rate of the first saturated level of a sweep (levels in rate order), or None."""
    below = None
    for level in levels:
        if saturation(below, level)[0]:
            return level.offered_rate
        below = level
    return None


@dataclass
class SearchResult:
    """The rate search's answer: the highest rate probed that held the attainment target."""

    rate: float | None              # None: not even min_rate held it
    target: float
    probes: list[tuple[float, float | None]] = field(default_factory=list)   # (rate, attainment)
    stop: str = ""
    best: LevelMetrics | None = None    # the probe at ``rate``
    last: LevelMetrics | None = None    # the last probe made

    def to_dict(self) -> dict[str, object]:
        return {"rate": self.rate, "target": self.target, "stop": self.stop,
                "probes": [{"rate": r, "attainment": a} for r, a in self.probes]}


def search_rate(measure: Callable[[float], LevelMetrics], search: RateSearch) -> SearchResult:
    """Bisection for the highest rate with attainment >= ``search.attainment``.

    Probes ``max_rate`` first (done if it holds), then ``min_rate`` (done if
    it fails), then halves the bracket until ``(hi - lo) / hi`` is below the
    tolerance or ``max_steps`` probes were made. Attainment is assumed to
    fall as the rate rises; a probe that contradicts it only moves the bracket.
    """
    out = SearchResult(None, search.attainment)

    def holds(rate: float) -> bool:
        m = out.last = measure(rate)
        out.probes.append((rate, m.slo_attainment))
        ok = m.slo_attainment is not None and m.slo_attainment >= search.attainment
        if ok and (out.rate is None or rate > out.rate):
            out.rate, out.best = rate, m
        return ok

    lo, hi = search.min_rate, search.max_rate
    if holds(hi):
        out.stop = f"max_rate {hi:g} req/s holds the target"
        return out
    if len(out.probes) >= search.max_steps:
        out.stop = f"{search.max_steps} probes made"
        return out
    if not holds(lo):
        out.stop = f"min_rate {lo:g} req/s misses the target"
        return out
    while True:
        if (hi - lo) / hi < search.tolerance:
            out.stop = f"bracket {lo:g}..{hi:g} req/s within {search.tolerance:.0%}"
            return out
        if len(out.probes) >= search.max_steps:
            out.stop = f"{search.max_steps} probes made (bracket {lo:g}..{hi:g} req/s)"
            return out
        mid = (lo + hi) / 2
        if holds(mid):
            lo = mid
        else:
            hi = mid
