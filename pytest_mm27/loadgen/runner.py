"""run_level: one concurrency level, synchronously, on a private event loop.

Worker sharding
---------------
With ``workers > 1`` the level's slots are spread over that many spawned
processes (c // W each, the remainder to the first ones) and the requests in
the same proportion, so exactly ``requests_for(c)`` are sent and every worker
runs about as long. Each worker balances its own requests over all endpoints
by least outstanding requests (ties round-robin, starting at a different
endpoint per worker); since each holds the same share of slots, the global
balance is the per-worker balance times W. Warm-up and the /metrics scrapes
run in the parent. Each worker returns its raw records; the parent merges
them and computes metrics once.

Clock alignment
---------------
``time.monotonic`` is only compared within one process. Every process maps
its monotonic readings onto a shared timeline through the wall clock: it
samples (wall, monotonic) pairs back to back, keeps the pair with the
tightest bracket, and shifts its records by ``wall - mono - epoch`` where
``epoch`` is a wall time the parent chose when it released the start
barrier. Wall clock is read once per process, so an NTP step mid-level
cannot tear intervals apart; the alignment error is the sampling bracket
(microseconds). All workers wait on one start event before their first send.

Default worker count
--------------------
``workers=None`` means 1 below ``AUTO_WORKERS_FROM`` concurrency; from there
one worker per ``SLOTS_PER_WORKER`` slots, capped by the CPUs this process may
run on minus one (left for whatever else runs here, often the server), and
never fewer than 1. History: with aiohttp one process cost ~20 us of CPU per
streamed chunk and saturated near 45-50k chunks/s. The fast path (``fast``)
costs ~9-12 us per chunk at c >= 256 on a 2-core box (bench_client, Node null
server; about 7-8 us of that is the kernel's and the event loop's share for
one socket read, measured with a protocol that does nothing), so one process
feeds ~100k chunks/s at ~85-90 % of a core; 256 slots per worker keeps
headroom for the refill bursts.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..errors import LoadError
from ..catalog.workload import Workload
from .client import (
    Client,
    CountClaimer,
    LeastOutstanding,
    Tally,
    closed_loop,
    monotonic,
    run_sync,
)
from .arrivals import Due, open_loop, rate_schedule
from .goodput import apply_goodput
from .metrics import LevelMetrics, SelfMeasurement, SteadyWindow, compute_level_metrics, with_prefix_cache
from .samples import Percentiles, RequestRecord
from .prompts import Prepared, RequestFactory, prepare
from .scrape import prefix_delta, scrape_prefix, scrape_tokens, server_delta
from .steady import CHECK_INTERVAL_S, TIMED_OUT, SteadySlots, WindowClock, WindowRule

AUTO_WORKERS_FROM = 256
SLOTS_PER_WORKER = 256
WORKER_START_TIMEOUT_S = 60.0


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(concurrency: int) -> int:
    if concurrency < AUTO_WORKERS_FROM:
        return 1
    return max(1, min(usable_cpus() - 1, math.ceil(concurrency / SLOTS_PER_WORKER)))


def clock_offset(samples: int = 20) -> float:
    """wall - monotonic, from the tightest of ``samples`` back-to-back readings."""
    best = (math.inf, 0.0)
    for _ in range(samples):
        m0 = time.monotonic()
        w = time.time()
        m1 = time.monotonic()
        if m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) / 2)
    return best[1]


def shift_records(records: list[RequestRecord], delta: float) -> None:
    for r in records:
        r.slot_free += delta
        r.sent += delta
        r.end += delta
        if r.scheduled is not None:
            r.scheduled += delta
        r.chunk_times = [t + delta for t in r.chunk_times]


# --- the level ---

@dataclass
class _Plan:
    endpoints: list[str]
    model: str
    workload: Workload
    concurrency: int
    api_key: str | None
    total: int | None          # requests to send (None: duration or steady mode)
    duration_s: float | None
    rule: WindowRule | None    # steady mode: when the window ends
    prepared: Prepared | None = None    # what the prompts needed from the server (prompts.prepare)


# For the Ray load workers (ray_workers), which share these shares and steps.
LevelPlan = _Plan


def _validate(endpoints, model, workload, concurrency, workers, level_timeout_s) -> list[str]:
    eps = [str(e) for e in endpoints] if not isinstance(endpoints, str) else [endpoints]
    if not eps:
        raise LoadError("run_level needs at least one endpoint")
    for e in eps:
        if not e.startswith(("http://", "https://")):
            raise LoadError(f"endpoint {e!r} is not an http(s) base URL")
        if e.rstrip("/").endswith("/v1"):
            raise LoadError(f"endpoint {e!r}: give the base URL; /v1 is added by the client")
    if not model:
        raise LoadError("run_level needs a model name")
    if not isinstance(workload, Workload):
        raise LoadError(f"workload must be a Workload, not {type(workload).__name__}")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise LoadError(f"concurrency must be a positive integer, not {concurrency!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise LoadError(f"workers must be a positive integer, not {workers!r}")
    if level_timeout_s is not None and level_timeout_s <= 0:
        raise LoadError(f"level_timeout_s must be positive, not {level_timeout_s!r}")
    return [e.rstrip("/") for e in eps]


def window_rule(workload: Workload, precision: float | None = None,
                max_window_s: float | None = None) -> WindowRule:
    """A steady workload's window rule; ``precision``/``max_window_s`` (the run's options) win."""
    cap = max_window_s if max_window_s is not None else workload.max_window_s
    return WindowRule(window_s=workload.window_s, precision=precision or workload.precision,
                      min_window_s=min(workload.min_window_s, cap), max_window_s=cap)


def run_level(
    endpoints: Sequence[str],
    model: str,
    workload: Workload,
    concurrency: int,
    *,
    api_key: str | None = None,
    workers: int | None = None,
    level_timeout_s: float | None = None,
    precision: float | None = None,
    max_window_s: float | None = None,
    progress: Progress | None = None,
    samples: list[tuple[RequestRecord, bool]] | None = None,
) -> LevelMetrics:
    """Run one level (closed loop, or open loop for a workload with an open arrival) and return
    its metrics. Synchronous.

    An open-loop level (``workload.arrival``) sends its schedule with at
    most ``concurrency`` requests in flight, from this process.
    A steady workload (``workload.measure == "steady"``) warms up at the
    level and measures a window (see ``steady``); ``precision`` and
    ``max_window_s`` override the workload's target and cap. Request
    failures are counted in the metrics, never raised; ``LoadError`` means
    misuse (bad arguments) or a worker process that could not start.
    ``progress(done, total, tok_s, failed)`` is called about once a second
    while the level runs in this process (total is None for a steady window).
    ``samples``, when given, receives every request record of the level with
    whether it was measured (a steady level's warm-up and tail are not).
    """
    eps = _validate(endpoints, model, workload, concurrency, workers, level_timeout_s)
    if precision is not None and not 0 < precision < 1:
        raise LoadError(f"precision must be between 0 and 1 (0.01 = 1%), not {precision!r}")
    if max_window_s is not None and max_window_s <= 0:
        raise LoadError(f"max_window_s must be positive, not {max_window_s!r}")
    n_workers = workers if workers is not None else auto_workers(concurrency)
    n_workers = min(n_workers, concurrency)
    steady = workload.steady
    plan = _Plan(
        endpoints=eps, model=model, workload=workload, concurrency=concurrency, api_key=api_key,
        total=None if workload.duration_s or steady else workload.requests_for(concurrency),
        duration_s=None if steady else workload.duration_s,
        rule=window_rule(workload, precision, max_window_s) if steady else None,
        prepared=prepare(eps[0], model, workload, api_key),
    )
    deadline = monotonic() + level_timeout_s if level_timeout_s else None
    if workload.sessions is not None:     # multi-turn chat: its own loop, one process (loadgen.sessions)
        from .sessions import sessions_level
        factory = RequestFactory(workload, model, plan.prepared)
        metrics, records, window = run_sync(lambda: sessions_level(eps, factory, concurrency, api_key, deadline))
    elif workload.arrival.open:
        # One process sends the whole schedule (see loadgen.arrivals; ~1,000 req/s per core).
        metrics, records, window = run_sync(lambda: _level_open(plan, deadline, progress))
    elif n_workers == 1:
        metrics, records, window = run_sync(lambda: _level_in_process(plan, deadline, progress))
    else:
        metrics, records, window = _level_sharded(plan, n_workers, deadline, progress)
    measured = _measured(records, window)
    apply_goodput(metrics, measured, workload.slo)
    if samples is not None:
        ids = {id(r) for r in measured}
        samples.extend((r, id(r) in ids) for r in records)
    return metrics


def _measured(records: list[RequestRecord], window: SteadyWindow | None) -> list[RequestRecord]:
    """The requests a level's latencies and goodput are computed over (a steady window's, else all)."""
    if window is None:
        return records
    return [r for r in records if window.start <= r.sent < window.sends_end]


async def _warmup(client: Client, plan: _Plan, factory: RequestFactory, deadline: float | None) -> None:
    n = plan.workload.warmup_requests
    if n <= 0:
        return
    # Warm-up indices come after any measured index, so prompts never repeat.
    await closed_loop(
        client, factory, min(plan.concurrency, n), CountClaimer(n, base=1 << 40).claim,
        LeastOutstanding(len(plan.endpoints)),
        timeout_s=plan.workload.request_timeout_s, stall_s=plan.workload.stall_limit_s,
        deadline=deadline, measure=False,
    )


def warmup(client: Client, plan: _Plan, factory: RequestFactory, deadline: float | None):
    return _warmup(client, plan, factory, deadline)


def count_claim(plan: _Plan, n: int | None, base: int = 0, stop_at: float | None = None):
    """A count-mode claim: ``n`` requests, or (duration mode) until ``stop_at`` passes."""
    claimer = CountClaimer(n, base)
    if stop_at is None:
        return claimer.claim
    return lambda: None if monotonic() >= stop_at else claimer.claim()


async def _watch_window(state: SteadySlots, clock: WindowClock) -> None:
    """Tick the level's window clock from this process's slots until the window is over."""
    while clock.t1 is None:
        await asyncio.sleep(CHECK_INTERVAL_S)
        clock.tick(monotonic(), state.chunks(), state.warm_at is not None, state.ok, state.failed, state.request_s)
        state.t0, state.t1 = clock.t0, clock.t1


# done, total (None: a steady window), output tok/s so far, failed
Progress = Callable[[int, int | None, float, int], None]
PROGRESS_EVERY_S = 1.0


async def _report(tally: Tally, total: int | None, progress: Progress) -> None:
    started = monotonic()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        elapsed = monotonic() - started
        progress(tally.done, total, tally.tokens / elapsed if elapsed > 0 else 0.0, tally.failed)


async def _level_in_process(plan: _Plan, deadline: float | None,
                            progress: Progress | None = None) -> tuple[LevelMetrics, list[RequestRecord], SteadyWindow | None]:
    factory = RequestFactory(plan.workload, plan.model, plan.prepared)
    state = clock = None
    async with Client(plan.endpoints, plan.api_key, plan.concurrency) as client:
        session = client.session
        if plan.rule is None:
            await _warmup(client, plan, factory, deadline)
        await client.prewarm(plan.concurrency)
        before = await scrape_tokens(session, plan.endpoints)
        prefix_before = await scrape_prefix(session, plan.endpoints)
        epoch = time.time()
        start = monotonic()
        watch = None
        if plan.rule is not None:
            state = SteadySlots(plan.concurrency, plan.workload.output_tokens)
            clock = WindowClock(plan.rule, start, plan.workload.warmup_s, plan.concurrency)
            claim = state.claim
            watch = asyncio.create_task(_watch_window(state, clock))
        else:
            claim = count_claim(plan, plan.total, stop_at=start + plan.duration_s if plan.duration_s else None)
        tally = Tally(state)
        report = asyncio.create_task(_report(tally, plan.total, progress)) if progress else None
        try:
            result = await closed_loop(
                client, factory, plan.concurrency, claim, LeastOutstanding(len(plan.endpoints)),
                timeout_s=plan.workload.request_timeout_s, stall_s=plan.workload.stall_limit_s, deadline=deadline,
                watcher=tally,
            )
        finally:
            for task in (watch, report):
                if task is not None:
                    task.cancel()
        loop_end = monotonic()
        expect = sum(r.output_tokens for r in result.records if r.ok)
        server = await server_delta(session, plan.endpoints, before, expect)
        prefix = prefix_delta(prefix_before, await scrape_prefix(session, plan.endpoints))
    records = result.records
    shift = clock_offset() - epoch
    shift_records(records, shift)  # same timeline as sharded runs
    sm = SelfMeasurement(0, result.cpu_s, result.wall_s, result.loop_lag_ms)
    window = None
    if clock is not None:
        window = _window(clock, start, loop_end, result.timed_out, shift, epoch)
    records.sort(key=lambda r: r.index)
    metrics = compute_level_metrics(
        records, plan.concurrency, self_measurements=[sm],
        endpoints=plan.endpoints, warmup_requests=plan.workload.warmup_requests,
        server_output_tokens=server, timed_out=result.timed_out, window=window,
    )
    metrics.wall_epoch = epoch
    metrics = with_prefix_cache(metrics, prefix)
    return metrics, records, window


def _window(clock: WindowClock, start: float, end: float, timed_out: bool, shift: float,
            epoch: float) -> SteadyWindow:
    """The measured window on the records' timeline (``shift`` maps the clock's times onto it)."""
    t0 = clock.t0 if clock.t0 is not None else end
    t1 = clock.t1 if clock.t1 is not None else end
    reason = clock.reason or (TIMED_OUT if timed_out else None)
    return SteadyWindow(start=t0 + shift, sends_end=min(t1, end) + shift, level_end=end + shift, reason=reason,
                        warmup_s=t0 - start, wall_epoch=epoch)


# --- open loop (requests on a schedule) ---

def open_dues(workload: Workload) -> tuple[list[Due], float, str]:
    """The level's requests with their due times, the offered rate (req/s) and a label for it."""
    arrival = workload.arrival
    if arrival.kind == "trace":
        from ..catalog.trace import load_trace
        rows = load_trace(arrival.trace)      # type: ignore[arg-type]
        t0 = rows[0].timestamp
        dues = [Due((r.timestamp - t0) * arrival.time_scale, i, r.output_tokens) for i, r in enumerate(rows)]
        span = dues[-1].at
        offered = (len(dues) - 1) / span if span > 0 else math.inf
        return dues, offered, f"trace {arrival.trace.name} x{arrival.time_scale:g}"   # type: ignore[union-attr]
    if arrival.rate is None:
        raise LoadError(f"workload {workload.name}: an open-loop level needs a rate (arrival.rate, or rate=R "
                        "for the level)")
    n = arrival.requests_at(arrival.rate)
    times = rate_schedule(arrival, n, arrival.rate, workload.seed)
    label = f"{arrival.kind} {arrival.rate:g}/s"
    if arrival.kind == "gamma":
        label += f" burstiness {arrival.burstiness:g}"
    if arrival.ramp_up_s:
        label += f" ramp {arrival.ramp_up_s:g} s"
    return [Due(t, i, None) for i, t in enumerate(times)], arrival.rate, label


class TracePrompts:
    """Bodies of the traced lengths. The one place a trace's prompt is made: swap ``factory_for``
    for an exact-length builder and every replayed prompt follows."""

    def __init__(self, workload: Workload, model: str, prepared: Prepared | None = None):
        from ..catalog.trace import load_trace
        self.rows = load_trace(workload.arrival.trace)      # type: ignore[arg-type]
        self.workload, self.model, self.prepared = workload, model, prepared
        self._factories: dict[int, RequestFactory] = {}

    def factory_for(self, input_tokens: int) -> RequestFactory:
        if input_tokens not in self._factories:
            self._factories[input_tokens] = RequestFactory(
                replace(self.workload, input_tokens=input_tokens, input_lengths=None), self.model, self.prepared)
        return self._factories[input_tokens]

    def body(self, due: Due) -> bytes:
        row = self.rows[due.index]
        return self.factory_for(row.input_tokens).body(due.index, row.output_tokens)


async def _level_open(plan: _Plan, deadline: float | None, progress: Progress | None = None
                      ) -> tuple[LevelMetrics, list[RequestRecord], None]:
    workload = plan.workload
    arrival = workload.arrival
    factory = RequestFactory(workload, plan.model, plan.prepared)
    dues, offered, label = open_dues(workload)
    if arrival.kind == "trace":
        make_body = TracePrompts(workload, plan.model, plan.prepared).body
    else:
        make_body = lambda due: factory.body(due.index, due.max_tokens)   # noqa: E731
    cap = plan.concurrency
    async with Client(plan.endpoints, plan.api_key, cap) as client:
        session = client.session
        await _warmup(client, plan, factory, deadline)
        await client.prewarm(min(cap, len(dues), 64))
        before = await scrape_tokens(session, plan.endpoints)
        prefix_before = await scrape_prefix(session, plan.endpoints)
        epoch = time.time()
        tally = Tally()
        report = asyncio.create_task(_report(tally, len(dues), progress)) if progress else None
        try:
            result = await open_loop(client, factory.path, dues, make_body, cap, LeastOutstanding(len(plan.endpoints)),
                                     default_tokens=workload.output_tokens, timeout_s=workload.request_timeout_s,
                                     stall_s=workload.stall_limit_s, deadline=deadline, watcher=tally,
                                     new_parser=factory.parser)
        finally:
            if report is not None:
                report.cancel()
        expect = sum(r.output_tokens for r in result.records if r.ok)
        server = await server_delta(session, plan.endpoints, before, expect)
        prefix = prefix_delta(prefix_before, await scrape_prefix(session, plan.endpoints))
    records = sorted(result.records, key=lambda r: r.index)
    shift_records(records, clock_offset() - epoch)
    sm = SelfMeasurement(0, result.cpu_s, result.wall_s, result.loop_lag_ms)
    metrics = compute_level_metrics(records, cap, self_measurements=[sm], endpoints=plan.endpoints,
                                    warmup_requests=workload.warmup_requests, server_output_tokens=server,
                                    timed_out=result.timed_out)
    sent = sorted(r.sent for r in records if r.sent)
    metrics.arrival, metrics.offered_rate, metrics.max_in_flight = label, offered, result.max_in_flight
    metrics.wall_epoch = epoch
    metrics.send_rate = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else None
    due = [d.at for d in dues]
    metrics.schedule_rate = (len(due) - 1) / (due[-1] - due[0]) if len(due) > 1 and due[-1] > due[0] else None
    ends = sorted(r.end for r in records if r.ok)
    metrics.completion_rate = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None
    metrics.schedule_lag_ms = Percentiles.of((r.sent - r.scheduled) * 1000.0 for r in records
                                             if r.scheduled is not None and r.sent)
    metrics.client_queue_ms = Percentiles.of(r.client_queue * 1000.0 for r in records
                                             if r.client_queue is not None and r.sent)
    metrics.stream_output_tok_s = None      # c x per-stream rate means nothing without c streams
    return with_prefix_cache(metrics, prefix), records, None


# --- sharded over processes ---
#
# No locks or named semaphores are shared: they live in /dev/shm, which a
# launcher cleaning up after a server may sweep. Workers get fixed shares
# of slots and requests and talk to the parent over pipes only.

def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` integers differing by at most one, larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _worker_main(plan: _Plan, worker: int, slots: int, n_requests: int | None, base: int, first_slot: int,
                 conn) -> None:
    try:
        result = run_sync(lambda: _worker_async(plan, worker, slots, n_requests, base, first_slot, conn))
        conn.send_bytes(pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as e:  # report, never hang the parent
        try:
            conn.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}")))
        except Exception:
            pass
    finally:
        conn.close()


async def _worker_async(plan: _Plan, worker: int, slots: int, n_requests: int | None, base: int, first_slot: int,
                        conn):
    factory = RequestFactory(plan.workload, plan.model, plan.prepared)
    async with Client(plan.endpoints, plan.api_key, slots) as client:
        await client.prewarm(slots)
        conn.send_bytes(b"ready")
        # The start barrier. Blocking is fine: nothing else runs on this loop yet.
        go = conn.recv()
        if go is None:
            return None
        epoch, deadline_wall = go
        offset = clock_offset()                       # wall - mono
        deadline = deadline_wall - offset if deadline_wall is not None else None
        state = watch = None
        if plan.rule is not None:
            state = SteadySlots(slots, plan.workload.output_tokens, base, first_slot, plan.concurrency)
            claim = state.claim
            watch = asyncio.create_task(_report_to_parent(state, conn, offset))
        else:
            claim = count_claim(plan, n_requests, base, epoch - offset + plan.duration_s if plan.duration_s else None)
        picker = LeastOutstanding(len(plan.endpoints))
        picker.rr = worker % len(plan.endpoints)      # spread ties across workers
        tally = Tally(state)
        counts = asyncio.create_task(_tally_to_parent(tally, conn))
        try:
            result = await closed_loop(
                client, factory, slots, claim, picker,
                timeout_s=plan.workload.request_timeout_s, stall_s=plan.workload.stall_limit_s,
                deadline=deadline, worker=worker, watcher=tally,
            )
        finally:
            for task in (watch, counts):
                if task is not None:
                    task.cancel()
    shift_records(result.records, offset - epoch)
    sm = SelfMeasurement(worker, result.cpu_s, result.wall_s, result.loop_lag_ms)
    return result.records, sm, result.timed_out


async def _report_to_parent(state: SteadySlots, conn, offset: float) -> None:
    """A worker's side of a sharded steady level: its counts go up, the window comes down.

    The parent ticks the one window clock with the workers' sums; messages
    carry wall-clock times (``offset`` = wall - monotonic here).
    """
    while True:
        await asyncio.sleep(CHECK_INTERVAL_S)
        conn.send(("tick", state.chunks(), state.warm_at is not None, state.ok, state.failed, state.request_s))
        while conn.poll():
            kind, wall = conn.recv()
            if kind == "t0":
                state.t0 = wall - offset
            elif kind == "t1":
                state.t1 = wall - offset


async def _tally_to_parent(tally: Tally, conn) -> None:
    """A worker's running counts, for the parent's live progress."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        conn.send(("tally", tally.done, tally.tokens, tally.failed))


def _level_sharded(plan: _Plan, n_workers: int, deadline: float | None,
                   progress: Progress | None = None) -> tuple[LevelMetrics, list[RequestRecord], SteadyWindow | None]:
    ctx = mp.get_context("spawn")   # fork is unsafe with threads / a running loop in the parent
    slot_share = split(plan.concurrency, n_workers)
    if plan.total is not None:
        # Requests in proportion to slots, so every worker runs about as long.
        req_share = [plan.total * s // plan.concurrency for s in slot_share]
        for i in range(plan.total - sum(req_share)):
            req_share[i] += 1
        bases = [sum(req_share[:i]) for i in range(n_workers)]
    else:
        req_share = [None] * n_workers
        bases = [i << 32 for i in range(n_workers)]
    procs, conns = [], []
    try:
        for i, slots in enumerate(slot_share):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main,
                            args=(plan, i, slots, req_share[i], bases[i], sum(slot_share[:i]), child_conn),
                            name=f"mm27-loadgen-{i}", daemon=True)
            p.start()
            child_conn.close()
            procs.append(p)
            conns.append(parent_conn)
        for i, c in enumerate(conns):
            msg = None
            try:
                if c.poll(WORKER_START_TIMEOUT_S):
                    msg = c.recv_bytes()
            except (EOFError, OSError):
                pass
            if msg != b"ready":
                why = pickle.loads(msg)[1] if msg else "no answer (died or too slow)"
                raise LoadError(f"load generator worker {i} failed to start: {why}")
        return run_sync(lambda: _sharded_async(plan, conns, procs, req_share, bases, deadline, progress))
    finally:
        for c in conns:
            try:
                c.send(None)     # releases a worker still at the barrier
            except (OSError, ValueError):
                pass
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in conns:
            c.close()


async def _sharded_async(plan: _Plan, conns, procs, req_share, bases, deadline,
                         progress: Progress | None = None) -> tuple[LevelMetrics, list[RequestRecord], SteadyWindow | None]:
    factory = RequestFactory(plan.workload, plan.model, plan.prepared)
    async with Client(plan.endpoints, plan.api_key, plan.concurrency) as client:
        session = client.session
        if plan.rule is None:
            await _warmup(client, plan, factory, deadline)
        before = await scrape_tokens(session, plan.endpoints)
        prefix_before = await scrape_prefix(session, plan.endpoints)
        offset = clock_offset()
        deadline_wall = deadline + offset if deadline is not None else None
        epoch = time.time()
        for c in conns:
            c.send((epoch, deadline_wall))
        clock = WindowClock(plan.rule, epoch, plan.workload.warmup_s, plan.concurrency) if plan.rule else None
        # Collect in a thread; this loop's session stays idle meanwhile.
        loop = asyncio.get_running_loop()
        grace = plan.workload.request_timeout_s + 30.0
        report = _SummedProgress(len(conns), plan.total, progress) if progress else None
        payloads = await loop.run_in_executor(None, _collect, conns, procs, deadline, grace, clock, report)
        end_wall = time.time()
        records: list[RequestRecord] = []
        sms: list[SelfMeasurement] = []
        timed_out = False
        lost: dict[int, str] = {}
        for i, payload in enumerate(payloads):
            if payload[0] != "ok" or payload[1] is None:
                lost[i] = f"load generator worker {i}: {payload[1]}"[:200]
                continue
            recs, sm, w_timed_out = payload[1]
            records.extend(recs)
            sms.append(sm)
            timed_out |= w_timed_out
        expect = sum(r.output_tokens for r in records if r.ok)
        server = await server_delta(session, plan.endpoints, before, expect)
        prefix = prefix_delta(prefix_before, await scrape_prefix(session, plan.endpoints))
    if lost:
        # A dead worker's requests are failures we cannot describe better.
        t = max((r.end for r in records), default=0.0)
        for i, why in lost.items():
            for k in range(req_share[i] or max(1, plan.concurrency // len(conns))):
                records.append(RequestRecord(bases[i] + k, plan.endpoints[0], i, t, t, t, error=why))
    window = _window(clock, epoch, end_wall, timed_out, -epoch, epoch) if clock is not None else None
    records.sort(key=lambda r: r.index)
    metrics = compute_level_metrics(
        records, plan.concurrency, self_measurements=sms,
        endpoints=plan.endpoints, warmup_requests=plan.workload.warmup_requests,
        server_output_tokens=server, timed_out=timed_out, window=window,
    )
    metrics.wall_epoch = epoch
    metrics = with_prefix_cache(metrics, prefix)
    return metrics, records, window


class _SummedProgress:
    """The workers' latest counts, summed and handed to ``progress`` about once a second."""

    def __init__(self, n: int, total: int | None, progress: Progress):
        self.latest = [(0, 0, 0)] * n
        self.total, self.progress = total, progress
        self.started = self.last = monotonic()

    def update(self, worker: int, done: int, tokens: int, failed: int) -> None:
        self.latest[worker] = (done, tokens, failed)
        now = monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            done, tokens, failed = (sum(column) for column in zip(*self.latest))
            self.progress(done, self.total, tokens / (now - self.started), failed)


def _collect(conns, procs, deadline: float | None, grace: float, clock: WindowClock | None,
             report: _SummedProgress | None = None) -> list[tuple]:
    """Block (in a thread) until every worker reported, died, or overran its bound.

    In a steady level the workers also tick: every ``CHECK_INTERVAL_S`` their
    latest counts are summed into the level's window clock, and its start and
    end are sent back to all of them.
    """
    n = len(conns)
    finals: list[tuple | None] = [None] * n
    latest: list[tuple | None] = [None] * n
    fresh = [False] * n         # a tick arrived since the clock last ticked
    sent_t0 = sent_t1 = False
    while any(f is None for f in finals):
        waiting = [c for c, f in zip(conns, finals) if f is None]
        for c in multiprocessing.connection.wait(waiting, timeout=0.05):
            i = conns.index(c)
            try:
                msg = pickle.loads(c.recv_bytes())
            except (EOFError, OSError):
                finals[i] = ("error", "died")
                continue
            if msg[0] == "tick":
                latest[i], fresh[i] = msg, True
            elif msg[0] == "tally":
                if report is not None:
                    report.update(i, *msg[1:])
            else:
                finals[i] = msg
        for i, p in enumerate(procs):
            if finals[i] is None and not p.is_alive() and not conns[i].poll(0):
                finals[i] = ("error", "died")
        if deadline is not None and monotonic() > deadline + grace:
            return [f or ("error", "no answer within the level timeout") for f in finals]
        running = [i for i in range(n) if finals[i] is None]
        # The clock ticks once every running worker has ticked again, so each
        # step of its series spans one tick of every worker.
        if clock is None or clock.t1 is not None or not running or not all(fresh[i] for i in running):
            continue
        fresh = [False] * n
        ticks = [latest[i] for i in running]
        clock.tick(time.time(), sum(t[1] for t in ticks), all(t[2] for t in ticks),
                   sum(t[3] for t in ticks), sum(t[4] for t in ticks), max(t[5] for t in ticks))
        for kind, value, done in (("t0", clock.t0, sent_t0), ("t1", clock.t1, sent_t1)):
            if value is not None and not done:
                for c, f in zip(conns, finals):
                    if f is None:
                        try:
                            c.send((kind, value))
                        except (OSError, ValueError):
                            pass
        sent_t0, sent_t1 = clock.t0 is not None, clock.t1 is not None
    return finals  # type: ignore[return-value]
