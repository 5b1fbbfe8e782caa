"""Multi-turn chat: sessions of N turns whose history grows, with think time.

A level of sessions keeps ``concurrency`` sessions going at once. Each
session is one user's chat with one endpoint (picked by least outstanding
sessions and kept, so its history can hit that server's prefix cache):
turn t sends the whole conversation so far - the shared system prompt if
the workload has a ``[prefix]``, every earlier user message and the reply
the server really gave to it - plus a new user message of the workload's
input length. Between a reply and the next turn the user thinks for
``think_time_s``; that wait is no dispatch lag (the next turn is due when
it ends), so it never marks the client as the bottleneck.

Request index ``session * turns + turn`` fixes each user message and its
lengths. A failed turn ends its session (its history is broken). The level
sends whole sessions: ``ceil(requests_for(c) / turns)`` of them, after
``warmup_requests`` single first turns that are not counted. Sessions run
in one process (no worker sharding); the think time keeps the send rate low.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass

from .client import (LEVEL_TIMEOUT_REASON, Client, CountClaimer, LeastOutstanding, LoopResult, closed_loop,
                     monotonic)
from .metrics import LevelMetrics, SelfMeasurement, compute_level_metrics, with_prefix_cache
from .prompts import RequestFactory
from .samples import RequestRecord
from .scrape import prefix_delta, scrape_prefix, scrape_tokens, server_delta
from .sse import SSEParser


class TextParser(SSEParser):
    """An SSE parser that also keeps the generated text (a session's next turn needs it)."""

    __slots__ = ("raw",)

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    def feed(self, data: bytes, now: float) -> None:
        self.raw.append(data)
        super().feed(data, now)

    def text(self) -> str:
        out = []
        for event in b"".join(self.raw).replace(b"\r\n", b"\n").split(b"\n\n"):
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if not payload.startswith(b"{"):
                    continue
                try:
                    choices = json.loads(payload).get("choices") or []
                except ValueError:
                    continue
                for c in choices:
                    delta = c.get("delta") or {}
                    piece = delta.get("content") if isinstance(delta, dict) else None
                    if piece is None:
                        piece = c.get("text")
                    if isinstance(piece, str):
                        out.append(piece)
        return "".join(out)


@dataclass
class SessionPlan:
    sessions: int
    turns: int
    think_time_s: float


def session_plan(factory: RequestFactory, concurrency: int) -> SessionPlan:
    w = factory.workload
    assert w.sessions is not None
    turns = w.sessions.turns
    return SessionPlan(math.ceil(w.requests_for(concurrency) / turns), turns, w.sessions.think_time_s)


async def run_sessions(client: Client, factory: RequestFactory, concurrency: int, plan: SessionPlan, *,
                       timeout_s: float, stall_s: float | None, deadline: float | None) -> LoopResult:
    """Run ``plan.sessions`` sessions, ``concurrency`` at a time."""
    w = factory.workload
    path = "/v1/chat/completions"
    endpoints = client.endpoints
    picker = LeastOutstanding(len(endpoints))
    records: list[RequestRecord] = []
    inflight: dict[int, RequestRecord] = {}
    next_session = 0

    async def one_session(s: int, slot_free: float, ramp: bool) -> float:
        ep = picker.acquire()
        try:
            history: list[dict[str, str]] = []
            if w.prefix is not None:
                history.append({"role": "system", "content": factory.messages(s * plan.turns)[0]["content"]})
            for t in range(plan.turns):
                idx = s * plan.turns + t
                history.append({"role": "user", "content": factory.user_text(idx)})
                body = factory.chat_body(history, factory.max_tokens_for(idx))
                rec = RequestRecord(index=idx, endpoint=endpoints[ep], worker=0, slot_free=slot_free,
                                    sent=0.0, end=0.0, ramp=ramp and t == 0)
                inflight[idx] = rec
                parser = TextParser()
                rec.sent = monotonic()
                await client.request(ep, path, body, rec, timeout_s, stall_s, parser)
                rec.end = monotonic()
                del inflight[idx]
                records.append(rec)
                if not rec.ok:
                    return rec.end
                history.append({"role": "assistant", "content": parser.text()})
                if t + 1 < plan.turns:
                    await asyncio.sleep(plan.think_time_s)
                    slot_free = monotonic()     # the next turn is due now, not when the reply came
            return rec.end
        finally:
            picker.release(ep)

    async def slot(t0: float) -> None:
        nonlocal next_session
        free, ramp = t0, True
        while next_session < plan.sessions:
            s = next_session
            next_session += 1
            free = await one_session(s, free, ramp)
            ramp = False

    cpu0 = time.process_time()
    t0 = monotonic()
    tasks = [asyncio.create_task(slot(t0)) for _ in range(min(concurrency, plan.sessions))]
    timed_out = False
    try:
        done, pending = await asyncio.wait(tasks, timeout=None if deadline is None else max(0.0, deadline - t0))
        if pending:
            timed_out = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
    now = monotonic()
    for rec in inflight.values():
        rec.error, rec.ok, rec.end = LEVEL_TIMEOUT_REASON, False, now
        records.append(rec)
    return LoopResult(records, [], time.process_time() - cpu0, now - t0, timed_out)


async def sessions_level(endpoints: list[str], factory: RequestFactory, concurrency: int, api_key: str | None,
                         deadline: float | None) -> tuple[LevelMetrics, list[RequestRecord], None]:
    """One level of sessions, its records on the same timeline as runner's (seconds from its start),
    as runner's levels return it: metrics, the requests, no steady window."""
    from .runner import clock_offset, shift_records
    w = factory.workload
    plan = session_plan(factory, concurrency)
    async with Client(endpoints, api_key, concurrency) as client:
        session = client.session
        if w.warmup_requests > 0:
            # Single first turns, not counted; indices past any session's, so no text repeats.
            await closed_loop(client, factory, min(concurrency, w.warmup_requests),
                              CountClaimer(w.warmup_requests, base=1 << 40).claim, LeastOutstanding(len(endpoints)),
                              timeout_s=w.request_timeout_s, stall_s=w.stall_limit_s, deadline=deadline,
                              measure=False)
        await client.prewarm(concurrency)
        before = await scrape_tokens(session, endpoints)
        prefix_before = await scrape_prefix(session, endpoints)
        epoch = time.time()
        result = await run_sessions(client, factory, concurrency, plan, timeout_s=w.request_timeout_s,
                                    stall_s=w.stall_limit_s, deadline=deadline)
        expect = sum(r.output_tokens for r in result.records if r.ok)
        server = await server_delta(session, endpoints, before, expect)
        prefix = prefix_delta(prefix_before, await scrape_prefix(session, endpoints))
    shift_records(result.records, clock_offset() - epoch)
    sm = SelfMeasurement(0, result.cpu_s, result.wall_s, result.loop_lag_ms)
    records = sorted(result.records, key=lambda r: r.index)
    metrics = compute_level_metrics(records, concurrency,
                                    self_measurements=[sm], endpoints=endpoints, server_output_tokens=server,
                                    warmup_requests=w.warmup_requests, timed_out=result.timed_out)
    metrics.wall_epoch = epoch
    return with_prefix_cache(metrics, prefix), records, None
