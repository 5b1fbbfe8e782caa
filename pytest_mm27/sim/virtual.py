"""The scheduler on a virtual clock: a closed-loop client against DP engines, no HTTP.

Same protocol as the load generator: at level c keep c requests in flight
until ``requests`` have been sent; each has ``input_tokens`` prompt tokens and
exactly ``output_tokens`` output tokens. A new request reaches the scheduler
``ingest_latency_ms`` after the previous one finished (client round trip plus
the API server's ingest), so it joins the step after the one in progress,
exactly as it does in the served simulator.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass
from typing import Any

from .cluster import SimSetup
from .scheduler import EngineCore, Seq

_ARRIVAL, _STEP_END = 1, 0      # at equal times, finish steps before delivering arrivals


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass(frozen=True)
class LevelPrediction:
    concurrency: int
    requests: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    e2el_p50_ms: float
    duration_s: float
    output_tokens: int
    preemptions: int
    max_running: int          # largest running batch of any engine
    stream_output_tok_s: float = 0.0    # c x mean per-stream decode rate (1/TPOT), see loadgen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate_level(setup: SimSetup, concurrency: int, requests: int, input_tokens: int,
                   output_tokens: int, duration_s: float | None = None) -> LevelPrediction:
    engines = setup.build_engines()
    ingest = setup.calibration.ingest_latency_ms * 1e-3
    outstanding = [0] * len(engines)
    plans: list[Any] = [None] * len(engines)
    events: list[tuple[float, int, int, int, Any]] = []   # (time, kind, order, engine, payload)
    order = 0
    sent = 0
    records: list[Seq] = []
    max_running = 0

    def send(now: float) -> None:
        nonlocal sent, order
        # least outstanding requests, lowest index on ties (vLLM's DP coordinator)
        e = min(range(len(engines)), key=outstanding.__getitem__)
        outstanding[e] += 1
        seq = Seq(sent, input_tokens, output_tokens, now)
        sent += 1
        order += 1
        heapq.heappush(events, (now + ingest, _ARRIVAL, order, e, seq))

    def more(now: float) -> bool:
        if duration_s is not None:
            return now < duration_s
        return sent < requests

    for _ in range(concurrency if duration_s is not None else min(concurrency, requests)):
        send(0.0)

    def start(e: int, now: float) -> None:
        nonlocal order, max_running
        plan = engines[e].schedule()
        plans[e] = plan
        if plan is not None:
            order += 1
            if len(engines[e].running) > max_running:
                max_running = len(engines[e].running)
            heapq.heappush(events, (now + plan.duration, _STEP_END, order, e, None))
        elif engines[e].has_work():
            raise RuntimeError("scheduler stalled: a waiting request can never be scheduled")

    now = 0.0
    while events:
        now = events[0][0]
        kicked: list[int] = []
        while events and events[0][0] == now:
            _, kind, _, e, payload = heapq.heappop(events)
            eng: EngineCore = engines[e]
            if kind == _ARRIVAL:
                eng.add(payload)
                if plans[e] is None:
                    kicked.append(e)
            else:
                plan = plans[e]
                plans[e] = None
                for s in eng.commit(plan, now):
                    if s.done:
                        outstanding[e] -= 1
                        records.append(s)
                        if more(now):
                            send(now)
                kicked.append(e)
        for e in dict.fromkeys(kicked):
            if plans[e] is None and engines[e].has_work():
                start(e, now)

    out_tokens = sum(s.generated for s in records)
    ttft = [(s.first_token_at - s.arrival) * 1e3 for s in records]
    e2el = [(s.finished_at - s.arrival) * 1e3 for s in records]
    tpot = [(s.finished_at - s.first_token_at) * 1e3 / (s.generated - 1) for s in records if s.generated > 1]
    return LevelPrediction(
        concurrency=concurrency, requests=len(records),
        output_tok_s=out_tokens / now if now > 0 else 0.0,
        ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50), e2el_p50_ms=percentile(e2el, 50),
        duration_s=now, output_tokens=out_tokens,
        preemptions=sum(e.preemptions for e in engines), max_running=max_running,
        stream_output_tok_s=(concurrency * 1e3 * sum(1 / t for t in tpot) / len(tpot)) if tpot else 0.0,
    )


def predict_curve(setup: SimSetup, levels: list[int] | tuple[int, ...], workload: Any) -> list[LevelPrediction]:
    """One prediction per concurrency level for a workload (``requests_for``, token counts)."""
    return [simulate_level(setup, c, workload.requests_for(c), workload.input_tokens, workload.output_tokens,
                           getattr(workload, "duration_s", None))
            for c in levels]
