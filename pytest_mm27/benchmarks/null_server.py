"""A Python twin of /work/shared/tools/null_sse_server.js, for hosts without Node.

    python -m pytest_mm27.benchmarks.null_server PORT STEP_MS

Every STEP_MS it writes one token chunk to every open stream (one decode
step of a batched engine), then a usage chunk and [DONE]. Raw asyncio
protocol on uvloop, HTTP/1.1 keep-alive, chunked bodies; GET answers a
model list. Ticks are scheduled on absolute times, so the step does not drift.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

TOKEN = (b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"null",'
         b'"choices":[{"index":0,"text":"tok ","logprobs":null,"finish_reason":null}],"usage":null}\n\n')
TOKEN_CHUNK = b"%x\r\n%s\r\n" % (len(TOKEN), TOKEN)
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
MODELS = b'{"object":"list","data":[{"id":"null","object":"model","max_model_len":100000}]}'


class Stream:
    __slots__ = ("transport", "left", "n", "prompt", "received")

    def __init__(self, transport, n: int, prompt: int):
        self.transport, self.left, self.n, self.prompt = transport, n, n, prompt
        self.received = time.monotonic()


ACTIVE: set[Stream] = set()
# Server-side TTFT (request parsed -> first token written), ms; GET /stats reads and resets it,
# so a client benchmark can subtract the server's share of TTFT.
SERVER_TTFT_MS: list[float] = []


class Conn(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4: head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length:]
            if head.startswith("GET"):
                payload = MODELS
                if head.startswith("GET /stats"):
                    data = sorted(SERVER_TTFT_MS)
                    SERVER_TTFT_MS.clear()
                    p50 = data[len(data) // 2] if data else None
                    payload = json.dumps({"ttft_p50_ms": p50, "n": len(data)}).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                continue
            try:
                j = json.loads(body or b"{}")
            except ValueError:
                j = {}
            n = j.get("max_tokens") or j.get("max_completion_tokens") or 16
            prompt = len(j["prompt"]) if isinstance(j.get("prompt"), list) else 16
            self.transport.write(SSE_HEAD)
            ACTIVE.add(Stream(self.transport, n, prompt))


def tick() -> None:
    done = []
    for s in ACTIVE:
        if s.transport.is_closing():
            done.append(s)
        elif s.left > 0:
            if s.left == s.n:
                SERVER_TTFT_MS.append((time.monotonic() - s.received) * 1000)
            s.transport.write(TOKEN_CHUNK)
            s.left -= 1
        else:
            usage = (b'data: {"id":"cmpl-0","object":"text_completion","created":0,"model":"null","choices":[],'
                     b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
                     % (s.prompt, s.n, s.prompt + s.n))
            tail = usage + b"data: [DONE]\n\n"
            s.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
            done.append(s)
    for s in done:
        ACTIVE.discard(s)


async def main(port: int, step_ms: float) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Conn, "127.0.0.1", port, backlog=4096)
    step = step_ms / 1000
    next_t = time.monotonic() + step
    while True:
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        tick()
        next_t += step
        if next_t < time.monotonic():  # overloaded: skip, do not burst
            next_t = time.monotonic() + step


if __name__ == "__main__":
    from ..loadgen.client import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 10.0))
