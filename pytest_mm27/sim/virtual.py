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

# at equal times: finish steps, then hand finished requests to the client, then deliver arrivals
_STEP_END, _DELIVERED, _ARRIVAL = 0, 1, 2


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
    api_busy: float = 0.0     # busiest API process: CPU-busy share of the measured time
    steady: bool = False      # measured over a steady window (all c in flight), not first send -> last finish

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A steady level in the simulator: this many requests per slot, measured
# between the end of the first round and the last send (all c in flight).
STEADY_ROUNDS = 6


class FrontEnd:
    """The API server processes: each one a single CPU that streams every token it serves.

    vLLM's engine core runs in its own process, so a busy API server does not
    slow the GPU's steps; it delays what the client sees. A token reaches the
    client when its process has worked through everything queued before it,
    and a closed-loop client sends its next request only then; with c
    streams waiting on one saturated process, the level runs at that
    process's token rate however fast the GPU is.
    """

    def __init__(self, processes: int, token_s: float, request_s: float):
        self.free_at = [0.0] * processes
        self.busy = [0.0] * processes
        self.token_s, self.request_s = token_s, request_s

    def stream(self, process: int, now: float, tokens: int, requests: int = 0) -> float:
        """Queue one step's tokens (and new requests' parsing) on a process; returns when it is done."""
        cost = tokens * self.token_s + requests * self.request_s
        if cost <= 0.0:
            return now
        done = max(self.free_at[process], now) + cost
        self.free_at[process] = done
        self.busy[process] += cost
        return done


def simulate_level(setup: SimSetup, concurrency: int, requests: int, input_tokens: int,
                   output_tokens: int, duration_s: float | None = None, steady: bool = False,
                   one_engine: bool = False) -> LevelPrediction:
    """One closed-loop level. ``steady``: measure the window where every slot is busy
    (as loadgen.steady does) instead of first send to last completion.

    ``one_engine``: simulate only the first of the setup's identical, evenly loaded
    engines (DP replicas, PP micro-batch schedulers), with its share of the API
    processes; the caller gives it its share of the concurrency and scales up.
    """
    engines = setup.build_engines()
    cal = setup.calibration
    ingest = cal.ingest_latency_ms * 1e-3
    if one_engine:
        share = len(engines) / setup.api_processes      # engines per API process
        engines = engines[:1]
        front = FrontEnd(1, cal.api_token_us * 1e-6 * share, cal.api_request_us * 1e-6 * share)
    else:
        front = FrontEnd(setup.api_processes, cal.api_token_us * 1e-6, cal.api_request_us * 1e-6)
    if steady:
        requests = max(requests, STEADY_ROUNDS * concurrency)
    outstanding = [0] * len(engines)
    plans: list[Any] = [None] * len(engines)
    events: list[tuple[float, int, int, int, Any]] = []   # (time, kind, order, engine, payload)
    order = 0
    sent = 0
    records: list[Seq] = []
    process_of: dict[int, int] = {}
    delivered: list[tuple[float, int]] = []     # (time the client has them, tokens) per step and process
    max_running = 0
    window = [math.inf, math.inf]                # steady: end of the first round, last send

    def send(now: float) -> None:
        nonlocal sent, order
        # least outstanding requests, lowest index on ties (vLLM's DP coordinator)
        e = min(range(len(engines)), key=outstanding.__getitem__)
        outstanding[e] += 1
        seq = Seq(sent, input_tokens, output_tokens, now)
        proc = 0 if one_engine else setup.api_process_for(e, sent)
        process_of[sent] = proc
        visible = front.stream(proc, now, 0, 1) + ingest
        sent += 1
        if steady and sent == requests:
            window[1] = now
        order += 1
        heapq.heappush(events, (visible, _ARRIVAL, order, e, seq))

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

    def finish(s: Seq, at: float, e: int) -> None:
        outstanding[e] -= 1
        records.append(s)
        if steady and len(records) == concurrency:
            window[0] = at
        if more(at):
            send(at)

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
            elif kind == _DELIVERED:
                finish(payload, now, e)
            else:
                plan = plans[e]
                plans[e] = None
                emitted = eng.commit(plan, now)
                by_process: dict[int, list[Seq]] = {}
                for s in emitted:
                    by_process.setdefault(process_of[s.rid], []).append(s)
                for proc, group in by_process.items():
                    at = front.stream(proc, now, len(group))
                    delivered.append((at, len(group)))
                    for s in group:
                        # what the client sees: the API process's time, not the engine's
                        if s.generated == 1:
                            s.first_token_at = at
                        if s.done:
                            s.finished_at = at
                            if at > now:
                                order += 1
                                heapq.heappush(events, (at, _DELIVERED, order, e, s))
                            else:
                                finish(s, now, e)
                kicked.append(e)
        for e in dict.fromkeys(kicked):
            if plans[e] is None and engines[e].has_work():
                start(e, now)

    t0, t1 = (window if steady and window[0] < window[1] < math.inf else (0.0, now))
    measured = [s for s in records if s.arrival >= t0] if steady else records
    if steady:
        out_tokens = sum(n for at, n in delivered if t0 < at <= t1)
    else:
        out_tokens = sum(s.generated for s in records)
    span = t1 - t0
    ttft = [(s.first_token_at - s.arrival) * 1e3 for s in measured]
    e2el = [(s.finished_at - s.arrival) * 1e3 for s in measured]
    tpot = [(s.finished_at - s.first_token_at) * 1e3 / (s.generated - 1) for s in measured if s.generated > 1]
    return LevelPrediction(
        concurrency=concurrency, requests=len(measured),
        output_tok_s=out_tokens / span if span > 0 else 0.0,
        ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50), e2el_p50_ms=percentile(e2el, 50),
        duration_s=span, output_tokens=out_tokens,
        preemptions=sum(e.preemptions for e in engines), max_running=max_running,
        stream_output_tok_s=(concurrency * 1e3 * sum(1 / t for t in tpot) / len(tpot)) if tpot else 0.0,
        api_busy=max(front.busy) / now if now > 0 else 0.0,
        steady=steady,
    )


def predict_curve(setup: SimSetup, levels: list[int] | tuple[int, ...], workload: Any) -> list[LevelPrediction]:
    """One prediction per concurrency level for a workload (``requests_for``, token counts);
    a steady workload is measured over its steady window."""
    steady = bool(getattr(workload, "steady", False))
    return [simulate_level(setup, c, workload.requests_for(c), workload.input_tokens, workload.output_tokens,
                           getattr(workload, "duration_s", None), steady=steady)
            for c in levels]
