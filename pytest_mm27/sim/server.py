"""The simulator as an OpenAI-compatible HTTP server that behaves like ``vllm serve``.

One asyncio task per DP engine runs the scheduler on the wall clock: it plans a
step, sleeps until the step's absolute deadline (so Python overhead never
accumulates into drift), commits it, and hands each stream the number of tokens
it now has. Each request handler waits on one future per step at most and
writes all its ready tokens with one ``write`` of pre-rendered bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import __version__
from .cluster import SimSetup
from .scheduler import EngineCore, Seq
from . import toytok

# Steps that wake up later than this behind their deadline restart the chain
# from "now" instead of catching up (a stalled process must not burst).
MAX_LAG_S = 0.05
TOKEN_TEXT = " tok"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Faults:
    slowdown: float = 1.0
    error_rate: float = 0.0
    crash_after: int | None = None
    hang_after: int | None = None
    startup_delay: float = 0.0
    malformed_sse_rate: float = 0.0     # share of streams that get a broken SSE event mid-stream
    cut_stream_rate: float = 0.0        # share of streams whose connection is dropped mid-stream
    startup_crash: float | None = None  # exit(3) this many seconds into start-up, before healthy


class Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def render(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {float(acc)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        return out


class Stream:
    """Per-request hand-off between the step loop and the HTTP handler."""

    __slots__ = ("ready", "finished", "waiter")

    def __init__(self) -> None:
        self.ready = 0
        self.finished = False
        self.waiter: asyncio.Future | None = None


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.json_response(body, status=status)


def _message_text(messages: Any) -> str:
    parts = []
    for msg in messages or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return " ".join(parts)


def prompt_token_ids(body: dict[str, Any], chat: bool) -> list[int]:
    """The prompt as token ids: ids as given, text through the toy tokenizer (one token a
    word). Chat has no template tokens: the messages' words in order."""
    if chat:
        return toytok.tokenize(_message_text(body.get("messages"))) or [toytok.FIRST_ID]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, str):
        return toytok.tokenize(prompt) or [toytok.FIRST_ID]
    raise ValueError("prompt must be a string or a list of token ids (batched prompts are not simulated)")


class SimServer:
    def __init__(self, setup: SimSetup, served_model_name: str, *, api_key: str | None = None,
                 faults: Faults | None = None, seed: int = 0, prefix_caching: bool = True):
        self.setup = setup
        self.model_name = served_model_name
        self.api_key = api_key
        self.faults = faults or Faults()
        self.engines: list[EngineCore] = setup.build_engines()
        if not prefix_caching:      # --no-enable-prefix-caching
            for e in self.engines:
                e.cache = None
        self._rng = random.Random(seed)
        self._requests = 0
        self._wake: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task] = []
        self._ready_at = 0.0
        self._created = int(time.time())
        self.ttft = [Histogram(TTFT_BUCKETS) for _ in self.engines]
        self.e2e = [Histogram(E2E_BUCKETS) for _ in self.engines]
        for e in self.engines:
            e.on_first_token = self._first_token_observer(e.index)
            e.on_finish = self._finish_observer(e.index)
        self._labels = [f'engine="{e.index}",model_name="{served_model_name}"' for e in self.engines]

    def _first_token_observer(self, i: int):
        h = self.ttft[i]
        return lambda s, now: h.observe(now - s.arrival)

    def _finish_observer(self, i: int):
        h = self.e2e[i]
        return lambda s, now: h.observe(now - s.arrival)

    # --- lifecycle ---
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self._ready_at = loop.time() + self.faults.startup_delay
        if self.faults.startup_crash is not None:
            self._ready_at = float("inf")       # never healthy: it dies during start-up
        self._wake = [asyncio.Event() for _ in self.engines]
        self._tasks = [asyncio.create_task(self._run_engine(e)) for e in self.engines]
        if self.faults.startup_crash is not None:
            loop.call_later(self.faults.startup_crash, self._crash_at_start)

    def _crash_at_start(self) -> None:
        print(f"sim: --startup-crash {self.faults.startup_crash:g}: exiting during start-up "
              "(simulated failure to load the model)", file=sys.stderr, flush=True)
        os._exit(3)

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _ready(self) -> bool:
        return asyncio.get_running_loop().time() >= self._ready_at

    # --- the wall-clock step loop ---
    async def _run_engine(self, eng: EngineCore) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake[eng.index]
        deadline = loop.time()
        while True:
            if not eng.has_work():
                wake.clear()
                await wake.wait()
                deadline = loop.time()
            plan = eng.schedule()
            if plan is None:
                # only aborted work was left, or nothing fits yet: wait for change
                await asyncio.sleep(0.001)
                continue
            now = loop.time()
            start = deadline if now - deadline < MAX_LAG_S else now
            deadline = start + plan.duration
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for s in eng.commit(plan, loop.time()):
                st = s.sink
                if st is None:
                    continue
                st.ready += 1
                if s.done:
                    st.finished = True
                w = st.waiter
                if w is not None:
                    st.waiter = None
                    if not w.done():
                        w.set_result(None)

    # --- helpers ---
    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return None

    def _pick_engine(self) -> EngineCore:
        # least loaded (waiting + running), lowest index on ties: vLLM's DP coordinator
        return min(self.engines, key=lambda e: e.load)

    # --- endpoints ---
    async def health(self, request: web.Request) -> web.Response:
        if not self._ready():
            return web.Response(status=503)
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"sim-{__version__}"})

    async def models(self, request: web.Request) -> web.Response:
        denied = self._check_auth(request)
        if denied:
            return denied
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self._created, "owned_by": "vllm",
            "root": self.setup.model.hf_id or self.model_name, "parent": None,
            "max_model_len": self.setup.max_model_len, "permission": []}]})

    async def metrics(self, request: web.Request) -> web.Response:
        lines: list[str] = []

        def family(name: str, kind: str, help_: str, values: list[float]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for lab, v in zip(self._labels, values):
                lines.append(f"{name}{{{lab}}} {float(v)}")

        es = self.engines
        family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               [len(e.running) for e in es])
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               [len(e.waiting) for e in es])
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               [e.kv_usage() for e in es])
        family("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
               [e.preemptions for e in es])
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               [e.prompt_tokens for e in es])
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               [e.generation_tokens for e in es])
        family("vllm:prefix_cache_queries_total", "counter",
               "Prefix cache queries, in terms of number of queried tokens.",
               [e.cache.queries if e.cache else 0 for e in es])
        family("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
               [e.cache.hits if e.cache else 0 for e in es])
        lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
        lines.append("# TYPE vllm:request_success_total counter")
        for lab, e in zip(self._labels, es):
            lines.append(f'vllm:request_success_total{{{lab},finished_reason="length"}} {float(e.success)}')
        for name, hists, help_ in (
                ("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token in seconds."),
                ("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency in seconds.")):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} histogram")
            for lab, h in zip(self._labels, hists):
                lines.extend(h.render(name, lab))
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        denied = self._check_auth(request)
        if denied:
            return denied
        try:
            body = await request.json()
        except (ValueError, json.JSONDecodeError) as exc:
            return _error(400, f"invalid JSON: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "BadRequestError")
        model = body.get("model")
        if model is not None and model != self.model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: ``prompt`` (a string) or chat ``messages``."""
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        if "messages" in body:
            if not isinstance(body["messages"], list):
                return _error(400, "messages must be a list", "BadRequestError")
            ids = toytok.tokenize(_message_text(body["messages"]))
        elif isinstance(body.get("prompt"), str):
            ids = toytok.tokenize(body["prompt"])
        else:
            return _error(400, "give prompt (a string) or messages", "BadRequestError")
        strs = [toytok.detokenize([i]) for i in ids] if body.get("return_token_strs") else None
        return web.json_response({"count": len(ids), "max_model_len": self.setup.max_model_len, "tokens": ids,
                                  "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            return _error(400, "tokens must be a list of non-negative integers", "BadRequestError")
        return web.json_response({"prompt": toytok.detokenize(ids)})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        denied = self._check_auth(request)
        if denied:
            return denied
        if not self._ready():
            return _error(503, "The server is starting up.", "ServiceUnavailableError")
        self._requests += 1
        index = self._requests
        f = self.faults
        if f.crash_after is not None and index >= f.crash_after:
            print(f"sim: --crash-after {f.crash_after}: exiting on request {index}", file=sys.stderr, flush=True)
            os._exit(1)
        if f.error_rate > 0 and self._rng.random() < f.error_rate:
            return _error(500, "Simulated internal server error (--error-rate).", "InternalServerError")
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            prompt_ids = prompt_token_ids(body, chat)
            prompt_len = len(prompt_ids)
        except (ValueError, json.JSONDecodeError) as exc:
            return _error(400, str(exc), "BadRequestError")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        limit = self.setup.max_model_len
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = 16 if not chat else limit - prompt_len
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer.", "BadRequestError")
        if prompt_len + max_tokens > limit:
            return _error(400, f"This model's maximum context length is {limit} tokens. However, you "
                               f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                               f"{max_tokens} in the completion). Please reduce the length of the messages "
                               f"or completion.", "BadRequestError")
        loop = asyncio.get_running_loop()
        stream = Stream()
        seq = Seq(index, prompt_len, max_tokens, loop.time(), sink=stream, tokens=prompt_ids)
        eng = self._pick_engine()
        eng.add(seq)
        self._wake[eng.index].set()
        hang_at = None
        if f.hang_after is not None and index >= f.hang_after:
            hang_at = max(1, max_tokens // 2)
        # Stream faults are drawn per request (seeded), only when asked for, so
        # the draws of --error-rate stay what they were without them.
        broken = None
        if f.malformed_sse_rate > 0 and self._rng.random() < f.malformed_sse_rate:
            broken = "malformed"
        elif f.cut_stream_rate > 0 and self._rng.random() < f.cut_stream_rate:
            broken = "cut"
        try:
            if body.get("stream"):
                opts = body.get("stream_options") or {}
                return await self._stream(request, eng, seq, stream, chat, bool(opts.get("include_usage")),
                                          hang_at, broken)
            return await self._whole(eng, seq, stream, chat, hang_at)
        finally:
            if not seq.done:
                eng.abort(seq)

    async def _wait(self, stream: Stream) -> None:
        fut = asyncio.get_running_loop().create_future()
        stream.waiter = fut
        await fut

    async def _whole(self, eng: EngineCore, seq: Seq, stream: Stream, chat: bool, hang_at: int | None) -> web.Response:
        while not stream.finished:
            if hang_at is not None and stream.ready >= hang_at:
                eng.abort(seq)
                await asyncio.Event().wait()
            await self._wait(stream)
        n = seq.generated
        usage = {"prompt_tokens": seq.prompt_len, "completion_tokens": n, "total_tokens": seq.prompt_len + n}
        text = TOKEN_TEXT * n
        rid = uuid.uuid4().hex
        if chat:
            return web.json_response({
                "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                       "logprobs": None, "finish_reason": "length"}],
                "usage": usage})
        return web.json_response({
            "id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": "length", "stop_reason": None}],
            "usage": usage})

    async def _stream(self, request: web.Request, eng: EngineCore, seq: Seq, stream: Stream, chat: bool,
                      include_usage: bool, hang_at: int | None,
                      broken: str | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        rid = uuid.uuid4().hex
        model = json.dumps(self.model_name)
        if chat:
            head = (f'data: {{"id":"chatcmpl-{rid}","object":"chat.completion.chunk","created":{created},'
                    f'"model":{model},"choices":[{{"index":0,"delta":')
            first = (head + '{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n').encode()
            token = (head + '{"content":' + json.dumps(TOKEN_TEXT)
                     + '},"logprobs":null,"finish_reason":null}]}\n\n').encode()
            last = (head + '{"content":' + json.dumps(TOKEN_TEXT)
                    + '},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n').encode()
            usage_head = (f'data: {{"id":"chatcmpl-{rid}","object":"chat.completion.chunk","created":{created},'
                          f'"model":{model},"choices":[],"usage":')
        else:
            head = (f'data: {{"id":"cmpl-{rid}","object":"text_completion","created":{created},'
                    f'"model":{model},"choices":[{{"index":0,"text":' + json.dumps(TOKEN_TEXT))
            first = b""
            token = (head + ',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n').encode()
            last = (head + ',"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n').encode()
            usage_head = (f'data: {{"id":"cmpl-{rid}","object":"text_completion","created":{created},'
                          f'"model":{model},"choices":[],"usage":')
        sent = 0
        # A broken stream goes wrong halfway, after some good tokens.
        break_at = max(1, seq.max_tokens // 2) if broken else None
        try:
            while True:
                ready = stream.ready
                if break_at is not None and sent >= break_at:
                    eng.abort(seq)
                    if broken == "malformed":
                        await resp.write(b'data: {"id":"broken","choices":[{"index":0,"text":" tok"\n\n')
                        await resp.write(b"data: [DONE]\n\n")
                        await resp.write_eof()
                    elif request.transport is not None:
                        request.transport.close()       # drop the connection mid-body
                    return resp
                if hang_at is not None and ready >= hang_at:
                    ready = hang_at
                if break_at is not None and ready > break_at:
                    ready = break_at
                if ready == sent:
                    if hang_at is not None and sent >= hang_at:
                        eng.abort(seq)
                        await asyncio.Event().wait()     # keep the connection open, send nothing
                    await self._wait(stream)
                    continue
                n = ready - sent
                done = stream.finished and ready == stream.ready
                parts = []
                if sent == 0 and first:
                    parts.append(first)
                if done:
                    parts.append(token * (n - 1) + last)
                    if include_usage:
                        g = seq.generated
                        parts.append((usage_head + f'{{"prompt_tokens":{seq.prompt_len},"completion_tokens":{g},'
                                                   f'"total_tokens":{seq.prompt_len + g}}}}}\n\n').encode())
                    parts.append(b"data: [DONE]\n\n")
                else:
                    parts.append(token * n)
                sent = ready
                await resp.write(b"".join(parts))
                if done:
                    break
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            eng.abort(seq)
        return resp


def serve(setup: SimSetup, served_model_name: str, host: str, port: int, *, api_key: str | None,
          faults: Faults, seed: int, prefix_caching: bool = True) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
        uvloop.install()
    except ImportError:
        pass
    server = SimServer(setup, served_model_name, api_key=api_key, faults=faults, seed=seed,
                       prefix_caching=prefix_caching)
    fit = setup.memory()
    print(f"sim: {served_model_name} ({setup.model.name}) on {setup.hardware.name}, TP={setup.tp} DP={setup.dp}, "
          f"max_num_seqs={setup.max_num_seqs}, max_model_len={setup.max_model_len}; {fit.reason}", flush=True)
    print(f"sim: serving on http://{host}:{port}", flush=True)
    # shutdown_timeout: on SIGTERM, streams that hang (--hang-after) are cut after
    # one second instead of aiohttp's default minute, so teardown stays quick.
    web.run_app(server.app(), host=host, port=port, access_log=None, print=None, handler_cancellation=True,
                shutdown_timeout=1.0)
