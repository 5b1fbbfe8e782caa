"""The async streaming client: closed-loop slots, one event loop per process.

Two transports behind one ``Client``: plain-http endpoints use the fast path
(``fast``: asyncio.Protocol, one keep-alive connection per in-flight stream,
no task wake-up per chunk); https endpoints, /metrics scrapes and responses
the fast path hands back (redirects, compressed bodies) use aiohttp.
``MM27_LOADGEN_AIOHTTP=1`` in the environment forces aiohttp everywhere
(for comparisons). Both record the same error reasons.

Hot-path rules (the client must not be the bottleneck):
- one ``time.monotonic()`` per socket read, not per SSE event;
- no JSON parsing of token chunks (see ``sse``);
- request bodies are built in the slot that sends them, outside the
  measured latency (the cost shows up as dispatch lag, where it belongs);
- no connection limit (``limit=0``), so no slot ever waits for another's
  connection; one session per process.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from .fast import FALLBACK, FastEndpoint, fast_request
from .samples import RequestRecord
from .prompts import RequestFactory
from .sse import SSEParser, StreamError, error_text

monotonic = time.monotonic

TICK_S = 0.010  # event-loop lag ticker period
PREWARM_BATCH = 128  # concurrent connects while pre-warming (stay under listen backlogs)
SENDS_PER_ITERATION = 32  # sends per event-loop iteration before reads get a turn (see SendPacer)


def fast_path_enabled() -> bool:
    return os.environ.get("MM27_LOADGEN_AIOHTTP", "") in ("", "0")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when importable, else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_sync(coro_fn: Callable[[], object]) -> object:
    """Run a coroutine on a private event loop (works with no loop running)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro_fn())


def make_session(api_key: str | None, concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,                    # no pool cap: a slot never waits for a connection
        limit_per_host=0,
        keepalive_timeout=120,
        ttl_dns_cache=None,
        force_close=False,
    )
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=None),  # our own per-request timeout covers everything
        read_bufsize=1 << 18,       # large reads: many SSE events per read at high rates
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )


async def prewarm_connections(session: aiohttp.ClientSession, endpoints: Sequence[str], n: int) -> None:
    """Open about ``n`` pooled keep-alive connections, spread over the endpoints.

    Concurrent cheap GETs each take their own connection (the pool has no
    limit) and leave it in the pool, so the measured window's first requests
    do not pay TCP connects inside their TTFT. Failures are ignored here:
    the measured requests will report them.
    """
    per_ep = max(1, math.ceil(n / max(1, len(endpoints))))

    async def get(url: str) -> None:
        try:
            async with asyncio.timeout(10.0):
                async with session.get(url) as resp:
                    await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass

    await asyncio.gather(*(get(ep.rstrip("/") + "/v1/models") for ep in endpoints for _ in range(per_ep)))


# --- endpoint choice and request claiming (local versions; runner has shared ones) ---

class LeastOutstanding:
    """Least outstanding requests; ties go round-robin."""

    def __init__(self, n: int):
        self.out = [0] * n
        self.rr = 0

    def acquire(self) -> int:
        out = self.out
        n = len(out)
        best = self.rr
        best_v = out[best]
        for k in range(1, n):
            i = (self.rr + k) % n
            if out[i] < best_v:
                best, best_v = i, out[i]
        out[best] += 1
        self.rr = (best + 1) % n
        return best

    def release(self, i: int) -> None:
        self.out[i] -= 1


# What a slot sends next: (request index, max_tokens or None for the workload's), or None to stop.
Claim = tuple[int, int | None]


class CountClaimer:
    """Hands out request indices ``base``..``base + limit - 1`` at the workload's length."""

    def __init__(self, limit: int | None, base: int = 0):
        self.next = 0
        self.limit = limit
        self.base = base

    def claim(self) -> Claim | None:
        if self.limit is not None and self.next >= self.limit:
            return None
        i = self.next
        self.next += 1
        return self.base + i, None


# --- one request ---

def _connect_reason(exc: BaseException) -> str:
    os_err = getattr(exc, "os_error", None) or exc
    if getattr(os_err, "errno", None) == errno.ECONNREFUSED or isinstance(os_err, ConnectionRefusedError):
        return "connection refused"
    return f"connection error: {str(exc)[:150]}"


def stall_reason(stall_s: float) -> str:
    return f"stalled: no data for {stall_s:g} s"


def timeout_reason(timeout_s: float) -> str:
    return f"timeout: not done within {timeout_s:g} s"


LEVEL_TIMEOUT_REASON = "level timeout: still in flight when the level's time ran out"


async def do_request(
    session: aiohttp.ClientSession, url: str, body: bytes, rec: RequestRecord, timeout_s: float,
    stall_s: float | None = None, parser: SSEParser | None = None,
) -> None:
    """Send one streaming request, filling ``rec`` (never raises for server faults).

    ``timeout_s`` bounds the whole request; ``stall_s`` bounds each silence: no
    byte (headers or body) for that long after the request was sent or after
    the last read fails it as stalled, so a hung server ends a level in
    bounded time. The stall deadline is pushed forward at most once per
    ``slack`` seconds (cheap on the hot path); a request fails after between
    ``stall_s`` and ``stall_s + slack`` seconds of silence.
    """
    got_headers = False
    parser = parser or SSEParser()
    loop = asyncio.get_running_loop()
    overall = loop.time() + timeout_s
    stall = stall_s if stall_s is not None and stall_s < timeout_s else None
    slack = min(1.0, stall * 0.1) if stall else 0.0
    try:
        async with asyncio.timeout_at(overall if stall is None else min(overall, loop.time() + stall + slack)) as cm:
            async with session.post(url, data=body) as resp:
                got_headers = True
                if stall is not None:
                    cm.reschedule(min(overall, loop.time() + stall + slack))
                if resp.status != 200:
                    text = await resp.content.read(4096)
                    rec.error = f"HTTP {resp.status}: {error_text(text)}"
                    return
                feed = parser.feed
                if stall is None:
                    async for data in resp.content.iter_any():
                        feed(data, monotonic())
                else:
                    when = cm.when()
                    async for data in resp.content.iter_any():
                        feed(data, monotonic())
                        now = loop.time()
                        if now + stall > when and when < overall:   # type: ignore[operator]
                            when = min(overall, now + stall + slack)
                            cm.reschedule(when)
                parser.finish()
    except TimeoutError:
        stalled = stall is not None and loop.time() < overall - 0.01
        rec.error = stall_reason(stall) if stalled else timeout_reason(timeout_s)  # type: ignore[arg-type]
        return
    except StreamError as e:
        rec.error = str(e)
        return
    except aiohttp.ClientConnectorError as e:
        rec.error = _connect_reason(e)
        return
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
        rec.error = "stream ended before [DONE]" if got_headers else "server disconnected"
        return
    except aiohttp.ClientResponseError as e:
        rec.error = f"bad response: {str(e)[:150]}"
        return
    except (aiohttp.ClientError, OSError) as e:
        rec.error = _connect_reason(e) if not got_headers else f"client error: {type(e).__name__}: {str(e)[:150]}"
        return
    fill_record(parser, rec)


def fill_record(parser: SSEParser, rec: RequestRecord) -> None:
    """A finished stream's usage and chunk times into ``rec`` (or why it is no success)."""
    usage = parser.usage or {}
    completion = usage.get("completion_tokens")
    if not isinstance(completion, int):
        rec.error = "no usage"
        return
    if completion > 0 and not parser.chunk_times:
        rec.error = "no text chunks"
        return
    rec.chunk_times = parser.chunk_times
    rec.output_tokens = completion
    prompt = usage.get("prompt_tokens")
    rec.prompt_tokens = prompt if isinstance(prompt, int) else 0
    rec.ok = True


class Client:
    """Everything one process needs to talk to the level's endpoints.

    ``request`` takes the fast path for plain-http endpoints and aiohttp for
    the rest; ``session`` (aiohttp) also serves /metrics scrapes.
    """

    def __init__(self, endpoints: Sequence[str], api_key: str | None, concurrency: int,
                 fast: bool | None = None):
        self.endpoints = [ep.rstrip("/") for ep in endpoints]
        self.session = make_session(api_key, concurrency)
        use_fast = fast_path_enabled() if fast is None else fast
        self.fast: list[FastEndpoint | None] = []
        for ep in self.endpoints:
            fe = None
            if use_fast and ep.startswith("http://"):
                try:
                    fe = FastEndpoint(ep, api_key)
                except (ValueError, UnicodeError):
                    fe = None
            self.fast.append(fe)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for fe in self.fast:
            if fe is not None:
                fe.close()
        await self.session.close()

    async def request(self, i: int, path: str, body: bytes, rec: RequestRecord, timeout_s: float,
                      stall_s: float | None = None, parser: SSEParser | None = None) -> None:
        """Send one streaming request to endpoint ``i``, filling ``rec`` (never raises for server faults).

        ``parser``: the stream's parser, given when the caller watches its chunks while it runs.
        """
        parser = parser or SSEParser()
        fe = self.fast[i]
        if fe is not None and not fe.slow:
            try:
                result = await fast_request(fe, path, body, parser, timeout_s, stall_s)
            except OSError as e:
                rec.error = _connect_reason(e)
                return
            if result is None:
                fill_record(parser, rec)
                return
            if result != FALLBACK:
                rec.error = result
                return
            fe.slow = True      # a redirect or an encoded body: aiohttp handles this endpoint
            parser.__init__()
        await do_request(self.session, self.endpoints[i] + path, body, rec, timeout_s, stall_s, parser)

    async def prewarm(self, n: int) -> None:
        """Open about ``n`` keep-alive connections, spread over the endpoints (see prewarm_connections)."""
        slow = [ep for ep, fe in zip(self.endpoints, self.fast) if fe is None]
        if slow:
            await prewarm_connections(self.session, slow, n)
        fast = [fe for fe in self.fast if fe is not None]
        if not fast:
            return
        per_ep = max(1, math.ceil(n / max(1, len(self.endpoints))))

        async def open_one(fe: FastEndpoint) -> None:
            try:
                async with asyncio.timeout(10.0):
                    conn = await fe.connect()
            except (OSError, TimeoutError):
                return
            fe.idle[conn] = None

        for fe in fast:
            need = per_ep - len(fe.idle)
            for k in range(0, need, PREWARM_BATCH):
                await asyncio.gather(*(open_one(fe) for _ in range(min(PREWARM_BATCH, need - k))))


# --- a closed loop of slots ---

class SendPacer:
    """At most ``per_iteration`` sends per event-loop iteration; the rest wait their turn.

    When many streams end together (the ramp, or a server finishing a batch),
    every freed slot would otherwise send its next request in the same loop
    iteration: c x ~30 us with no socket read in between, so first tokens that
    arrive meanwhile sit unread and inflate TTFT. Pacing lets the loop poll
    sockets between small groups of sends; the wait shows up as dispatch lag
    (slot free -> sent), where it belongs, instead of inside TTFT.
    """

    def __init__(self, per_iteration: int | None = None):
        self.per_iteration = per_iteration or SENDS_PER_ITERATION
        self.granted = 0
        self.waiting: deque[asyncio.Future] = deque()
        self.scheduled = False

    async def turn(self) -> None:
        if self.granted < self.per_iteration and not self.waiting:
            self.granted += 1
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self._next_iteration)
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        await fut

    def _next_iteration(self) -> None:
        # Runs one loop iteration later, i.e. after the loop polled the sockets.
        waiting = self.waiting
        granted = 0
        while waiting and granted < self.per_iteration:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                granted += 1
        self.granted = granted
        self.scheduled = bool(granted)
        if granted:
            asyncio.get_running_loop().call_soon(self._next_iteration)

@dataclass
class LoopResult:
    records: list[RequestRecord]    # times in this process's monotonic clock
    loop_lag_ms: list[float]
    cpu_s: float
    wall_s: float
    timed_out: bool


class Picker:  # protocol-ish, for type hints only
    def acquire(self) -> int: ...
    def release(self, i: int) -> None: ...


class Watcher:  # protocol-ish: what a steady level's controller (or a progress tally) hears from the loop
    def started(self, rec: RequestRecord, parser: SSEParser, max_tokens: int) -> None: ...
    def finished(self, rec: RequestRecord) -> None: ...


class Tally:
    """Requests done, failed and tokens served so far: what live progress shows."""

    def __init__(self, inner: Watcher | None = None):
        self.inner = inner
        self.done = self.failed = self.tokens = 0

    def started(self, rec: RequestRecord, parser: SSEParser, max_tokens: int) -> None:
        if self.inner is not None:
            self.inner.started(rec, parser, max_tokens)

    def finished(self, rec: RequestRecord) -> None:
        self.done += 1
        if rec.ok:
            self.tokens += rec.output_tokens
        else:
            self.failed += 1
        if self.inner is not None:
            self.inner.finished(rec)


async def closed_loop(
    client: Client,
    factory: RequestFactory,
    concurrency: int,
    claim: Callable[[], Claim | None],
    picker: Picker,
    *,
    timeout_s: float,
    stall_s: float | None = None,
    deadline: float | None = None,
    worker: int = 0,
    measure: bool = True,
    watcher: Watcher | None = None,
) -> LoopResult:
    """Keep ``concurrency`` requests in flight while ``claim`` hands out requests.

    ``watcher`` (steady levels) hears of every request as it starts, with its
    live parser, and as it finishes.
    """
    endpoints = client.endpoints
    path = factory.path
    request = client.request
    default_tokens = factory.workload.output_tokens
    records: list[RequestRecord] = []
    inflight: dict[int, RequestRecord] = {}
    lags: list[float] = []

    pacer = SendPacer()
    turn = pacer.turn
    new_parser = factory.parser

    async def slot(slot_free: float) -> None:
        ramp = True
        while True:
            await turn()
            if (claimed := claim()) is None:
                break
            idx, max_tokens = claimed
            ep = picker.acquire()
            try:
                body = factory.body(idx, max_tokens)
                rec = RequestRecord(index=idx, endpoint=endpoints[ep], worker=worker,
                                    slot_free=slot_free, sent=0.0, end=0.0, ramp=ramp)
                ramp = False
                inflight[idx] = rec
                parser = new_parser()
                rec.sent = monotonic()
                if watcher is not None:
                    watcher.started(rec, parser, max_tokens or default_tokens)
                await request(ep, path, body, rec, timeout_s, stall_s, parser)
                rec.end = slot_free = monotonic()
            finally:
                picker.release(ep)
            del inflight[idx]
            records.append(rec)
            if watcher is not None:
                watcher.finished(rec)

    async def ticker() -> None:
        append = lags.append
        while True:
            t = monotonic()
            await asyncio.sleep(TICK_S)
            append((monotonic() - t - TICK_S) * 1000.0)

    tick = asyncio.create_task(ticker()) if measure else None
    cpu0 = time.process_time()
    t0 = monotonic()
    tasks = [asyncio.create_task(slot(t0)) for _ in range(concurrency)]
    timed_out = False
    try:
        if deadline is None:
            await asyncio.gather(*tasks)
        else:
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - monotonic()))
            if pending:
                timed_out = True
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                t.result()
    finally:
        for t in tasks:
            t.cancel()
        if tick is not None:
            tick.cancel()
    now = monotonic()
    for rec in inflight.values():  # cancelled by the level timeout
        rec.error = LEVEL_TIMEOUT_REASON
        rec.ok = False
        rec.end = now
        records.append(rec)
    inflight.clear()
    return LoopResult(records, lags, time.process_time() - cpu0, now - t0, timed_out)
