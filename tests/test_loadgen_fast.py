"""The load generator's fast path (``loadgen.fast``) and its aiohttp fallback.

Every error reason is checked on both transports (they must record the same
strings); HTTP framing corner cases are checked against scripted raw-socket
servers, so each byte boundary is where the test puts it. No timing asserts
beyond generous bounds: the box may be a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from test_loadgen import FakeServer, closed_port, make_workload, serve  # noqa: F401  (fixture)

from pytest_mm27.loadgen import run_level
from pytest_mm27.loadgen.client import (
    LEVEL_TIMEOUT_REASON,
    Client,
    fast_path_enabled,
    run_sync,
)
from pytest_mm27.loadgen.fast import FastEndpoint


@pytest.fixture(params=["fast", "aiohttp"])
def transport(request, monkeypatch):
    monkeypatch.setenv("MM27_LOADGEN_AIOHTTP", "1" if request.param == "aiohttp" else "0")
    return request.param


# --- same reasons on both transports (real aiohttp servers) ---

def test_fast_path_is_the_default(monkeypatch):
    monkeypatch.delenv("MM27_LOADGEN_AIOHTTP", raising=False)
    assert fast_path_enabled()

    async def kinds():
        async with Client(["http://127.0.0.1:1", "https://example.invalid"], None, 1) as c:
            return [type(f) for f in c.fast]

    assert run_sync(kinds) == [FastEndpoint, type(None)]


def test_uvloop_when_importable():
    uvloop = pytest.importorskip("uvloop")

    async def kind():
        return type(asyncio.get_running_loop())

    assert issubclass(run_sync(kind), uvloop.Loop)


def test_ok_both_transports(serve, transport):
    srv = serve(FakeServer(token_delay=0.005))
    m = run_level([srv.url], "m", make_workload(output_tokens=10, min_requests=6), 3, api_key="k")
    assert (m.ok, m.failed, m.output_tokens) == (6, 0, 60)
    assert m.itl_ms.n == 6 * 9 and m.server_tokens_match is True
    assert all(a == "Bearer k" for a in srv.auth)


def test_http_error_reason_both_transports(serve, transport):
    srv = serve(FakeServer(mode="http500", fail_every=2))
    m = run_level([srv.url], "m", make_workload(output_tokens=5, min_requests=8), 2)
    assert m.ok == 4
    [(reason, count)] = m.errors.items()
    assert count == 4 and reason.startswith("HTTP 500: boom: internal error xxx")
    assert len(reason) <= len("HTTP 500: ") + 200


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("malformed", "malformed SSE: this is not json"),
        ("cut", "stream ended before [DONE]"),
        ("nousage", "no usage"),
        ("error", "error in stream: engine died"),
    ],
)
def test_stream_fault_reasons_both_transports(serve, transport, mode, reason):
    srv = serve(FakeServer(mode=mode))
    m = run_level([srv.url], "m", make_workload(output_tokens=5), 2)
    assert m.errors == {reason: 4} and m.ok == 0 and m.failed == 4
    assert m.output_tokens == 0 and m.output_tok_s == 0     # failures never count toward throughput
    assert m.ttft_ms.n == 0


def test_connection_refused_both_transports(transport):
    m = run_level([f"http://127.0.0.1:{closed_port()}"], "m", make_workload(), 2)
    assert m.errors == {"connection refused": 4}


def test_timeout_both_transports(serve, transport):
    srv = serve(FakeServer(mode="hang"))
    t = time.monotonic()
    m = run_level([srv.url], "m", make_workload(request_timeout_s=0.5, min_requests=2), 2)
    assert time.monotonic() - t < 20
    assert m.errors == {"timeout: not done within 0.5 s": 2}


def test_level_timeout_both_transports(serve, transport):
    srv = serve(FakeServer(mode="hang"))
    m = run_level([srv.url], "m", make_workload(request_timeout_s=600, min_requests=6), 3, level_timeout_s=1.0)
    assert m.timed_out and m.errors == {LEVEL_TIMEOUT_REASON: 3}


# --- scripted raw servers ---

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


class RawServer:
    """A TCP server on a background loop; ``handler`` scripts each connection byte for byte."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []   # request heads, in order
        self.post_conns: set[int] = set()  # connections that carried a POST
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self):
        return await asyncio.start_server(self._conn, "127.0.0.1", 0)

    async def _conn(self, reader, writer):
        self.connections += 1
        reader.conn_no = self.connections     # not id(): ids of closed connections get reused
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_request(self, reader) -> dict | None:
        """One request's JSON body (None at EOF); the head goes to ``requests``."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        body = await reader.readexactly(length)
        self.requests.append(head)
        if head.startswith(b"POST"):
            self.post_conns.add(reader.conn_no)
        if head.startswith(b"GET"):
            return {"GET": True}
        return json.loads(body)

    def stop(self):
        async def down():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def raw():
    servers = []

    def start(handler: Handler) -> RawServer:
        s = RawServer(handler)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def sse_events(n: int, prompt: int = 16) -> list[bytes]:
    events = [b'data: {"choices":[{"index":0,"text":"w%d "}],"usage":null}\n\n' % i for i in range(n)]
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
    events.append(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def chunked(*pieces: bytes, ext: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces) + b"0\r\n\r\n"


HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def serving(make_response: Callable[[dict], bytes], *, split: int = 0, pause: float = 0.0) -> Handler:
    """A keep-alive handler answering each request with ``make_response(body)``,
    written ``split`` bytes at a time (0: in one write) with ``pause`` between writes."""

    async def handler(reader, writer, srv):
        while (body := await srv.read_request(reader)) is not None:
            if body.get("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                continue
            data = make_response(body)
            step = split or len(data)
            for i in range(0, len(data), step):
                writer.write(data[i:i + step])
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
    return handler


def ok_chunked(body: dict) -> bytes:
    return HEAD_CHUNKED + chunked(*sse_events(body["max_tokens"]))


def test_byte_by_byte(raw):
    srv = raw(serving(ok_chunked, split=1))
    m = run_level([srv.url], "m", make_workload(output_tokens=4, min_requests=2), 1)
    assert m.errors == {} and m.ok == 2 and m.itl_ms.n == 2 * 3


def test_odd_splits_and_coalesced_chunks(raw):
    # 7-byte writes cut size lines, CRLFs and events anywhere; several SSE
    # events per chunk and one event over two chunks are both legal.
    def response(body):
        ev = sse_events(body["max_tokens"])
        joined = b"".join(ev)
        half = len(ev[0]) // 2
        return HEAD_CHUNKED + chunked(joined[:half], joined[half:len(joined) // 2], joined[len(joined) // 2:],
                                      ext=b";name=value")
    srv = raw(serving(response, split=7))
    m = run_level([srv.url], "m", make_workload(output_tokens=6, min_requests=3), 1)
    assert m.errors == {} and m.ok == 3 and m.output_tokens == 18


def test_content_length_and_eof_bodies(raw):
    def sized(body):
        data = b"".join(sse_events(body["max_tokens"]))
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    srv = raw(serving(sized, split=50))
    m = run_level([srv.url], "m", make_workload(output_tokens=5, min_requests=3), 1)
    assert m.errors == {} and m.ok == 3
    assert len(srv.post_conns) == 1      # keep-alive kept

    async def until_eof(reader, writer, srv):
        body = await srv.read_request(reader)
        while body is not None and body.get("GET"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            body = await srv.read_request(reader)
        if body is None:
            return
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for ev in sse_events(body["max_tokens"]):
            writer.write(ev)
            await writer.drain()
    srv = raw(until_eof)
    m = run_level([srv.url], "m", make_workload(output_tokens=5, min_requests=3), 1)
    assert m.errors == {} and m.ok == 3


def test_informational_head_and_base_path(raw):
    srv = raw(serving(lambda body: b"HTTP/1.1 100 Continue\r\n\r\n" + ok_chunked(body), split=10))
    m = run_level([srv.url + "/prefix/"], "m", make_workload(output_tokens=3, min_requests=2), 1, api_key="s3")
    assert m.errors == {} and m.ok == 2
    posts = [h for h in srv.requests if h.startswith(b"POST")]
    assert posts and all(h.startswith(b"POST /prefix/v1/completions HTTP/1.1\r\n") for h in posts)
    assert all(b"\r\nAuthorization: Bearer s3\r\n" in h and f"Host: 127.0.0.1:{srv.port}".encode() in h
               for h in posts)


def test_keep_alive_one_connection_per_stream(raw):
    srv = raw(serving(ok_chunked, split=0, pause=0.0))
    m = run_level([srv.url], "m", make_workload(output_tokens=4, min_requests=12), 3)
    assert m.ok == 12
    assert len(srv.post_conns) <= 3


@pytest.mark.parametrize(
    "response, reason",
    [
        (HEAD_CHUNKED + b"zz\r\n", "bad response: bad chunk size b'zz'"),
        (b"SPDY/9 what\r\n\r\n", "bad response: SPDY/9 what"),
        (b"HTTP/1.1 200 OK\r\nContent-Ty", "bad response: connection closed inside the response head"),
        (b"", "server disconnected"),
        (HEAD_CHUNKED + b"400\r\n" + sse_events(3)[0], "stream ended before [DONE]"),
        (HEAD_CHUNKED + chunked(*sse_events(3)[:3]), "stream ended before [DONE]"),
        (HEAD_CHUNKED + chunked(*sse_events(3)[:3], sse_events(3)[-1]), "no usage"),
        (HEAD_CHUNKED + chunked(b'data: {"choices":[{"text":"a"}]}\n\ndata: [1, 2]\n\n'), "malformed SSE: [1, 2]"),
        (b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"busy,", b"\n try later"),
         "HTTP 503: busy, try later"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno model!", "HTTP 404: no model!"),
        (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\nread to the end", "HTTP 400: read to the end"),
    ],
    ids=["chunk-size", "status-line", "cut-head", "no-answer", "cut-chunk", "no-done", "no-usage",
         "not-object", "503-chunked", "404-length", "400-eof"],
)
def test_fast_path_reasons(raw, response, reason):
    async def once(reader, writer, srv):
        while (body := await srv.read_request(reader)) is not None:
            if body.get("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                continue
            for i in range(0, len(response), 5):     # in pieces: the parser must not need whole reads
                writer.write(response[i:i + 5])
                await writer.drain()
            return                                   # then close
    srv = raw(once)
    m = run_level([srv.url], "m", make_workload(output_tokens=3, min_requests=3), 1)
    assert m.errors == {reason: 3}


def test_long_error_body_is_cut_and_connection_dropped(raw):
    big = b"E" * 100_000
    srv = raw(serving(lambda body: b"HTTP/1.1 500 x\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)))
    m = run_level([srv.url], "m", make_workload(min_requests=3), 1)
    [(reason, n)] = m.errors.items()
    assert n == 3 and reason == "HTTP 500: " + "E" * 200
    assert len(srv.post_conns) == 3      # not reused: the rest of that body was never read


def run_bounded(srv, **workload):
    """Two requests at c=2 against a misbehaving server; they must end well before 20 s."""
    t = time.monotonic()
    m = run_level([srv.url], "m", make_workload(min_requests=2, **workload), 2)
    assert time.monotonic() - t < 20
    return m


def test_stalled_stream(raw):
    def half(body):
        return HEAD_CHUNKED + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in sse_events(4)[:2])

    async def then_silent(reader, writer, srv):
        while (body := await srv.read_request(reader)) is not None:
            if body.get("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                continue
            writer.write(half(body))
            await asyncio.sleep(3600)
    m = run_bounded(raw(then_silent), stall_timeout_s=0.5, request_timeout_s=60)
    assert m.errors == {"stalled: no data for 0.5 s": 2}


def test_stale_keep_alive_connection_is_retried(raw):
    # Each connection answers one POST, then closes without a word when asked
    # again (as a server whose idle timer fired would): the client retries once.
    async def one_per_conn(reader, writer, srv):
        answered = False
        while (body := await srv.read_request(reader)) is not None:
            if body.get("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                continue
            if answered:
                return
            writer.write(ok_chunked(body))
            answered = True
    srv = raw(one_per_conn)
    m = run_level([srv.url], "m", make_workload(output_tokens=3, min_requests=4), 1)
    assert m.errors == {} and m.ok == 4


def test_redirect_falls_back_to_aiohttp(raw):
    async def redirect_once(reader, writer, srv):
        while (body := await srv.read_request(reader)) is not None:
            head = srv.requests[-1]
            if body.get("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            elif head.startswith(b"POST /v1/"):
                writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /moved/v1/completions\r\n"
                             b"Content-Length: 0\r\n\r\n")
            else:
                writer.write(ok_chunked(body))
    srv = raw(redirect_once)
    m = run_level([srv.url], "m", make_workload(output_tokens=3, min_requests=3), 1)
    assert m.errors == {} and m.ok == 3
    assert any(h.startswith(b"POST /moved/") for h in srv.requests)


def test_slow_but_steady_stream_hits_the_overall_timeout_not_the_stall(raw):
    async def trickle(reader, writer, srv):
        while (body := await srv.read_request(reader)) is not None:
            if body.get("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                continue
            writer.write(HEAD_CHUNKED)
            for ev in sse_events(1000):
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await writer.drain()
                await asyncio.sleep(0.05)
    m = run_bounded(raw(trickle), stall_timeout_s=0.6, request_timeout_s=1.5)
    assert m.errors == {"timeout: not done within 1.5 s": 2}
