"""The simulator's side of real traffic: its tokenizer endpoints and prefix caching."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request

import aiohttp
import pytest

from pytest_mm27.sim import toytok
from pytest_mm27.sim.cluster import setup_for
from pytest_mm27.sim.scheduler import EngineCore, Seq
from test_sim_server import MODEL, sim_factory  # noqa: F401  (fixture)

BS = 16


def engine(max_model_len: int = 4096, **changes) -> EngineCore:
    eng = setup_for("rtx-pro-6000", "minimax-m2.7-nvfp4", 2, 1, 64, 0.9, max_model_len).build_engines()[0]
    for k, v in changes.items():
        setattr(eng, k, v)
    return eng


def run(eng: EngineCore, until=None, now: float = 0.0) -> float:
    """Step the engine on a virtual clock until it is idle (or ``until()`` holds)."""
    while eng.has_work() and not (until and until()):
        plan = eng.schedule()
        assert plan is not None
        now += plan.duration
        eng.commit(plan, now)
        assert eng.free_blocks >= len(eng.cache.idle) if eng.cache else True
    return now


def seq(rid: int, tokens: list[int], out: int = 4) -> Seq:
    return Seq(rid, len(tokens), out, 0.0, tokens=list(tokens))


def test_toy_tokenizer_counts_words_and_round_trips():
    ids = toytok.tokenize("the  cat t4321 of\nthe")
    assert len(ids) == 5 and ids[0] == ids[4] and ids[2] == 4321
    assert toytok.detokenize(toytok.tokenize("the of t4321 and")) == "the of t4321 and"
    assert toytok.tokenize(toytok.detokenize([150, 4000, 31999])) == [150, 4000, 31999]
    assert min(toytok.tokenize("zebra quokka the")) >= toytok.FIRST_ID
    assert toytok.tokenize("zebra") == toytok.tokenize("zebra")      # stable, not hash()-randomised


def test_a_shared_prefix_is_a_hit_and_its_prefill_is_skipped():
    eng = engine()
    prefix = list(range(1000, 1256))                 # 16 full blocks
    eng.add(seq(1, prefix + list(range(5000, 5040))))
    run(eng)
    assert (eng.cache.queries, eng.cache.hits) == (296, 0)
    eng.add(seq(2, prefix + list(range(6000, 6040))))
    plan = eng.schedule()
    assert plan.counts == [40]                        # only the request's own tokens are computed
    eng.commit(plan, 1.0)
    run(eng, now=1.0)
    assert (eng.cache.queries, eng.cache.hits) == (592, 256)
    assert eng.free_blocks == eng.total_blocks        # everything given back (cached blocks count as free)


def test_an_identical_prompt_recomputes_its_last_token():
    eng = engine()
    prompt = list(range(2000, 2256))
    for rid in (1, 2):
        eng.add(seq(rid, prompt))
        run(eng)
    # 16 full blocks cached, but the last prompt token is always computed: 15 blocks hit.
    assert eng.cache.hits == 15 * BS


def test_different_first_token_no_hit():
    eng = engine()
    base = list(range(3000, 3300))
    for rid in range(4):
        eng.add(seq(rid, [rid + 10] + base[1:]))
        run(eng)
    assert eng.cache.hits == 0 and eng.cache.queries == 4 * 300


def test_concurrent_requests_share_the_prefix_kv():
    eng = engine()
    prefix = list(range(1000, 1512))                  # 32 blocks
    eng.add(seq(1, prefix + [7] * 8, out=64))
    run(eng, until=lambda: eng.running and eng.running[0].generated > 0)
    used_one = eng.total_blocks - eng.free_blocks
    eng.add(seq(2, prefix + [8] * 8, out=64))
    run(eng, until=lambda: len(eng.running) == 2 and eng.running[1].generated > 0)
    used_two = eng.total_blocks - eng.free_blocks
    assert eng.cache.hits == 32 * BS
    # The second request holds its own tail block(s) only, not another 32.
    assert used_two - used_one <= 2, (used_one, used_two)
    run(eng)
    assert eng.free_blocks == eng.total_blocks


def test_a_reply_stays_cached_for_the_next_turn():
    eng = engine()
    turn1 = list(range(1000, 1100))
    eng.add(seq(1, turn1, out=60))
    run(eng)
    turn2 = turn1 + [toytok.TOK_ID] * 60 + list(range(9000, 9030))
    eng.add(seq(2, turn2))
    run(eng)
    # 100 prompt + 59 reply tokens had KV: 9 full blocks of history are hits.
    assert eng.cache.hits == 9 * BS


def test_eviction_under_pressure_keeps_the_books_straight():
    eng = engine()
    eng.total_blocks = eng.free_blocks = 200          # a small pool: 3200 tokens
    rng = random.Random(1)
    prefixes = [[rng.randrange(100, 30000) for _ in range(320)] for _ in range(4)]
    for rid in range(40):
        p = prefixes[rid % 4] if rid % 3 else [rng.randrange(100, 30000) for _ in range(320)]
        eng.add(seq(rid, p + [rng.randrange(100, 30000) for _ in range(rng.randrange(1, 200))],
                    out=rng.randrange(1, 300)))
        if rid % 5 == 4:
            run(eng, until=lambda: len(eng.waiting) == 0)
        if rid == 17:
            eng.abort(eng.running[0])
    run(eng)
    assert eng.free_blocks == eng.total_blocks
    assert len(eng.cache.idle) <= eng.total_blocks
    assert 0 < eng.cache.hits < eng.cache.queries and eng.cache.evicted > 0
    assert all(v == 0 for v in eng.cache.refs.values())


def test_without_token_ids_nothing_is_cached():
    eng = engine()
    for rid in range(3):
        eng.add(Seq(rid, 256, 4, 0.0))
        run(eng)
    assert eng.cache.queries == 0 and eng.cache.hits == 0


# --- the HTTP side ---

def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))


def test_tokenize_and_detokenize_endpoints(sim_factory):
    sim = sim_factory()
    status, out = _post(sim.url, "/tokenize", {"model": MODEL, "prompt": "the of and zebra"})
    assert status == 200 and out["count"] == 4 and len(out["tokens"]) == 4 and out["max_model_len"] == 4096
    status, chat = _post(sim.url, "/tokenize", {"messages": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "the of and zebra"}]})
    assert status == 200 and chat["count"] == 6 and chat["tokens"][2:] == out["tokens"]
    status, back = _post(sim.url, "/detokenize", {"model": MODEL, "tokens": out["tokens"][:3]})
    assert status == 200 and back == {"prompt": "the of and"}
    assert _post(sim.url, "/tokenize", {"prompt": 5})[0] == 400
    assert _post(sim.url, "/tokenize", {"model": "other", "prompt": "x"})[0] == 404
    assert _post(sim.url, "/detokenize", {"tokens": [1, -2]})[0] == 400


async def _complete(url: str, prompt, chat: bool = False) -> dict:
    body = {"model": MODEL, "max_tokens": 4, "stream": False}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    async with aiohttp.ClientSession() as s:
        async with s.post(url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()


@pytest.mark.parametrize("caching", [True, False])
def test_metrics_report_prefix_cache_queries_and_hits(sim_factory, caching):
    sim = sim_factory(*([] if caching else ["--no-enable-prefix-caching"]))
    prefix = list(range(1000, 1256))
    for k in range(3):
        asyncio.run(_complete(sim.url, prefix + [5000 + k] * 40))
    text_prompt = " ".join(["the"] * 64)
    asyncio.run(_complete(sim.url, text_prompt + " of", chat=True))
    asyncio.run(_complete(sim.url, text_prompt + " and", chat=True))
    queries = _metric(sim.url, "vllm:prefix_cache_queries_total")
    hits = _metric(sim.url, "vllm:prefix_cache_hits_total")
    if caching:
        assert queries == 3 * 296 + 2 * 65
        assert hits == 2 * 256 + 64                   # text prompts hit through the toy tokenizer too
    else:
        assert hits == 0 and queries == 0
