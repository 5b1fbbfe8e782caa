"""Shaped traffic on the real engine: vLLM's CPU build serving the tiny generated model.

What only a real server can show: that its /tokenize is what exact-length
prompts are built from (the byte-level BPE of the tiny model, its chat
template), that vLLM's prefix-cache counters reach the level result, and
that multi-turn sessions run on its chat API. Skips without vLLM, as
test_vllm_real does (same lock: one vLLM at a time).
"""

from __future__ import annotations

import json
import shlex
import textwrap

import pytest

from pytest_mm27.catalog.workload import parse_workload
from test_vllm_real import one_vllm_at_a_time, vllm  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.xdist_group("vllm")]

WORKLOADS = {
    "tiny-prefix": """
        name = "tiny-prefix"
        measure = "count"
        min_requests = 12
        requests_per_concurrency = 1
        input_tokens = { dist = "uniform", min = 8, max = 40 }
        output_tokens = 4
        request_timeout_s = 120
        [prefix]
        count = 2
        tokens = 256
    """,
    "tiny-chat-lengths": """
        name = "tiny-chat-lengths"
        api = "chat"
        measure = "count"
        min_requests = 8
        requests_per_concurrency = 1
        input_tokens = { dist = "lognormal", mean = 60, stddev = 30, min = 10, max = 200 }
        output_tokens = 4
        request_timeout_s = 120
    """,
    "tiny-sessions": """
        name = "tiny-sessions"
        api = "chat"
        measure = "count"
        min_requests = 6
        requests_per_concurrency = 1
        input_tokens = 24
        output_tokens = 8
        request_timeout_s = 120
        [prefix]
        count = 1
        tokens = 128
        [sessions]
        turns = 3
        think_time_s = 0.1
    """,
}

SUITE = textwrap.dedent('''
    import json, urllib.request
    from pytest_mm27.loadgen.tokenize import ServerTokenizer, word_pool

    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return json.loads(opener.open(req, timeout=30).read())

    def keep(name, result, **extra):
        m = result.metrics
        with open(name + ".json", "w") as fh:
            json.dump({"ok": m.ok, "failed": m.failed, "prompt_tokens": m.prompt_tokens,
                       "output_tokens": m.output_tokens, "queries": m.prefix_cache_queries,
                       "hits": m.prefix_cache_hits, "rate": result.prefix_cache_hit_rate, **extra}, fh)

    def test_tokenize(mm27_topology):
        ep, model = mm27_topology.endpoints[0], mm27_topology.model
        out = post(ep + "/tokenize", {"model": model, "prompt": "the cat sat on the mat", "add_special_tokens": False})
        back = post(ep + "/detokenize", {"model": model, "tokens": out["tokens"]})
        tok = ServerTokenizer(ep, model)
        pool = word_pool(tok, chat=True, check_lengths=(10, 200))
        with open("tokenize.json", "w") as fh:
            json.dump({"count": out["count"], "back": back["prompt"], "words": len(pool.words),
                       "overhead": pool.chat_overhead, "exact": tok.count(pool.text(123, 9))}, fh)

    def test_prefix(mm27_topology):
        keep("prefix", mm27_topology.run(1, "tiny-prefix"))

    def test_chat_lengths(mm27_topology):
        r = mm27_topology.run(2, "tiny-chat-lengths")
        pool = word_pool(ServerTokenizer(mm27_topology.endpoints[0], mm27_topology.model), chat=True)
        keep("chat", r, overhead=pool.chat_overhead)

    def test_sessions(mm27_topology):
        keep("sessions", mm27_topology.run(2, "tiny-sessions"))
''')


def test_shaped_traffic_on_vllm(no_leftovers, one_vllm_at_a_time):  # noqa: F811
    pytester, command = no_leftovers, one_vllm_at_a_time
    loaded = {}
    for name, body in WORKLOADS.items():
        path = pytester.path / "fixtures" / "workloads" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
        loaded[name] = parse_workload(path)
    pytester.makepyfile(test_traffic=SUITE)
    result = pytester.runpytest_subprocess(
        "--engine", "vllm", f"--vllm={shlex.join(command)}", "--topology", "tiny-tp1", "--results-dir", "results",
        "-v", "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=4)
    read = lambda name: json.loads((pytester.path / f"{name}.json").read_text())  # noqa: E731

    tok = read("tokenize")
    assert tok["count"] >= 6 and tok["back"] == "the cat sat on the mat"
    assert tok["words"] >= 8 and tok["overhead"] > 0 and tok["exact"] == 123   # the template adds tokens

    w = loaded["tiny-prefix"]
    prefix = read("prefix")
    assert prefix["ok"] == 12 and prefix["failed"] == 0
    assert prefix["prompt_tokens"] == sum(256 + w.input_for(i) for i in range(12))
    assert prefix["queries"] == prefix["prompt_tokens"]
    # One at a time: after each prefix's first request, its 256 tokens are found cached.
    used = {w.prefix.which(w.seed, i) for i in range(12)}
    assert prefix["hits"] == (12 - len(used)) * 256, prefix
    assert prefix["rate"] == pytest.approx(prefix["hits"] / prefix["queries"])

    w = loaded["tiny-chat-lengths"]
    chat = read("chat")
    assert chat["ok"] == 8
    assert chat["prompt_tokens"] == sum(w.input_for(i) + chat["overhead"] for i in range(8))   # exact, per request

    sessions = read("sessions")
    assert sessions["ok"] == 6 and sessions["failed"] == 0
    assert sessions["hits"] > 0 and sessions["rate"] > 0.3, sessions
