"""The fast path: streaming requests to plain-http endpoints on asyncio.Protocol.

Why: aiohttp costs ~20 us of CPU per streamed chunk (a StreamReader, a task
wake-up and a timeout reschedule per read), which made one client process
the bottleneck from a few hundred streams up. Here each in-flight stream
owns one keep-alive connection whose protocol object does everything inside
``data_received``:

- one ``time.monotonic()`` per read, stamped on every text-bearing SSE event
  of that read;
- HTTP/1.1 status line and headers parsed once per response; chunked
  transfer-encoding decoded with ``bytes.find`` (a read holding exactly one
  whole chunk, the usual case, takes a shortcut);
- SSE events decoded by ``sse.SSEParser`` (regex on raw bytes, JSON only for
  usage and error objects);
- the waiting task is woken once, when the response is over; the stall and
  overall timeouts are two timer handles per request, not per read.

Anything unusual is handed back to aiohttp (``Fallback``): https endpoints
never get here, and a redirect or a compressed body makes the endpoint use
aiohttp from then on. Error reasons are the same strings the aiohttp path
records (see ``client``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from urllib.parse import urlsplit

from .sse import SSEParser, StreamError, error_text

monotonic = time.monotonic

MAX_HEAD = 64 * 1024          # a response head longer than this is not HTTP we want
ERROR_BODY_BYTES = 4096       # how much of a non-200 body the reason quotes

# Completion markers (the future's result is the error reason, None for success).
FALLBACK = "\0fallback"       # hand this request (and the endpoint) to aiohttp
STALE = "\0stale"             # a reused keep-alive connection died before any byte came back

_HEADERS = re.compile(rb"\r\n(transfer-encoding|content-length|connection|content-encoding)[ \t]*:([^\r\n]*)")

# body framing
_CHUNKED, _LENGTH, _EOF, _NONE = range(4)
# states
_IDLE, _HEAD, _BODY, _TRAILER = range(4)


class FastEndpoint:
    """One plain-http base URL: its pool of idle keep-alive connections and request heads."""

    def __init__(self, base_url: str, api_key: str | None):
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"not a plain-http URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        host_header = u.netloc.rsplit("@", 1)[-1]
        extra = b"Authorization: Bearer " + api_key.encode("latin-1") + b"\r\n" if api_key else b""
        self._head_tail = (b"Host: " + host_header.encode("idna") + b"\r\n"
                           b"Content-Type: application/json\r\nAccept: text/event-stream\r\n" + extra)
        self._heads: dict[str, bytes] = {}
        self.idle: dict[_Conn, None] = {}   # insertion-ordered set; popitem() gives the newest
        self.addr: tuple | None = None       # resolved (family, sockaddr), once
        self.slow = False                    # a Fallback happened: aiohttp from now on

    def request_bytes(self, path: str, body: bytes) -> bytes:
        head = self._heads.get(path)
        if head is None:
            head = self._heads[path] = b"POST " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self._head_tail
        return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)

    async def connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self.addr is None:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            last: OSError | None = None
            for family, _, _, _, sockaddr in infos:
                try:
                    conn = await self._open(loop, family, sockaddr)
                except OSError as e:
                    last = e
                    continue
                self.addr = (family, sockaddr)
                return conn
            raise last or OSError(f"cannot resolve {self.host}")
        return await self._open(loop, *self.addr)

    async def _open(self, loop, family, sockaddr) -> _Conn:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, sockaddr)
            _, conn = await loop.create_connection(lambda: _Conn(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        return conn

    def close(self) -> None:
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time."""

    __slots__ = (
        "ep", "transport", "fut", "state", "parser", "pend", "status", "framing", "left",
        "keep", "got_bytes", "fast", "err_body", "last", "stall_s", "timeout_s", "deadline", "timer", "reused",
    )

    def __init__(self, ep: FastEndpoint):
        self.ep = ep
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future | None = None
        self.state = _IDLE
        self.parser: SSEParser | None = None
        self.keep = True
        self._new_response()
        self.last = 0.0
        self.stall_s: float | None = None
        self.timeout_s = 0.0
        self.deadline = 0.0           # monotonic time the whole request must be done by
        self.timer: asyncio.TimerHandle | None = None   # one per request: stall and overall bound
        self.reused = False

    # --- lifecycle ---

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.keep = False
        if self.fut is None:
            self.ep.idle.pop(self, None)
            return
        if self.state == _HEAD or self.state == _IDLE:
            if not self.got_bytes and self.reused:
                self._complete(STALE)
            elif self.got_bytes:
                self._complete("bad response: connection closed inside the response head")
            else:
                self._complete("server disconnected")
        elif self.state == _BODY and self.framing == _EOF:
            self._end_of_body()
        elif self.err_body is not None:
            self._complete(self._http_error())
        else:
            # Cut mid-body; a stream that already said [DONE] and usage lost nothing.
            self._finish_stream(cut=True)

    def close(self) -> None:
        self.keep = False
        if self.transport is not None:
            self.transport.abort()

    def _new_response(self) -> None:
        """Forget the previous response's parsing state (once per request, not per read)."""
        self.pend = b""
        self.status = 0
        self.framing = _NONE
        self.left = 0
        self.got_bytes = False
        self.fast = False             # in a 200 chunked body: data_received's shortcut applies
        self.err_body: bytearray | None = None

    def start(self, data: bytes, parser: SSEParser, timeout_s: float, stall_s: float | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.fut = fut = loop.create_future()
        self.parser = parser
        self.state = _HEAD
        self._new_response()
        self.last = now = monotonic()
        self.timeout_s = timeout_s
        self.deadline = now + timeout_s
        if stall_s is not None and stall_s < timeout_s:
            self.stall_s = stall_s
            self.timer = loop.call_later(stall_s, self._on_timer)
        else:
            self.stall_s = None
            self.timer = loop.call_later(timeout_s, self._on_timer)
        self.transport.write(data)
        return fut

    def _on_timer(self) -> None:
        # One timer per request; it re-arms itself for whichever bound is nearer
        # (the next read pushes the stall bound back without touching the timer).
        self.timer = None
        if self.fut is None:
            return
        now = monotonic()
        if now >= self.deadline - 0.001:
            self._complete(f"timeout: not done within {self.timeout_s:g} s", abort=True)
            return
        stall = self.stall_s
        when = self.deadline
        if stall is not None:
            if now - self.last >= stall - 0.001:
                self._complete(f"stalled: no data for {stall:g} s", abort=True)
                return
            when = min(when, self.last + stall)
        self.timer = asyncio.get_running_loop().call_later(max(0.0, when - now), self._on_timer)

    def _complete(self, result: str | None, abort: bool = False) -> None:
        fut = self.fut
        if fut is None:
            return
        self.fut = None
        self.parser = None
        self.state = _IDLE
        self.fast = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if result is not None or abort:
            self.keep = False
        if not self.keep and self.transport is not None:
            self.transport.abort()
        if not fut.done():
            fut.set_result(result)

    # --- reading ---

    def data_received(self, data: bytes) -> None:
        now = monotonic()
        self.last = now
        if not self.fast:
            self._data_other(data, now)
            return
        # Chunked SSE body. Shortcut: the read is exactly one whole chunk.
        if not self.left and not self.pend:
            eol = data.find(b"\r\n", 0, 10)
            if eol > 0:
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = -1
                if size > 0 and eol + size + 4 == len(data) and data.endswith(b"\r\n"):
                    try:
                        self.parser.feed(data[eol + 2:-2], now)
                    except StreamError as e:
                        self._complete(str(e))
                    return
        self._chunked(data, now)

    def _chunked(self, data: bytes, now: float) -> None:
        if self.pend:
            data = self.pend + data
            self.pend = b""
        pieces = []
        pos = 0
        n = len(data)
        left = self.left                # bytes left of the current chunk, its CRLF included
        while pos < n:
            if left > 2:
                take = min(left - 2, n - pos)
                pieces.append(data[pos:pos + take])
                pos += take
                left -= take
                continue
            if left:                    # the chunk's closing CRLF
                skip = min(left, n - pos)
                pos += skip
                left -= skip
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > 1024:
                    self.left = 0
                    self._complete("bad response: chunk size line too long")
                    return
                self.pend = data[pos:]
                break
            try:
                size = int(data[pos:eol].split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                self._complete("bad response: bad chunk size " + repr(bytes(data[pos:eol][:40])))
                return
            pos = eol + 2
            if size == 0:
                self.left = 0
                self._feed_body(pieces, now)
                if self.fut is None:
                    return
                self.state = _TRAILER
                self.fast = False
                self._trailer(data[pos:])
                return
            left = size + 2
        self.left = left
        self._feed_body(pieces, now)

    def _feed_body(self, pieces: list, now: float) -> None:
        if not pieces:
            return
        if self.err_body is not None:
            for p in pieces:
                self.err_body += p
            if len(self.err_body) >= ERROR_BODY_BYTES:
                self.keep = False
                self._complete(self._http_error())
            return
        try:
            self.parser.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces), now)
        except StreamError as e:
            self._complete(str(e))

    def _trailer(self, data: bytes) -> None:
        buf = self.pend + data
        if buf.startswith(b"\r\n"):
            rest = buf[2:]
        else:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_HEAD:
                    self.keep = False
                    self._end_of_body()
                    return
                self.pend = buf
                return
            rest = buf[i + 4:]
        self.pend = b""
        if rest:
            self.keep = False     # bytes nobody asked for: do not reuse this connection
        self._end_of_body()

    def _data_other(self, data: bytes, now: float) -> None:
        if self.fut is None:              # bytes on an idle connection: drop it
            self.close()
            return
        self.got_bytes = True
        state = self.state
        if state == _HEAD:
            self._head(data, now)
        elif state == _TRAILER:
            self._trailer(data)
        elif state == _BODY:
            if self.framing == _CHUNKED:
                self._chunked(data, now)
            elif self.framing == _LENGTH:
                take = data[:self.left]
                self.left -= len(take)
                if len(take) < len(data):
                    self.keep = False
                self._feed_body([take], now)
                if self.fut is not None and self.left == 0:
                    self._end_of_body()
            else:  # _EOF
                self._feed_body([data], now)

    def _head(self, data: bytes, now: float) -> None:
        buf = self.pend + data if self.pend else data
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_HEAD:
                    self._complete("bad response: response head too long")
                else:
                    self.pend = buf
                return
            head, buf = buf[:i], buf[i + 4:]
            lines = head.split(b"\r\n")
            parts = lines[0].split(None, 2)
            try:
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                    raise ValueError
                status = int(parts[1])
            except ValueError:
                self._complete("bad response: " + repr(bytes(lines[0][:80]))[2:-1])
                return
            if 100 <= status < 200:         # informational; the real head follows
                continue
            break
        self.pend = b""
        self.status = status
        keep = parts[0] != b"HTTP/1.0"
        chunked = False
        length = None
        encoded = False
        # One regex pass over the lower-cased head finds the few headers we act on.
        for name, value in _HEADERS.findall(head.lower()):
            value = value.strip()
            if name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    self._complete("bad response: bad content-length")
                    return
            elif name == b"connection":
                if b"close" in value:
                    keep = False
                elif b"keep-alive" in value:
                    keep = True
            elif value not in (b"identity", b""):    # content-encoding
                encoded = True
        self.keep = keep
        if 300 <= status < 400 or (encoded and status == 200):
            self._complete(FALLBACK, abort=True)
            return
        if status == 204 or status == 304:
            self.framing, self.left = _NONE, 0
        elif chunked:
            self.framing, self.left = _CHUNKED, 0
        elif length is not None:
            self.framing, self.left = _LENGTH, length
        else:
            self.framing, self.left = _EOF, 0
            self.keep = False
        if status != 200:
            self.err_body = bytearray()
        self.state = _BODY
        self.fast = self.framing == _CHUNKED and self.err_body is None
        if self.framing == _NONE or (self.framing == _LENGTH and self.left == 0):
            self._end_of_body()
            return
        if buf:
            self._data_other(buf, now)

    # --- the end ---

    def _http_error(self) -> str:
        return f"HTTP {self.status}: {error_text(bytes(self.err_body or b'')[:ERROR_BODY_BYTES])}"

    def _end_of_body(self) -> None:
        if self.err_body is not None:
            self._complete(self._http_error())
        else:
            self._finish_stream(cut=False)

    def _finish_stream(self, cut: bool) -> None:
        parser = self.parser
        if parser is None:
            return
        try:
            parser.finish()
        except StreamError as e:
            self._complete(str(e))
            return
        if cut:
            self.keep = False
        self._complete(None)


async def fast_request(ep: FastEndpoint, path: str, body: bytes, parser: SSEParser,
                       timeout_s: float, stall_s: float | None) -> str | None:
    """Send one streaming request; the error reason, None on success, or ``FALLBACK``.

    Connection failures raise ``OSError`` (the caller words them). A reused
    connection that turns out dead before any byte of answer is retried once
    on a fresh one, as browsers do.
    """
    data = ep.request_bytes(path, body)
    for _attempt in range(2):
        conn = None
        while ep.idle:
            c, _ = ep.idle.popitem()
            if c.keep and c.transport is not None and not c.transport.is_closing():
                conn = c
                conn.reused = True
                break
        if conn is None:
            bound = min(timeout_s, stall_s) if stall_s is not None else timeout_s
            try:
                async with asyncio.timeout(bound):
                    conn = await ep.connect()
            except TimeoutError:
                return (f"stalled: no data for {stall_s:g} s" if stall_s is not None and stall_s < timeout_s
                        else f"timeout: not done within {timeout_s:g} s")
            conn.reused = False
        fut = conn.start(data, parser, timeout_s, stall_s)
        try:
            result = await fut
        except BaseException:       # cancelled (level timeout): the connection is mid-stream
            conn._complete("cancelled", abort=True)
            conn.close()
            raise
        if result is None and conn.keep:
            ep.idle[conn] = None
        if result == STALE:
            parser.__init__()
            continue
        return result
    return "server disconnected"
