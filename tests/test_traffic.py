"""Traffic shapes in the catalog and the request factory: lengths, datasets, prefixes, sessions."""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path

import pytest

from pytest_mm27.catalog.datasets import read_dataset
from pytest_mm27.catalog.lengths import Lengths
from pytest_mm27.catalog.workload import parse_workload
from pytest_mm27.errors import ConfigError, LoadError
from pytest_mm27.loadgen.prompts import Prepared, RequestFactory, needs_server
from pytest_mm27.loadgen.tokenize import WordPool

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "fixtures" / "datasets"

HEAD = """
name = "w"
measure = "count"
requests_per_concurrency = 1
"""


def workload(tmp_path: Path, body: str, name: str = "w.toml"):
    path = tmp_path / "workloads" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD + textwrap.dedent(body))
    return parse_workload(path)


# --- lengths ---

def test_fixed_lengths_stay_plain_numbers(tmp_path):
    w = workload(tmp_path, "input_tokens = 100\noutput_tokens = 20\n")
    assert w.input_lengths is None and not w.shaped
    assert [w.input_for(i) for i in range(3)] == [100, 100, 100]


@pytest.mark.parametrize("spec, mean, sd", [
    ('{ dist = "uniform", min = 10, max = 30 }', 20, 5.77),
    ('{ dist = "normal", mean = 200, stddev = 40, min = 1, max = 1000 }', 200, 40),
    ('{ dist = "lognormal", mean = 200, stddev = 100, min = 1, max = 100000 }', 200, 100),
])
def test_distributions_have_their_moments(tmp_path, spec, mean, sd):
    w = workload(tmp_path, f"input_tokens = {spec}\noutput_tokens = {spec}\n")
    xs = [w.input_for(i) for i in range(20000)]
    ys = [w.output_for(i) for i in range(20000)]
    assert statistics.fmean(xs) == pytest.approx(mean, rel=0.03)
    assert statistics.stdev(xs) == pytest.approx(sd, rel=0.06)
    assert xs != ys                          # input and output are drawn independently
    assert xs == [w.input_for(i) for i in range(20000)]     # and deterministically
    assert w.input_tokens == mean and w.shaped


def test_bounds_truncate_without_piling_up(tmp_path):
    w = workload(tmp_path, 'input_tokens = { dist = "normal", mean = 100, stddev = 100, min = 80, max = 120 }\n'
                           'output_tokens = 4\n')
    xs = [w.input_for(i) for i in range(20000)]
    assert min(xs) == 80 and max(xs) == 120
    # Truncation, not clamping: the bounds hold about as much as any other value.
    assert xs.count(80) < 2 * len(xs) / 41 and xs.count(120) < 2 * len(xs) / 41
    wl = workload(tmp_path, 'input_tokens = { dist = "lognormal", mean = 50, stddev = 200, min = 10, max = 60 }\n'
                            'output_tokens = 4\n', name="l.toml")
    assert {wl.input_for(i) for i in range(5000)} <= set(range(10, 61))


@pytest.mark.parametrize("spec, message", [
    ('{ dist = "zipf", max = 3 }', "field 'input_tokens.dist': must be one of"),
    ('{ dist = "uniform", min = 30, max = 10 }', "field 'input_tokens.min': 30 is above max 10"),
    ('{ dist = "normal", mean = 5, stddev = 1, min = 10, max = 20 }', "field 'input_tokens.mean'"),
    ('{ dist = "normal", mean = 15, min = 10, max = 20 }', "field 'input_tokens.stddev': is required"),
    ('{ dist = "uniform", min = 1, max = 9, mean = 4 }', "field 'input_tokens.mean': unknown key"),
    ('"long"', "field 'input_tokens': must be an integer, or a table"),
])
def test_bad_lengths_name_the_field(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        workload(tmp_path, f"input_tokens = {spec}\noutput_tokens = 4\n")
    assert "w.toml" in str(info.value)


def test_a_fixed_override_replaces_the_distribution(tmp_path):
    w = workload(tmp_path, 'input_tokens = { dist = "uniform", min = 10, max = 30 }\noutput_tokens = 4\n')
    v = w.variant(input_tokens=64)
    assert v.input_lengths is None and v.input_for(7) == 64 and v.name == "w[input_tokens=64]"
    assert w.to_dict()["input_lengths"] == {"dist": "uniform", "min": 10, "max": 30}


# --- datasets ---

def test_shipped_samples_read():
    share = read_dataset(DATASETS / "sharegpt-sample.json", "sharegpt")
    assert len(share.rows) == 24 and share.skipped == 1
    assert all(r.reply and r.output_tokens is None for r in share.rows)
    assert share.rows[0].line == 2 and share.rows[7].line == 10      # the single-turn row on line 9 is skipped
    plain = read_dataset(DATASETS / "prompts-sample.jsonl", "jsonl")
    assert len(plain.rows) == 24 and all(r.output_tokens in (16, 32, 64, 128) for r in plain.rows)


@pytest.mark.parametrize("fmt, text, line, message", [
    ("jsonl", '{"prompt": "a", "output_tokens": 4}\n{"prompt": "b", "output_tokens": 0}\n', 2,
     "'output_tokens' must be a positive integer"),
    ("jsonl", '{"prompt": "a", "output_tokens": 4}\n\n{"prompt": "b", "output_tokens": 4\n', 3, "not valid JSON"),
    ("jsonl", '{"prompt": "a", "output_tokens": 4, "extra": 1}\n', 1, "unknown key 'extra'"),
    ("jsonl", '["a", 4]\n', 1, "a row must be an object"),
    ("sharegpt", '[\n  {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n'
                 '  {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "yo"}]}\n]\n', 3,
     "conversations\\[0\\] needs string 'from' and 'value'"),
    ("sharegpt", '[\n {"conversations": []},\n {"id": 1}\n]', 3, "a ShareGPT row must be an object with a 'conversations' array"),
    ("sharegpt", '{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}\n', 1,
     "expected a human turn then a model reply"),
    ("sharegpt", '[\n {"conversations": []},\n {"conversations": [}\n]', 3, "not valid JSON"),
])
def test_a_malformed_row_names_file_and_line(tmp_path, fmt, text, line, message):
    path = tmp_path / "data.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: line {line}: {message}"):
        read_dataset(path, fmt)


def test_dataset_workload_is_checked_when_loaded(tmp_path):
    bad = tmp_path / "datasets" / "bad.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"prompt": "a", "output_tokens": 4}\n{"prompt": ""}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 2: 'prompt' must be a non-empty string"):
        workload(tmp_path, '[dataset]\npath = "datasets/bad.jsonl"\n')
    with pytest.raises(ConfigError, match="field 'dataset.path': no such file"):
        workload(tmp_path, '[dataset]\npath = "datasets/none.jsonl"\n')
    with pytest.raises(ConfigError, match="field 'input_tokens': a dataset workload takes its prompts"):
        workload(tmp_path, f'input_tokens = 5\n[dataset]\npath = "{DATASETS / "prompts-sample.jsonl"}"\n')


def test_dataset_workload_lengths(tmp_path):
    w = workload(tmp_path, f'[dataset]\npath = "{DATASETS / "prompts-sample.jsonl"}"\n')
    assert w.dataset.format == "jsonl" and not needs_server(w)
    f = RequestFactory(w, "m")
    rows = w.dataset.rows
    bodies = [json.loads(f.body(i)) for i in range(len(rows) + 1)]
    assert [b["prompt"] for b in bodies[:3]] == [r.prompt for r in rows[:3]]
    assert [b["max_tokens"] for b in bodies[:-1]] == [r.output_tokens for r in rows]
    assert bodies[-1]["prompt"] == "(1) " + rows[0].prompt   # the dataset cycles, repeats tagged
    fixed = workload(tmp_path, f'output_tokens = 7\n[dataset]\npath = "{DATASETS / "sharegpt-sample.json"}"\n',
                     name="s.toml")
    assert not needs_server(fixed) and {json.loads(RequestFactory(fixed, "m").body(i))["max_tokens"]
                                        for i in range(5)} == {7}
    share = workload(tmp_path, f'[dataset]\npath = "{DATASETS / "sharegpt-sample.json"}"\n', name="t.toml")
    assert share.dataset.format == "sharegpt" and needs_server(share)
    with pytest.raises(LoadError, match="needs the server's /tokenize first"):
        RequestFactory(share, "m")
    outs = tuple(range(1, 25))
    assert json.loads(RequestFactory(share, "m", Prepared(dataset_outputs=outs)).body(3))["max_tokens"] == 4
    assert share.to_dict()["dataset"] == {"path": str(DATASETS / "sharegpt-sample.json"), "format": "sharegpt",
                                          "rows": 24, "skipped": 1}


# --- prefixes and sessions ---

def test_completion_prefixes_are_shared_ids(tmp_path):
    w = workload(tmp_path, 'input_tokens = { dist = "uniform", min = 8, max = 40 }\noutput_tokens = 4\n'
                           '[prefix]\ncount = 3\ntokens = 64\n')
    f = RequestFactory(w, "m")
    prompts = [json.loads(f.body(i))["prompt"] for i in range(60)]
    assert [len(p) for p in prompts] == [64 + w.input_for(i) for i in range(60)]
    heads = {tuple(p[:64]) for p in prompts}
    assert len(heads) == 3                                   # K distinct prefixes, each used
    assert len({tuple(p[64:65]) for p in prompts}) == 60     # what follows is each request's own
    assert f.body(5) == f.body_json(5)


def test_chat_prefix_and_exact_lengths_from_a_pool(tmp_path):
    w = workload(tmp_path, 'api = "chat"\ninput_tokens = { dist = "uniform", min = 20, max = 30 }\n'
                           'output_tokens = 4\n[prefix]\ncount = 2\ntokens = 50\n')
    assert needs_server(w)
    pool = WordPool("the", tuple("of and to in is was for on are with as by at from".split()), chat_overhead=0)
    f = RequestFactory(w, "m", Prepared(pool=pool))
    for i in range(30):
        system, user = json.loads(f.body(i))["messages"]
        assert len(system["content"].split()) == 50 and len(user["content"].split()) == w.input_for(i)
    users = {json.loads(f.body(i))["messages"][1]["content"].split()[1:pool.salt_len + 1].__repr__()
             for i in range(500)}
    assert len(users) == 500                                 # every request's text is its own


def test_sessions_need_chat_and_count(tmp_path):
    with pytest.raises(ConfigError, match='field \'sessions\': multi-turn sessions need api = "chat"'):
        workload(tmp_path, "input_tokens = 5\noutput_tokens = 4\n[sessions]\nturns = 3\n")
    w = workload(tmp_path, 'api = "chat"\ninput_tokens = 5\noutput_tokens = 4\n[sessions]\nturns = 3\n'
                           'think_time_s = 0.25\n')
    assert w.sessions.turns == 3 and w.sessions.think_time_s == 0.25 and w.shaped
    with pytest.raises(ConfigError, match="field 'duration_s': a level of sessions sends whole sessions"):
        workload(tmp_path, 'api = "chat"\ninput_tokens = 5\noutput_tokens = 4\nduration_s = 3\n[sessions]\nturns = 2\n')
    steady = tmp_path / "steady.toml"
    steady.write_text('api = "chat"\ninput_tokens = 5\noutput_tokens = 4\n[sessions]\nturns = 2\n')
    with pytest.raises(ConfigError, match="field 'sessions': multi-turn sessions are measured by count"):
        parse_workload(steady)
    with pytest.raises(ConfigError, match="field 'sessions.turns': must be at least 1"):
        workload(tmp_path, 'api = "chat"\ninput_tokens = 5\noutput_tokens = 4\n[sessions]\nturns = 0\n')


def test_lengths_draw_depends_on_seed_and_index_only():
    d = Lengths("lognormal", 300.0, 150.0, 10, 4000)
    assert [d.draw(0, 1, i) for i in range(50)] == [d.draw(0, 1, i) for i in range(50)]
    assert [d.draw(0, 1, i) for i in range(50)] != [d.draw(1, 1, i) for i in range(50)]
    assert 10 <= d.draw(0, 1, 1 << 40) <= 4000


def test_a_bad_dataset_stops_the_run_before_anything_boots(no_leftovers):
    pytester = no_leftovers
    data = pytester.path / "fixtures" / "datasets" / "chats.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"prompt": "hello", "output_tokens": 8}\n{"prompt": "hi", "output_tokens": "eight"}\n')
    wl = pytester.path / "fixtures" / "workloads" / "mine.toml"
    wl.parent.mkdir(parents=True)
    wl.write_text('measure = "count"\nrequests_per_concurrency = 1\n[dataset]\npath = "datasets/chats.jsonl"\n')
    pytester.makepyfile(test_it="def test_level(mm27_level):\n    mm27_level.measure()\n")
    result = pytester.runpytest_subprocess("--topology", "dp2", "--workload", "mine", "--engine", "sim",
                                           "--results-dir", "results", timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"*{data}: line 2: 'output_tokens' must be a positive integer, got 'eight'*"])
    assert not list(pytester.path.glob("results/runs/*")), "a run started"


def test_terminal_table_shows_prefix_hits_only_when_there_were_some():
    from pytest_mm27.report.terminal import record_table
    from test_terminal_table import RECORD, level
    cold, warm = level(1, 90.0), level(4, 300.0)
    for lv, hits in ((cold, 0), (warm, 700)):
        lv["metrics"].update(prefix_cache_queries=1000, prefix_cache_hits=hits, prefix_cache_hit_rate=hits / 1000)
    lines = record_table({**RECORD, "levels": [cold, warm]})
    assert "prefix hits" in lines[1]
    assert next(ln for ln in lines if ln.split()[:1] == ["4"]).rstrip().endswith("70.0 %  pass")
    assert next(ln for ln in lines if ln.split()[:1] == ["1"]).rstrip().endswith("0.0 %  pass")
    warm["metrics"].update(prefix_cache_hits=0, prefix_cache_hit_rate=0.0)
    assert "prefix hits" not in record_table({**RECORD, "levels": [cold, warm]})[1]
