"""Open-loop arrivals: when each request is due, and a loop that sends them on time.

A schedule is a list of offsets (seconds from the level's start). Rate
processes draw a unit-rate sequence (gaps of mean 1: all 1 for ``constant``,
exponential for ``poisson``, gamma of shape ``burstiness`` for ``gamma``)
and map it through the inverse of the cumulative intensity, so a linear
ramp-up warps the same draw instead of thinning it: the same seed gives the
same requests at every ramp, only later.

The loop (``open_loop``) prepares each request's body before it is due, sleeps
until shortly before, then yields to the event loop until the due time
(``SPIN_S``: uvloop's timers have millisecond resolution, so a plain sleep
alone is up to a millisecond late). A request that is due while
``max_concurrency`` are in flight waits in the client; that wait is its
client queue time (``slot_free - scheduled``), the sender's own lateness is
its dispatch lag (``sent - slot_free``), and latency starts at ``sent``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..catalog.arrivals import Arrival
from ..errors import LoadError
from .client import LEVEL_TIMEOUT_REASON, Client, LoopResult, Picker, TICK_S, Watcher, monotonic
from .samples import RequestRecord
from .sse import SSEParser

# Sleep until this long before a request is due, then yield until it is.
SPIN_S = 0.0015


def unit_gaps(kind: str, n: int, rng: random.Random, burstiness: float = 1.0) -> list[float]:
    """``n`` gaps of mean 1 for the arrival ``kind``."""
    if kind == "constant":
        return [1.0] * n
    if kind == "poisson":
        return [rng.expovariate(1.0) for _ in range(n)]
    if kind == "gamma":
        return [rng.gammavariate(burstiness, 1.0 / burstiness) for _ in range(n)]
    raise LoadError(f"no rate schedule for arrival kind {kind!r}")


def warp(u: float, rate: float, ramp_s: float) -> float:
    """The time at which the cumulative intensity reaches ``u`` (rate rising linearly over ``ramp_s``)."""
    if ramp_s <= 0:
        return u / rate
    knee = rate * ramp_s / 2          # requests due during the ramp
    if u <= knee:
        return math.sqrt(2 * ramp_s * u / rate)
    return ramp_s + (u - knee) / rate


def rate_schedule(arrival: Arrival, n: int, rate: float, seed: int) -> list[float]:
    """Offsets of ``n`` requests at ``rate`` requests/s; the first is due at 0."""
    if n < 1:
        return []
    if not rate > 0:
        raise LoadError(f"an open-loop level needs a positive rate, not {rate!r}")
    gaps = unit_gaps(arrival.kind, n - 1, random.Random(seed), arrival.burstiness)
    out, u = [0.0], 0.0
    for g in gaps:
        u += g
        out.append(warp(u, rate, arrival.ramp_up_s))
    return out


@dataclass(frozen=True)
class Due:
    """One request of an open-loop level."""

    at: float                   # offset from the level's start, seconds
    index: int                  # request index (prompt choice)
    max_tokens: int | None      # None: the workload's output length


@dataclass
class OpenResult(LoopResult):
    max_in_flight: int = 0


async def open_loop(
    client: Client,
    path: str,
    dues: Sequence[Due],
    make_body: Callable[[Due], bytes],
    cap: int,
    picker: Picker,
    *,
    default_tokens: int,
    timeout_s: float,
    stall_s: float | None = None,
    deadline: float | None = None,
    watcher: Watcher | None = None,
    spin_s: float = SPIN_S,
    new_parser: Callable[[], SSEParser] = SSEParser,
) -> OpenResult:
    """Send ``dues`` on their schedule, at most ``cap`` in flight. Times are this process's monotonic clock."""
    endpoints = client.endpoints
    request = client.request
    records: list[RequestRecord] = []
    inflight: dict[int, RequestRecord] = {}
    lags: list[float] = []
    slots = asyncio.Semaphore(cap)
    active = peak = 0

    async def one(due: Due, scheduled: float, body: bytes) -> None:
        nonlocal active, peak
        rec = RequestRecord(index=due.index, endpoint="", worker=0, slot_free=scheduled, sent=0.0, end=0.0)
        rec.scheduled = scheduled
        inflight[due.index] = rec
        if slots.locked():
            await slots.acquire()
            rec.slot_free = monotonic()
        else:
            await slots.acquire()
        ep = picker.acquire()
        try:
            rec.endpoint = endpoints[ep]
            parser = new_parser()
            rec.sent = monotonic()
            active += 1
            peak = max(peak, active)
            if watcher is not None:
                watcher.started(rec, parser, due.max_tokens or default_tokens)
            await request(ep, path, body, rec, timeout_s, stall_s, parser)
            rec.end = monotonic()
        finally:
            active -= 1
            picker.release(ep)
            slots.release()
        del inflight[due.index]
        records.append(rec)
        if watcher is not None:
            watcher.finished(rec)

    tasks: list[asyncio.Task] = []

    async def dispatch(t0: float) -> None:
        sleep = asyncio.sleep
        for due in dues:
            body = make_body(due)               # built before it is due: not inside any lag
            at = t0 + due.at
            delay = at - monotonic()
            if delay > spin_s:
                await sleep(delay - spin_s)
            while monotonic() < at:
                await sleep(0)                  # the last stretch: yield, so reads go on meanwhile
            tasks.append(asyncio.create_task(one(due, at, body)))
        if tasks:
            await asyncio.gather(*tasks)

    async def ticker() -> None:
        append = lags.append
        while True:
            t = monotonic()
            await asyncio.sleep(TICK_S)
            append((monotonic() - t - TICK_S) * 1000.0)

    tick = asyncio.create_task(ticker())
    cpu0 = time.process_time()
    t0 = monotonic()
    main = asyncio.create_task(dispatch(t0))
    timed_out = False
    try:
        if deadline is None:
            await main
        else:
            done, _ = await asyncio.wait([main], timeout=max(0.0, deadline - monotonic()))
            if not done:
                timed_out = True
                main.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(main, *tasks, return_exceptions=True)
            else:
                main.result()
    finally:
        main.cancel()
        for t in tasks:
            t.cancel()
        tick.cancel()
    now = monotonic()
    for rec in inflight.values():       # cut by the level timeout
        rec.error = LEVEL_TIMEOUT_REASON
        rec.ok = False
        rec.sent = rec.sent or now
        rec.end = now
        records.append(rec)
    inflight.clear()
    return OpenResult(records, lags, time.process_time() - cpu0, now - t0, timed_out, max_in_flight=peak)
