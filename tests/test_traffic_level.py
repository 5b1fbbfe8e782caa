"""Shaped traffic end to end on the simulator: run_level against a real simulator process."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_mm27.catalog.datasets import read_dataset
from pytest_mm27.catalog.lengths import Lengths
from pytest_mm27.catalog.traffic import PrefixSpec, SessionSpec
from pytest_mm27.loadgen import run_level
from pytest_mm27.loadgen.prompts import Prepared, RequestFactory, prepare
from pytest_mm27.loadgen.sessions import TextParser
from pytest_mm27.loadgen.tokenize import ServerTokenizer, word_pool
from test_loadgen import make_workload
from test_sim_server import MODEL, sim_factory  # noqa: F401  (fixture)

DATASETS = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"


@pytest.fixture
def sim(sim_factory):  # noqa: F811
    return sim_factory()


def test_prefix_hit_rate_is_reported(sim):
    w = make_workload(input_tokens=32, output_tokens=4, min_requests=24,
                      input_lengths=Lengths("uniform", 32, 0, 16, 48), prefix=PrefixSpec(count=3, tokens=128))
    m = run_level([sim.url], MODEL, w, 1)
    assert m.ok == 24 and m.failed == 0
    lengths = [128 + w.input_for(i) for i in range(24)]
    used = {w.prefix.which(w.seed, i) for i in range(24)}
    # One request at a time: each prefix misses once, then all 128 of its tokens (8 blocks) hit.
    assert m.prompt_tokens == sum(lengths) == m.prefix_cache_queries
    assert m.prefix_cache_hits == (24 - len(used)) * 128
    assert m.prefix_cache_hit_rate == pytest.approx(m.prefix_cache_hits / m.prefix_cache_queries)


def test_no_prefix_no_hits(sim):
    m = run_level([sim.url], MODEL, make_workload(input_tokens=64, min_requests=8), 2)
    assert m.prefix_cache_hits == 0 and m.prefix_cache_hit_rate == 0.0 and m.prefix_cache_queries == 8 * 64


def test_chat_prompts_have_exact_lengths(sim):
    w = make_workload(api="chat", min_requests=12, input_lengths=Lengths("normal", 60, 20, 20, 100),
                      prefix=PrefixSpec(count=2, tokens=40))
    m = run_level([sim.url], MODEL, w, 3)
    assert m.ok == 12
    assert m.prompt_tokens == sum(40 + w.input_for(i) for i in range(12))     # the simulator's template adds none


def test_word_pool_checks_the_server_and_is_cached(sim):
    tok = ServerTokenizer(sim.url, MODEL)
    pool = word_pool(tok, chat=True, check_lengths=(5, 300))
    assert pool.chat_overhead == 0 and len(pool.words) > 100
    assert tok.count(pool.text(77, 4)) == 77
    calls = tok.calls
    word_pool(tok, chat=True)
    assert tok.calls == calls


def test_sharegpt_outputs_come_from_the_replies(sim):
    ds = read_dataset(DATASETS / "sharegpt-sample.json", "sharegpt")
    w = make_workload(api="chat", dataset=ds, min_requests=len(ds.rows), input_tokens=1, output_tokens=1)
    prepared = prepare(sim.url, MODEL, w)
    # The simulator's tokenizer counts words: a reply's length is its word count.
    assert prepared.dataset_outputs == tuple(len(r.reply.split()) for r in ds.rows)
    m = run_level([sim.url], MODEL, w, 4)
    assert m.ok == len(ds.rows) and m.output_tokens == sum(prepared.dataset_outputs)
    # Not the process's first level (prepare() above was): the prompts carry a "(N)" tag, one word.
    assert m.prompt_tokens == sum(len(r.prompt.split()) + 1 for r in ds.rows)


def test_jsonl_dataset_on_completions(sim):
    ds = read_dataset(DATASETS / "prompts-sample.jsonl", "jsonl")
    w = make_workload(dataset=ds, min_requests=30)
    m = run_level([sim.url], MODEL, w, 4)
    assert m.ok == 30 and m.output_tokens == sum(ds.rows[i % 24].output_tokens for i in range(30))


def test_sessions_grow_their_history(sim):
    w = make_workload(api="chat", input_tokens=20, output_tokens=10, min_requests=12, warmup_requests=2,
                      sessions=SessionSpec(turns=3, think_time_s=0.05), prefix=PrefixSpec(count=1, tokens=64))
    m = run_level([sim.url], MODEL, w, 2)
    assert m.ok == 12 and m.failed == 0                       # 4 sessions of 3 turns
    assert m.warmup_requests == 2                             # sent before, not counted
    # Turn t's prompt: system 64 + t earlier (20 user + 10 reply) + its own 20.
    assert m.prompt_tokens == 4 * sum(64 + t * 30 + 20 for t in range(3))
    # Later turns find the history in the cache (prefix, earlier turns and the replies).
    assert m.prefix_cache_hit_rate > 0.6
    assert m.queue_ms.p99 < 40                                 # the think time is no dispatch lag


def test_text_parser_keeps_the_reply():
    p = TextParser()
    p.feed(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\ndata: {"choices":'
           b'[{"index":0,"delta":{"content":" tok"}}]}\n\n', 1.0)
    p.feed(b'data: {"choices":[{"index":0,"delta":{"content":" more"}}]}\n\ndata: {"choices":[],"usage":'
           b'{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n', 2.0)
    p.finish()
    assert p.text() == " tok more" and p.chunk_times == [1.0, 2.0]


def test_factory_bodies_carry_per_request_lengths(sim):
    w = make_workload(output_lengths=Lengths("uniform", 8, 0, 2, 14))
    f = RequestFactory(w, MODEL)
    assert [json.loads(f.body(i))["max_tokens"] for i in range(40)] == [w.output_for(i) for i in range(40)]
    assert json.loads(f.body(3, max_tokens=5))["max_tokens"] == 5    # a steady level's override wins
    m = run_level([sim.url], MODEL, replace(w, min_requests=16), 4)
    assert m.output_tokens == sum(w.output_for(i) for i in range(16))


@pytest.mark.parametrize("block", [16, 128])
def test_prefix_benchmark_expectation_matches_the_simulator(tmp_path, block):
    from pytest_mm27.benchmarks.prefix_hitrate import SimServer, expected
    w = make_workload(input_tokens=40, output_tokens=4, min_requests=20,
                      input_lengths=Lengths("uniform", 40, 0, 16, 64), prefix=PrefixSpec(count=3, tokens=200))
    with SimServer(tmp_path / "sim.log", "--block-size", str(block)) as sim:
        rate = run_level([sim.url], "sim", w, 1).prefix_cache_hit_rate
    assert rate == pytest.approx(expected(w, 20, block))
    assert sim.proc.poll() is not None


def test_shaped_requests_are_the_same_from_worker_processes(sim):
    w = make_workload(api="chat", min_requests=16, input_lengths=Lengths("uniform", 30, 0, 10, 50),
                      output_lengths=Lengths("uniform", 6, 0, 2, 10), prefix=PrefixSpec(count=2, tokens=32))
    m = run_level([sim.url], MODEL, w, 4, workers=2)
    assert m.workers == 2 and m.ok == 16
    assert m.prompt_tokens == sum(32 + w.input_for(i) for i in range(16))
    assert m.output_tokens == sum(w.output_for(i) for i in range(16))


def test_a_later_level_does_not_resend_earlier_prompts(sim):
    plain = make_workload(input_tokens=64, min_requests=8)
    first = run_level([sim.url], MODEL, plain, 2)
    again = run_level([sim.url], MODEL, plain, 2)
    assert first.prefix_cache_hits == again.prefix_cache_hits == 0     # no cached prompts from the level before
    shared = make_workload(input_tokens=32, min_requests=8, prefix=PrefixSpec(count=1, tokens=128))
    run_level([sim.url], MODEL, shared, 1)
    warm = run_level([sim.url], MODEL, shared, 1)
    # The shared prefix stays warm across levels; each request's own tokens are new.
    assert warm.prefix_cache_hits == 8 * 128


def test_levels_shift_content_not_lengths():
    w = make_workload(input_lengths=Lengths("uniform", 30, 0, 10, 50), prefix=PrefixSpec(count=2, tokens=16))
    one, two = RequestFactory(w, MODEL, Prepared(level=0)), RequestFactory(w, MODEL, Prepared(level=1))
    for i in range(20):
        a, b = json.loads(one.body(i))["prompt"], json.loads(two.body(i))["prompt"]
        assert len(a) == len(b) and a[:16] == b[:16] and a[16:] != b[16:]
    plain = make_workload(input_tokens=40)
    f0, f1 = RequestFactory(plain, MODEL, Prepared(level=0)), RequestFactory(plain, MODEL, Prepared(level=1))
    assert f0.body(3) == RequestFactory(plain, MODEL).body(3) != f1.body(3)
    assert f1.body(3) == f1.body_json(3)
