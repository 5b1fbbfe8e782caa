"""Tests for pytest_mm27.loadgen against small real HTTP servers defined here.

Timing asserts are deliberately loose: the machine may be a loaded 2-core box.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from pytest_mm27.errors import LoadError
from pytest_mm27.loadgen import LevelMetrics, Percentiles, RequestRecord, run_level
from pytest_mm27.loadgen.client import LEVEL_TIMEOUT_REASON, LeastOutstanding
from pytest_mm27.loadgen.metrics import SelfMeasurement, compute_level_metrics
from pytest_mm27.loadgen.samples import itls, percentile, steady_window, tokens_in_window, tpot
from pytest_mm27.loadgen.prompts import TOKEN_ID_MAX, TOKEN_ID_MIN, RequestFactory
from pytest_mm27.loadgen.scrape import parse_generation_tokens
from pytest_mm27.loadgen.sse import SSEParser, StreamError
from pytest_mm27.catalog.workload import Workload


def make_workload(**kw) -> Workload:
    base = dict(
        name="t", description="", source=Path("t.toml"), input_tokens=16, output_tokens=8,
        ignore_eos=True, requests_per_concurrency=1.0, min_requests=4, duration_s=None,
        warmup_requests=0, api="completions", temperature=0.0, request_timeout_s=30.0, seed=0,
    )
    base.update(kw)
    return Workload(**base)


# --- a tiny OpenAI-style streaming server ---

@dataclass
class FakeServer:
    token_delay: float = 0.0
    mode: str = "ok"            # ok | http500 | malformed | cut | nousage | hang | error
    fail_every: int = 0         # with mode: only every n-th request misbehaves (1-based count)
    metrics: bool = True
    metrics_extra: int = 0      # lie in /metrics by this many tokens per request
    requests: int = 0
    inflight: int = 0
    max_inflight: int = 0
    auth: list = field(default_factory=list)
    bodies: list = field(default_factory=list)
    generated: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _mode(self) -> str:
        if self.fail_every and self.requests % self.fail_every:
            return "ok"
        return self.mode

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        self.auth.append(request.headers.get("Authorization"))
        self.bodies.append(body)
        mode = self._mode()
        if mode == "http500":
            return web.Response(status=500, text="boom:\n  internal   error " + "x" * 500)
        if mode == "hang":
            await asyncio.sleep(3600)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = body["max_tokens"]
            chat = "messages" in body
            for i in range(n):
                if mode == "cut" and i == 2:
                    return resp
                if mode == "malformed" and i == 1:
                    await resp.write(b"data: this is not json\n\n")
                    continue
                if mode == "error" and i == 1:
                    await resp.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
                    return resp
                if chat:
                    choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": f"w{i} ", "finish_reason": None}
                await resp.write(b"data: " + json.dumps({"choices": [choice], "usage": None}).encode() + b"\n\n")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            prompt = len(body["prompt"]) if "prompt" in body else 5
            self.generated += n + self.metrics_extra
            if mode != "nousage":
                usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
                await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.inflight -= 1

    async def prom(self, request: web.Request) -> web.Response:
        if not self.metrics:
            raise web.HTTPNotFound()
        text = (
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {self.generated // 2}.0\n'
            f'vllm:generation_tokens_total{{engine="1",model_name="m"}} {self.generated - self.generated // 2}.0\n'
            "vllm:generation_tokens_created 1.7e9\n"
        )
        return web.Response(text=text)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})


@pytest.fixture
def serve():
    """serve(FakeServer(...)) runs it on a background loop; all stop at teardown."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners = []

    def start(server: FakeServer) -> FakeServer:
        async def up():
            app = web.Application()
            app.router.add_post("/v1/completions", server.completions)
            app.router.add_post("/v1/chat/completions", server.completions)
            app.router.add_get("/metrics", server.prom)
            app.router.add_get("/v1/models", server.models)
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server.port = site._server.sockets[0].getsockname()[1]
            runners.append(runner)
        asyncio.run_coroutine_threadsafe(up(), loop).result(10)
        return server

    yield start

    async def down():
        for r in runners:
            await r.cleanup()
    try:
        asyncio.run_coroutine_threadsafe(down(), loop).result(10)
    except Exception:
        pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- end to end ---

def test_metrics_from_known_timings(serve):
    srv = serve(FakeServer(token_delay=0.02))
    wl = make_workload(output_tokens=10, min_requests=4)
    m = run_level([srv.url], "m", wl, 2)
    assert (m.requests, m.ok, m.failed, m.errors) == (4, 4, 0, {})
    assert m.output_tokens == 40
    assert m.prompt_tokens == 4 * 16
    assert 15 <= m.tpot_ms.mean <= 80       # 20 ms per token, loose
    assert m.itl_ms.n == 4 * 9
    assert m.e2el_ms.min >= 9 * 20 * 0.9
    assert m.ttft_ms.n == m.tpot_ms.n == m.e2el_ms.n == 4
    assert m.duration_s > 0
    assert m.output_tok_s == pytest.approx(40 / m.duration_s)
    assert m.total_tok_s == pytest.approx((40 + 64) / m.duration_s)
    assert m.request_tok_s == pytest.approx(4 / m.duration_s)
    assert m.queue_ms.n == 4
    assert m.loop_lag_ms.n > 0
    assert m.client_cpu_s > 0
    body = srv.bodies[0]
    assert body["model"] == "m" and body["max_tokens"] == 10 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert len(body["prompt"]) == 16
    assert all(TOKEN_ID_MIN <= t <= TOKEN_ID_MAX for b in srv.bodies for t in b["prompt"])


def test_steady_throughput_present(serve):
    srv = serve(FakeServer(token_delay=0.01))
    m = run_level([srv.url], "m", make_workload(output_tokens=20, min_requests=8), 2)
    assert m.steady_output_tok_s is not None and m.steady_output_tok_s > 0
    assert m.steady_window_s is not None and 0 < m.steady_window_s <= m.duration_s


def test_http_errors_counted_apart(serve):
    srv = serve(FakeServer(mode="http500", fail_every=2))
    m = run_level([srv.url], "m", make_workload(output_tokens=5, min_requests=8), 2)
    assert m.requests == 8 and m.ok == 4 and m.failed == 4
    assert m.error_rate == 0.5
    [(reason, count)] = m.errors.items()
    assert count == 4
    assert reason.startswith("HTTP 500: boom: internal error xxx")
    assert len(reason) <= len("HTTP 500: ") + 200
    assert m.output_tokens == 4 * 5          # failures never count toward throughput
    assert m.ttft_ms.n == 4


def test_connection_refused():
    m = run_level([f"http://127.0.0.1:{closed_port()}"], "m", make_workload(), 2)
    assert m.errors == {"connection refused": 4}
    assert m.ok == 0 and m.output_tok_s == 0


def test_least_outstanding_across_endpoints(serve):
    fast = serve(FakeServer(token_delay=0.001))
    slow = serve(FakeServer(token_delay=0.05))
    m = run_level([fast.url, slow.url], "m", make_workload(output_tokens=10, min_requests=24), 2)
    assert m.ok == 24
    assert fast.requests + slow.requests == 24
    # The slow server holds its slot ~0.5 s; meanwhile the fast one takes the rest.
    assert fast.requests > 2 * slow.requests
    assert slow.max_inflight == 1


def test_least_outstanding_ties_round_robin():
    lor = LeastOutstanding(3)
    assert [lor.acquire() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    lor.release(1)
    assert lor.acquire() == 1
    lor.release(2)
    lor.release(0)
    assert lor.acquire() == 2   # both 0 and 2 have one fewer; round robin resumes after 1
    assert lor.acquire() == 0


def test_warmup_excluded(serve):
    srv = serve(FakeServer())
    m = run_level([srv.url], "m", make_workload(warmup_requests=3, min_requests=4), 2)
    assert srv.requests == 7
    assert m.requests == 4 and m.warmup_requests == 3
    assert m.output_tokens == 4 * 8
    # Warm-up prompts differ from measured ones.
    firsts = [b["prompt"][0] for b in srv.bodies]
    assert len(set(firsts)) == 7


def test_worker_sharding_merges_exactly(serve):
    a = serve(FakeServer(token_delay=0.002))
    b = serve(FakeServer(token_delay=0.002))
    wl = make_workload(output_tokens=6, min_requests=24)
    m = run_level([a.url, b.url], "m", wl, 6, workers=2)
    assert m.workers == 2 and len(m.worker_cpu_util) == 2
    assert m.requests == 24 and m.ok == 24
    assert a.requests + b.requests == 24
    assert m.output_tokens == 24 * 6
    assert m.ttft_ms.n == 24 and m.itl_ms.n == 24 * 5
    assert m.server_tokens_match is True
    assert m.duration_s < 30


def test_request_timeout_on_hanging_server(serve):
    srv = serve(FakeServer(mode="hang"))
    t = time.monotonic()
    m = run_level([srv.url], "m", make_workload(request_timeout_s=0.5, min_requests=2), 2)
    assert time.monotonic() - t < 20
    assert m.errors == {"timeout: not done within 0.5 s": 2} and m.ok == 0


def test_level_timeout_cancels_in_flight(serve):
    srv = serve(FakeServer(mode="hang"))
    t = time.monotonic()
    m = run_level([srv.url], "m", make_workload(request_timeout_s=600, min_requests=6), 3, level_timeout_s=1.0)
    assert time.monotonic() - t < 20
    assert m.timed_out is True
    assert m.errors == {LEVEL_TIMEOUT_REASON: 3}   # the three in flight; the rest were never sent
    assert m.requests == 3


def test_server_metrics_cross_check(serve):
    srv = serve(FakeServer())
    m = run_level([srv.url], "m", make_workload(warmup_requests=2), 2)
    assert m.server_output_tokens == 4 * 8       # warm-up excluded by the brackets
    assert m.server_tokens_match is True

    liar = serve(FakeServer(metrics_extra=1))
    m = run_level([liar.url], "m", make_workload(), 2)
    assert m.server_output_tokens == 4 * 9
    assert m.server_tokens_match is False

    blind = serve(FakeServer(metrics=False))
    m = run_level([blind.url], "m", make_workload(), 2)
    assert m.server_output_tokens is None and m.server_tokens_match is None

    flaky = serve(FakeServer(mode="http500", fail_every=2))
    m = run_level([flaky.url], "m", make_workload(), 2)
    assert m.server_tokens_match is None        # failures: no fair comparison


def test_api_key_header(serve):
    srv = serve(FakeServer())
    run_level([srv.url], "m", make_workload(), 1, api_key="sekrit")
    assert srv.auth and all(a == "Bearer sekrit" for a in srv.auth)
    other = serve(FakeServer())
    run_level([other.url], "m", make_workload(), 1)
    assert all(a is None for a in other.auth)


def test_chat_api(serve):
    srv = serve(FakeServer())
    m = run_level([srv.url + "/"], "m", make_workload(api="chat", input_tokens=20), 2)
    assert m.ok == 4 and m.output_tokens == 32
    msg = srv.bodies[0]["messages"][0]
    assert msg["role"] == "user" and len(msg["content"].split()) >= 18


def test_duration_mode(serve):
    srv = serve(FakeServer(token_delay=0.01))
    m = run_level([srv.url], "m", make_workload(duration_s=1.0, output_tokens=5), 2)
    assert m.ok >= 2 and m.failed == 0
    assert m.duration_s < 10


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (([], "m", None, 1), {}),
        ((["127.0.0.1:1"], "m", None, 1), {}),
        ((["http://h/v1"], "m", None, 1), {}),
        ((["http://h"], "m", None, 0), {}),
        ((["http://h"], "", None, 1), {}),
        ((["http://h"], "m", None, 1), {"workers": 0}),
        ((["http://h"], "m", None, 1), {"level_timeout_s": -1}),
        ((["http://h"], "m", "not a workload", 1), {}),
    ],
)
def test_misuse_raises_load_error(args, kwargs):
    endpoints, model, wl, c = args
    with pytest.raises(LoadError):
        run_level(endpoints, model, make_workload() if wl is None else wl, c, **kwargs)


def test_metrics_json_round_trip(serve):
    srv = serve(FakeServer(mode="http500", fail_every=2))
    m = run_level([srv.url], "m", make_workload(), 2)
    back = LevelMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    assert isinstance(back.ttft_ms, Percentiles)


# --- pure functions ---

def test_percentiles_match_numpy_linear():
    data = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(data, 50) == 3.0
    assert percentile(data, 90) == pytest.approx(7.6)
    assert percentile(data, 99) == pytest.approx(9.76)
    assert percentile([5.0], 99) == 5.0
    p = Percentiles.of([3.0, 1.0, 2.0])
    assert (p.mean, p.p50, p.min, p.max, p.n) == (2.0, 2.0, 1.0, 3.0, 3)
    assert Percentiles.of([]).n == 0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_tpot_itl_math():
    chunks = [0.1, 0.15, 0.2, 0.3]
    assert tpot(0.0, chunks, 4) == pytest.approx(0.2 / 3)
    assert tpot(0.0, chunks, 8) == pytest.approx(0.2 / 7)  # several tokens per chunk
    assert tpot(0.0, [0.1], 1) is None
    assert itls(chunks) == pytest.approx([0.05, 0.05, 0.1])
    rec = RequestRecord(0, "e", 0, slot_free=-0.01, sent=0.0, end=0.31, ok=True,
                        chunk_times=chunks, output_tokens=4, prompt_tokens=3)
    assert rec.ttft == pytest.approx(0.1) and rec.e2el == pytest.approx(0.3)
    assert RequestRecord.from_dict(rec.to_dict()) == rec


def test_compute_level_metrics_exact():
    recs = [
        RequestRecord(0, "e", 0, 0.0, 0.0, 1.0, True, None, [0.1, 0.5, 0.9], 3, 10),
        RequestRecord(1, "e", 0, 0.0, 0.0, 2.0, True, None, [0.2, 1.0, 1.8], 3, 10),
        RequestRecord(2, "e", 0, 1.0, 1.002, 1.5, False, "HTTP 500: x"),
    ]
    m = compute_level_metrics(recs, 2, self_measurements=[SelfMeasurement(0, 0.1, 2.0, [0.5, 1.0])])
    assert (m.requests, m.ok, m.failed, m.errors) == (3, 2, 1, {"HTTP 500: x": 1})
    assert m.duration_s == 2.0 and m.output_tokens == 6 and m.output_tok_s == 3.0
    assert m.total_tok_s == 13.0
    assert m.ttft_ms.mean == pytest.approx(150.0)
    assert m.tpot_ms.mean == pytest.approx((400.0 + 800.0) / 2)
    assert m.itl_ms.n == 4 and m.e2el_ms.max == pytest.approx(1800.0)
    assert m.queue_ms.max == pytest.approx(2.0)
    assert m.client_cpu_util == pytest.approx(0.05)
    assert m.client_bound is False


def test_client_bound_judgement():
    # The two ramp requests are late by construction (all due at once); only refills are judged.
    recs = [RequestRecord(i, "e", 0, 0.0, 0.05 * (i >= 2), 1.0, True, None, [0.5], 1, 1, ramp=i < 2)
            for i in range(6)]
    m = compute_level_metrics(recs, 2, self_measurements=[SelfMeasurement(0, 0.95, 1.0, [0.1] * 10)])
    assert m.client_bound is True
    assert "dispatch lag" in m.client_bound_reason and "CPU" in m.client_bound_reason
    m = compute_level_metrics(recs[:2], 2, self_measurements=[SelfMeasurement(0, 0.1, 1.0, [50.0] * 10)])
    assert m.client_bound and "event-loop lag" in m.client_bound_reason
    assert "machine overloaded" in m.client_bound_reason
    ramp_only = [RequestRecord(i, "e", 0, 0.0, 0.05, 1.0, True, None, [0.5], 1, 1, ramp=True) for i in range(2)]
    assert compute_level_metrics(ramp_only, 2).client_bound is False


def test_steady_window_and_token_spread():
    # c=2: sends at 0, 0.1 (ramp), refill at 1.0; completions 1.0, 1.5, 2.0
    recs = [
        RequestRecord(0, "e", 0, 0, 0.0, 1.0, True, None, [0.5, 1.0], 4),
        RequestRecord(1, "e", 0, 0, 0.1, 1.5, True, None, [0.6, 1.5], 2),
        RequestRecord(2, "e", 0, 1.0, 1.0, 2.0, True, None, [1.2, 2.0], 2),
    ]
    assert steady_window(recs, 2) == (0.1, 1.5)
    assert tokens_in_window(recs[0], 0.1, 1.5) == 4.0
    assert tokens_in_window(recs[2], 0.1, 1.5) == 1.0
    assert steady_window(recs, 4) is None
    m = compute_level_metrics(recs, 2)
    assert m.steady_output_tok_s == pytest.approx((4 + 2 + 1) / 1.4)


def test_sse_parser():
    p = SSEParser()
    p.feed(b'data: {"choices":[{"text":""}]}\n\ndata: {"choices":[{"te', 1.0)
    p.feed(b'xt":"a"}]}\n\n: keepalive\n\ndata: {"choices":[{"text": "b"}],"usage":null}\r\n\r\n', 2.0)
    p.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3}}\n\ndata: [DONE]\n\n', 3.0)
    p.finish()
    # a token whose text is empty (a special token, half a UTF-8 character) still counts,
    # as in vLLM's own benchmark
    assert p.chunk_times == [1.0, 2.0, 2.0]
    assert p.usage["completion_tokens"] == 3
    # escaped quotes inside generated text are not keys; a chat role delta is no token
    q = SSEParser()
    q.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""},"x":"\\"text\\":\\"y"}]}\n\n', 1.0)
    assert q.chunk_times == []
    for bad, reason in [
        (b"data: nope\n\n", "malformed SSE: nope"),
    ]:
        with pytest.raises(StreamError, match=reason):
            SSEParser().feed(bad, 0.0)
    r = SSEParser()
    r.feed(b'data: {"choices":[{"text":"a"}]}\n\n', 0.0)
    with pytest.raises(StreamError, match=r"stream ended before \[DONE\]"):
        r.finish()


def test_prompts_deterministic_and_distinct():
    wl = make_workload(input_tokens=50, seed=7)
    f1, f2 = RequestFactory(wl, "m"), RequestFactory(wl, "m")
    assert f1.body(3) == f2.body(3)
    assert f1.prompt_ids(3) != f1.prompt_ids(4)
    assert RequestFactory(make_workload(input_tokens=50, seed=8), "m").body(3) != f1.body(3)


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("n", [1, 2, 7, 128])
def test_fast_body_matches_json_dumps(api, n):
    f = RequestFactory(make_workload(api=api, input_tokens=n, seed=3), "m")
    for i in [*range(300), 1 << 40, (1 << 40) + 5, 1 << 33]:
        assert f.body(i) == f.body_json(i)
    assert json.loads(f.body(5))["max_tokens"] == 8


def test_parse_generation_tokens():
    text = (
        '# HELP vllm:generation_tokens_total x\n'
        'vllm:generation_tokens_total{engine="0"} 10.0\n'
        'vllm:generation_tokens_total{engine="1"} 5\n'
        'vllm:generation_tokens_created{engine="0"} 1.7e9\n'
        'vllm:generation_tokens_totalx 99\n'
    )
    assert parse_generation_tokens(text) == 15.0
    assert parse_generation_tokens("other 1\n") is None
