"""Cheap server-sent-events parsing for OpenAI-style streams.

Only the final usage chunk (and error objects) are JSON-parsed. Whether a
chunk carries a generated token is decided by one compiled regex on the raw
bytes: a ``text`` string (completions; it may be empty, as vLLM's own
benchmark counts it: a token can decode to no text, e.g. a special token or
half a UTF-8 character) or a non-empty ``content`` / ``reasoning_content`` /
``reasoning`` string (chat deltas; the first delta carries only the role and
an empty content). Inside a JSON string a quote is always escaped, so the
pattern cannot match inside generated text.
"""

from __future__ import annotations

import json
import re

# "text":"...  (any string)  |  "content": "x  (a non-empty string)
_TEXT = re.compile(rb'"text"\s*:\s*"|"(?:content|reasoning_content|reasoning)"\s*:\s*"(?!")')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_ERROR = re.compile(rb'"error"\s*:\s*[{"]')


class StreamError(Exception):
    """The stream broke the protocol; ``str()`` is the short reason recorded."""


class SSEParser:
    """Feed raw bytes; call ``now()`` once per read, not per event.

    Collects ``chunk_times`` (arrival of each text-bearing event), the last
    ``usage`` object, and ``done`` once ``data: [DONE]`` arrives.
    """

    __slots__ = ("buf", "chunk_times", "usage", "done")

    def __init__(self) -> None:
        self.buf = b""
        self.chunk_times: list[float] = []
        self.usage: dict | None = None
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        if self.buf:
            buf = self.buf + data
        else:
            buf = data
            # Shortcut for the usual read: exactly one single-line, text-bearing
            # ``data: {...}`` event (same outcome as the general path below).
            if (buf.startswith(b"data: {") and buf.find(b"\n") == len(buf) - 2 and buf.endswith(b"}\n\n")
                    and not self.done and _TEXT.search(buf) is not None):
                self.chunk_times.append(now)
                if b'"usage"' in buf and _USAGE.search(buf):
                    self._usage(buf[6:-2])
                return
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events = buf.split(b"\n\n")
        self.buf = events.pop()  # incomplete tail (b"" when the read ended on a boundary)
        for event in events:
            if event:
                self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        if event.startswith(b"data:"):
            if b"\n" in event:  # multi-line event: join its data lines
                payload = b"\n".join(
                    line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
                )
            else:
                payload = event[5:].lstrip(b" ")
        elif event.startswith(b":"):
            return  # comment / keep-alive
        else:
            lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                return  # event:, id:, retry: lines only
            payload = b"\n".join(line[5:].lstrip(b" ") for line in lines)
        payload = payload.strip()
        if payload == b"[DONE]":
            self.done = True
            return
        if self.done:
            raise StreamError("malformed SSE: data after [DONE]")
        if not (payload.startswith(b"{") and payload.endswith(b"}")):
            raise StreamError("malformed SSE: " + _short(payload))
        if _TEXT.search(payload):
            self.chunk_times.append(now)
            has_text = True
        else:
            has_text = False
        if _USAGE.search(payload):
            self._usage(payload)
        elif not has_text and _ERROR.search(payload):
            self._maybe_error(payload)

    def _usage(self, payload: bytes) -> None:
        try:
            usage = json.loads(payload).get("usage")
        except ValueError:
            raise StreamError("malformed SSE: " + _short(payload)) from None
        if isinstance(usage, dict):
            self.usage = usage

    def _maybe_error(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except ValueError:
            raise StreamError("malformed SSE: " + _short(payload)) from None
        err = obj.get("error") if isinstance(obj, dict) else None
        if err:
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise StreamError("error in stream: " + str(msg)[:200])

    def finish(self) -> None:
        """Call at end of body: raises for whatever the stream still owes."""
        if self.buf.strip():
            tail, self.buf = self.buf, b""
            self._event(tail.strip(), 0.0 if not self.chunk_times else self.chunk_times[-1])
        if not self.done:
            raise StreamError("stream ended before [DONE]")
        if self.usage is None:
            raise StreamError("no usage")


class WholeParser:
    """The parser of a non-streaming response (a workload with ``stream = false``): one JSON body.

    Same surface as :class:`SSEParser`. The whole answer arrives at once, so
    its one "chunk" is the body's last read: TTFT equals E2EL, and TPOT is
    undefined (see ``samples.tpot``), as a client that does not stream sees it.
    """

    __slots__ = ("buf", "chunk_times", "usage", "done", "last")

    def __init__(self) -> None:
        self.buf = b""
        self.chunk_times: list[float] = []
        self.usage: dict | None = None
        self.done = False
        self.last = 0.0

    def feed(self, data: bytes, now: float) -> None:
        self.buf += data
        self.last = now

    def finish(self) -> None:
        try:
            obj = json.loads(self.buf)
        except ValueError:
            raise StreamError("malformed JSON response: " + _short(self.buf)) from None
        if not isinstance(obj, dict):
            raise StreamError("malformed JSON response: " + _short(self.buf))
        if obj.get("error"):
            err = obj["error"]
            raise StreamError("error in response: " + str(err.get("message", err) if isinstance(err, dict)
                                                          else err)[:200])
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            raise StreamError("no usage")
        self.usage = usage
        if obj.get("choices"):
            self.chunk_times = [self.last]
        self.done = True


def _short(payload: bytes) -> str:
    return payload[:80].decode("utf-8", "replace")


_WS = re.compile(r"\s+")


def error_text(body: bytes) -> str:
    """An error response's body as one short line, for the record (both transports use it)."""
    return _WS.sub(" ", body.decode("utf-8", "replace")).strip()[:200]
