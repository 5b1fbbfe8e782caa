"""Open-loop arrivals: schedules, the [arrival] table, trace files, and open-loop levels on the simulator.

No timing asserts: the schedule tests check the drawn offsets (pure
arithmetic); the simulator tests check what was sent, in what order, under
which cap, never how fast.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest

from pytest_mm27.catalog.arrivals import Arrival, DEFAULT_MAX_CONCURRENCY
from pytest_mm27.catalog.trace import parse_trace
from pytest_mm27.catalog.workload import parse_workload
from pytest_mm27.errors import ConfigError, LoadError
from pytest_mm27.loadgen import run_level
from pytest_mm27.loadgen.arrivals import rate_schedule, unit_gaps, warp
from pytest_mm27.loadgen.runner import open_dues

from sim_helpers import MODEL, sim  # noqa: F401  (fixture)
from test_loadgen import make_workload

REPO = Path(__file__).resolve().parent.parent


# --- schedules ---

def test_constant_schedule_is_evenly_spaced():
    times = rate_schedule(Arrival(kind="constant"), 5, 4.0, seed=0)
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_poisson_schedule_has_exponential_gaps_at_the_rate():
    times = rate_schedule(Arrival(kind="poisson"), 20001, 50.0, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    # exponential: the standard deviation equals the mean (coefficient of variation 1)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    assert times == rate_schedule(Arrival(kind="poisson"), 20001, 50.0, seed=3)     # same seed, same schedule
    assert times != rate_schedule(Arrival(kind="poisson"), 20001, 50.0, seed=4)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_burstiness_sets_the_spread_of_gaps(burstiness):
    gaps = unit_gaps("gamma", 40000, random.Random(1), burstiness)
    assert statistics.fmean(gaps) == pytest.approx(1.0, rel=0.04)
    # gamma of shape k: CV^2 = 1/k, so below 1 is burstier than Poisson, above 1 smoother
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_ramp_up_warps_time_linearly_rising_rate():
    rate, ramp = 10.0, 4.0
    # continuous at the knee (20 requests due during the ramp) and the plain rate after it
    assert warp(rate * ramp / 2, rate, ramp) == pytest.approx(ramp)
    assert warp(rate * ramp / 2 + 10, rate, ramp) == pytest.approx(ramp + 1.0)
    times = rate_schedule(Arrival(kind="constant", ramp_up_s=ramp), 61, rate, seed=0)
    in_ramp = sum(1 for t in times if t < ramp)
    assert in_ramp == 20            # u = 0..19 fall inside; the 21st is due at the knee exactly
    assert times[-1] == pytest.approx(ramp + (60 - 20) / rate)
    assert all(b > a for a, b in zip(times, times[1:]))


def test_an_open_level_needs_a_rate():
    with pytest.raises(LoadError, match="needs a rate"):
        open_dues(make_workload(arrival=Arrival(kind="poisson")))
    with pytest.raises(LoadError, match="positive rate"):
        rate_schedule(Arrival(kind="poisson"), 3, 0.0, seed=0)


# --- the [arrival] table ---

def _workload(tmp_path: Path, body: str, name: str = "w") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text('input_tokens = 32\noutput_tokens = 16\n' + body)
    return path


def test_arrival_table_parses_and_counts(tmp_path):
    wl = parse_workload(_workload(tmp_path, '[arrival]\nkind = "gamma"\nburstiness = 0.5\nrates = [8, 2, 4]\n'
                                             'max_concurrency = 32\nrequests = 40\nramp_up_s = 1.5\n'))
    a = wl.arrival
    assert (a.kind, a.burstiness, a.rates, a.cap, a.requests, a.ramp_up_s) == ("gamma", 0.5, (2.0, 4.0, 8.0), 32, 40, 1.5)
    assert wl.measure == "count"        # an open loop counts its scheduled requests
    assert wl.to_dict()["arrival"]["kind"] == "gamma"
    plain = parse_workload(_workload(tmp_path, '[arrival]\nkind = "poisson"\nrate = 5\nduration_s = 3\n', "p"))
    assert plain.arrival.requests_at(5.0) == 15 and plain.arrival.cap == DEFAULT_MAX_CONCURRENCY


@pytest.mark.parametrize("body, field, message", [
    ('[arrival]\nkind = "bursty"\n', "arrival.kind", "must be one of"),
    ('[arrival]\nkind = "poisson"\nrates = [2, 2]\n', "arrival.rates", "duplicate"),
    ('[arrival]\nkind = "poisson"\nrates = [2, -1]\n', "arrival.rates", "positive numbers"),
    ('[arrival]\nkind = "poisson"\nrate = 0\n', "arrival.rate", "greater than"),
    ('[arrival]\nkind = "poisson"\nrequests = 4\nduration_s = 2\n', "arrival.duration_s", "not both"),
    ('[arrival]\nkind = "constant"\nburstiness = 2\n', "arrival.burstiness", "unknown key"),
    ('[arrival]\nkind = "trace"\ntrace = "missing.jsonl"\n', "arrival.trace", "no such trace"),
    ('measure = "steady"\n[arrival]\nkind = "poisson"\nrate = 2\n', "measure", "open-loop"),
])
def test_bad_arrival_tables_name_the_field(tmp_path, body, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_workload(_workload(tmp_path, body))
    assert info.value.field == field and str(tmp_path) in str(info.value)


def test_rate_as_a_level_override_names_a_variant():
    wl = make_workload(arrival=Arrival(kind="poisson", rates=(2.0, 4.0)))
    level = wl.variant(rate=4.0)
    assert level.name == "t[rate=4]" and level.arrival.rate == 4.0 and level.arrival.kind == "poisson"
    with pytest.raises(ConfigError, match="needs an open-loop arrival"):
        make_workload().variant(rate=3.0)
    assert make_workload().variant(rate=3.0, arrival_kind="constant").arrival.kind == "constant"


# --- traces ---

def test_the_example_trace_parses():
    rows = parse_trace(REPO / "fixtures" / "traces" / "example.jsonl")
    assert len(rows) >= 10
    assert all(b.timestamp >= a.timestamp for a, b in zip(rows, rows[1:]))
    assert any(r.prefix_id for r in rows) and any(r.session_id for r in rows)


@pytest.mark.parametrize("lines, line, message", [
    (['{"timestamp": 0, "input_tokens": 4, "output_tokens": 2}', '{"timestamp": 1, "input_tokens": 4'], 2,
     "not valid JSON"),
    (['{"timestamp": 1, "input_tokens": 4, "output_tokens": 2}', '{"timestamp": 0.5, "input_tokens": 4, '
      '"output_tokens": 2}'], 2, "before the previous"),
    (['# a comment', '', '{"timestamp": 0, "input_tokens": 0, "output_tokens": 2}'], 3, "input_tokens must be"),
    (['{"timestamp": "soon", "input_tokens": 4, "output_tokens": 2}'], 1, "timestamp must be a number"),
    (['{"timestamp": 0, "input_tokens": 4, "output_tokens": 2, "prompt": "hi"}'], 1, "unknown key 'prompt'"),
    (['[1, 2]'], 1, "must be a JSON object"),
    (['{"timestamp": 0, "input_tokens": 4, "output_tokens": 2, "session_id": 7}'], 1, "session_id must be"),
])
def test_a_bad_trace_line_is_named_with_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        parse_trace(path)
    assert f"{path}:{line}" in str(info.value)


def test_a_bad_trace_stops_the_workload_from_loading(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"timestamp": 0, "input_tokens": 4}\n')
    with pytest.raises(ConfigError, match=r"t\.jsonl:1.*output_tokens"):
        parse_workload(_workload(tmp_path, '[arrival]\nkind = "trace"\ntrace = "t.jsonl"\n'))


def test_trace_time_scale_stretches_the_schedule(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(
        f'{{"timestamp": {10 + i * 0.5}, "input_tokens": {8 + i}, "output_tokens": {2 + i}}}\n' for i in range(5)))
    wl = parse_workload(_workload(tmp_path, '[arrival]\nkind = "trace"\ntrace = "t.jsonl"\ntime_scale = 0.5\n'))
    dues, offered, label = open_dues(wl)
    assert [d.at for d in dues] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert [d.max_tokens for d in dues] == [2, 3, 4, 5, 6]
    assert offered == pytest.approx(4.0) and label == "trace t.jsonl x0.5"


# --- open-loop levels on the simulator ---

def test_open_loop_level_sends_the_schedule(sim):  # noqa: F811
    wl = make_workload(input_tokens=64, output_tokens=16, arrival=Arrival(kind="poisson", rate=20.0, requests=30))
    samples: list = []
    m = run_level([sim.url], MODEL, wl, 64, samples=samples)
    assert (m.requests, m.ok, m.failed) == (30, 30, 0)
    assert m.arrival == "poisson 20/s" and m.offered_rate == 20.0 and m.send_rate is not None
    assert m.concurrency == 64 and 1 <= m.max_in_flight <= 30
    records = sorted((r for r, _ in samples), key=lambda r: r.index)
    due = rate_schedule(wl.arrival, 30, 20.0, wl.seed)
    # sent in schedule order, never before it was due, all measured
    assert [r.index for r in sorted(records, key=lambda r: r.sent)] == list(range(30))
    assert all(r.sent >= r.scheduled for r in records)
    offsets = [r.scheduled - records[0].scheduled for r in records]
    assert offsets == pytest.approx(due, abs=1e-6)
    assert all(measured for _, measured in samples)
    assert m.schedule_lag_ms.n == 30 and m.client_queue_ms.n == 30 and m.client_queue_ms.max == 0.0
    assert m.stream_output_tok_s is None and m.output_tokens == 30 * 16


def test_max_concurrency_cap_queues_in_the_client(sim):  # noqa: F811
    # 10 requests due within 9 ms, at most 2 in flight: 8 of them wait for a slot
    wl = make_workload(input_tokens=64, output_tokens=32, arrival=Arrival(kind="constant", rate=1000.0, requests=10))
    samples: list = []
    m = run_level([sim.url], MODEL, wl, 2, samples=samples)
    assert m.ok == 10 and m.max_in_flight == 2
    records = [r for r, _ in samples]
    waited = [r for r in records if r.client_queue > 0]
    assert len(waited) >= 8
    # the wait is reported apart: latency starts when the request was sent
    assert m.client_queue_ms.max > m.ttft_ms.min
    for r in records:
        assert r.scheduled <= r.slot_free <= r.sent < r.chunk_times[0]


def test_trace_replay_sends_each_traced_shape(sim, tmp_path):  # noqa: F811
    (tmp_path / "t.jsonl").write_text("".join(
        f'{{"timestamp": {i * 0.02}, "input_tokens": {16 * (i + 1)}, "output_tokens": {3 + i}, '
        f'"session_id": "s{i % 2}"}}\n' for i in range(6)))
    wl = parse_workload(_workload(tmp_path, '[arrival]\nkind = "trace"\ntrace = "t.jsonl"\n'))
    samples: list = []
    m = run_level([sim.url], MODEL, wl, 16, samples=samples)
    assert m.ok == 6 and m.arrival == "trace t.jsonl x1"
    by_index = {r.index: r for r, _ in samples}
    assert [by_index[i].output_tokens for i in range(6)] == [3, 4, 5, 6, 7, 8]
    assert [by_index[i].prompt_tokens for i in range(6)] == [16, 32, 48, 64, 80, 96]


# --- non-streaming requests (stream = false) ---

@pytest.mark.parametrize("open_loop", [False, True])
def test_non_streaming_requests_time_the_whole_answer(sim, open_loop):  # noqa: F811
    arrival = Arrival(kind="constant", rate=20.0, requests=6) if open_loop else Arrival()
    wl = make_workload(output_tokens=10, stream=False, arrival=arrival)
    samples: list = []
    m = run_level([sim.url], MODEL, wl, 3, samples=samples)
    assert (m.ok, m.failed) == (6 if open_loop else 4, 0) and m.output_tokens == m.ok * 10
    for r, _ in samples:
        assert len(r.chunk_times) == 1 and r.ttft == r.e2el and r.tpot is None
    assert m.tpot_ms.n == 0 and m.ttft_ms == m.e2el_ms


def test_stream_false_in_a_workload_file(tmp_path):
    wl = parse_workload(_workload(tmp_path, "stream = false\n"))
    assert wl.stream is False
    from pytest_mm27.loadgen.prompts import RequestFactory
    body = RequestFactory(wl, "m").body(0)
    assert b'"stream":false' in body and b"stream_options" not in body
    assert body == RequestFactory(wl, "m").body_json(0)


def test_a_sweep_level_without_a_rate_is_refused_before_it_runs():
    wl = make_workload(arrival=Arrival(kind="poisson", rates=(2.0, 4.0)))
    with pytest.raises(ConfigError, match=r"names no rate \(its sweep: 2, 4 req/s\): give rate=R"):
        wl.arrival.check_level(wl.name, "t.toml")
    wl.variant(rate=2.0).arrival.check_level(wl.name, "t.toml")
    Arrival(kind="trace").check_level("x", "t.toml")      # a trace brings its own schedule
