"""Goodput: per-request SLOs, attainment, the saturation point, the rate search; [slo] tables; on the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_mm27.catalog.arrivals import Arrival
from pytest_mm27.catalog.slo import RateSearch, SloSpec
from pytest_mm27.catalog.workload import parse_workload
from pytest_mm27.errors import ConfigError
from pytest_mm27.loadgen import LevelMetrics, Percentiles, RequestRecord, run_level
from pytest_mm27.loadgen.goodput import goodput, missed, saturation, saturation_point, search_rate

from sim_helpers import MODEL, sim  # noqa: F401  (fixture)
from test_loadgen import make_workload


def rec(i: int, ttft_s: float, gap_s: float, tokens: int, ok: bool = True) -> RequestRecord:
    chunks = [ttft_s + k * gap_s for k in range(tokens)] if ok else []
    return RequestRecord(i, "e", 0, 0.0, 0.0, chunks[-1] if chunks else 0.1, ok=ok, chunk_times=chunks,
                         output_tokens=tokens if ok else 0, error=None if ok else "boom")


def test_a_request_meets_every_slo_or_names_the_misses():
    slo = SloSpec(ttft_ms=100, tpot_ms=20, e2el_ms=1000)
    assert missed(rec(0, 0.05, 0.01, 10), slo) == []
    assert missed(rec(0, 0.15, 0.01, 10), slo) == ["ttft_ms"]
    assert missed(rec(0, 0.05, 0.03, 10), slo) == ["tpot_ms"]
    assert missed(rec(0, 0.15, 0.03, 40), slo) == ["ttft_ms", "tpot_ms", "e2el_ms"]
    assert missed(rec(0, 0.05, 0.0, 1), SloSpec(tpot_ms=1)) == []     # TPOT undefined: no miss
    assert missed(rec(0, 0, 0, 0, ok=False), slo) == ["failed"]
    # at the ceiling is inside it
    assert missed(rec(0, 0.125, 0.015625, 2), SloSpec(ttft_ms=125, tpot_ms=15.625)) == []


def test_goodput_counts_requests_and_tokens_meeting_every_slo():
    records = [rec(0, 0.05, 0.01, 10), rec(1, 0.2, 0.01, 10), rec(2, 0.05, 0.01, 30), rec(3, 0, 0, 0, ok=False)]
    g = goodput(records, SloSpec(ttft_ms=100), duration_s=2.0)
    assert g.attainment == 0.5 and g.req_s == 1.0 and g.tok_s == 20.0
    assert g.misses == {"ttft_ms": 1, "failed": 1}
    assert goodput([], SloSpec(ttft_ms=1), 1.0).attainment is None


def _level(offered: float, achieved: float, ttft: float, e2el: float) -> LevelMetrics:
    p = lambda v: Percentiles(v, v, v, v, v, v, 10)  # noqa: E731
    return LevelMetrics(concurrency=64, requests=10, ok=10, failed=0, error_rate=0.0, errors={}, duration_s=1.0,
                        output_tokens=0, prompt_tokens=0, output_tok_s=0.0, total_tok_s=0.0,
                        request_tok_s=achieved, ttft_ms=p(ttft), tpot_ms=p(1.0), itl_ms=p(1.0), e2el_ms=p(e2el),
                        queue_ms=p(0.0), offered_rate=offered)


def test_saturation_needs_both_a_shortfall_and_climbing_latency():
    base = _level(4, 4.0, 50, 500)
    assert saturation(None, base) == (False, None)
    assert saturation(base, _level(8, 7.9, 300, 900))[0] is False      # follows the rate: latency alone is not it
    assert saturation(base, _level(8, 5.0, 60, 520))[0] is False       # short, but latency flat (a slow client?)
    hit, note = saturation(base, _level(8, 5.0, 400, 2000))
    assert hit and "offered 8 req/s, completed 5.00" in note and "38% short" in note and "ttft p50 50 -> 400 ms" in note
    closed = _level(4, 4.0, 50, 500)
    closed.offered_rate = None
    assert saturation(base, closed) == (None, None)
    sweep = [base, _level(8, 7.9, 80, 600), _level(16, 9.0, 900, 3000), _level(32, 9.1, 2000, 6000)]
    assert saturation_point(sweep) == 16
    assert saturation_point(sweep[:2]) is None


def _fake_server(knee: float):
    """Attainment 1 up to ``knee`` req/s, then falling off: what a server's SLO curve looks like."""
    calls = []

    def measure(rate: float) -> LevelMetrics:
        calls.append(rate)
        m = _level(rate, rate, 10, 10)
        m.slo_attainment = 1.0 if rate <= knee else max(0.0, 1 - (rate - knee) / knee)
        return m
    return measure, calls


def test_rate_search_bisects_to_the_knee_within_the_tolerance():
    measure, calls = _fake_server(knee=10.0)
    out = search_rate(measure, RateSearch(attainment=0.95, min_rate=1, max_rate=64, tolerance=0.05, max_steps=20))
    # attainment >= 0.95 holds up to 10.5 req/s
    assert out.rate is not None and 10.0 * 0.95 <= out.rate <= 10.5
    assert calls[:2] == [64, 1] and "within 5%" in out.stop
    assert out.best is not None and out.best.offered_rate == out.rate
    assert [p[0] for p in out.probes] == calls


def test_rate_search_stop_rules():
    measure, calls = _fake_server(knee=10.0)
    out = search_rate(measure, RateSearch(attainment=0.95, min_rate=1, max_rate=64, tolerance=0.01, max_steps=4))
    assert len(calls) == 4 and "4 probes made" in out.stop
    measure, _ = _fake_server(knee=100.0)
    assert search_rate(measure, RateSearch(max_rate=64)).rate == 64
    measure, _ = _fake_server(knee=0.1)
    out = search_rate(measure, RateSearch(min_rate=1, max_rate=64))
    assert out.rate is None and "misses the target" in out.stop


def test_slo_table_parses_and_rejects(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text('input_tokens = 8\noutput_tokens = 8\n[slo]\nttft_ms = 500\ntpot_ms = 50\n'
                    '[slo.search]\nattainment = 0.9\nmin_rate = 1\nmax_rate = 32\n')
    wl = parse_workload(path)
    assert wl.slo == SloSpec(ttft_ms=500, tpot_ms=50, search=RateSearch(0.9, 1.0, 32.0))
    for body, field in (('[slo]\n', "slo"), ('[slo]\nttft = 5\n', "slo.ttft"),
                        ('[slo]\nttft_ms = 5\n[slo.search]\nmin_rate = 8\nmax_rate = 4\n', "slo.search.min_rate"),
                        ('[slo]\nttft_ms = 5\n[slo.search]\nattainment = 1.5\n', "slo.search.attainment")):
        path.write_text('input_tokens = 8\noutput_tokens = 8\n' + body)
        with pytest.raises(ConfigError) as info:
            parse_workload(path)
        assert info.value.field == field, body


# --- on the simulator ---

def test_goodput_of_an_open_level(sim):  # noqa: F811
    arrival = Arrival(kind="poisson", rate=10.0, requests=20)
    easy = run_level([sim.url], MODEL, make_workload(arrival=arrival, slo=SloSpec(ttft_ms=60_000, e2el_ms=60_000)), 64)
    assert easy.slo_attainment == 1.0 and easy.slo_misses == {}
    assert easy.goodput_req_s == pytest.approx(easy.request_tok_s)
    assert easy.goodput_tok_s == pytest.approx(easy.output_tok_s)
    # no real server answers in a microsecond: every request misses
    hard = run_level([sim.url], MODEL, make_workload(arrival=arrival, slo=SloSpec(ttft_ms=0.001)), 64)
    assert hard.slo_attainment == 0.0 and hard.goodput_req_s == 0.0 and hard.slo_misses == {"ttft_ms": 20}


def test_goodput_of_a_closed_level_and_none_without_slos(sim):  # noqa: F811
    m = run_level([sim.url], MODEL, make_workload(slo=SloSpec(tpot_ms=60_000)), 4)
    assert m.slo_attainment == 1.0 and m.goodput_req_s == pytest.approx(m.request_tok_s)
    plain = run_level([sim.url], MODEL, make_workload(), 4)
    assert plain.slo_attainment is None and plain.goodput_tok_s is None and plain.arrival is None


def test_rate_search_on_the_simulator_finds_a_rate_that_holds(sim):  # noqa: F811
    # TTFT under a generous ceiling holds at low rates; the search must end inside its bracket either way
    wl = make_workload(input_tokens=64, output_tokens=16, slo=SloSpec(ttft_ms=30_000))

    def measure(rate: float) -> LevelMetrics:
        return run_level([sim.url], MODEL, wl.variant(rate=rate, arrival_kind="poisson", requests=8), 64)

    out = search_rate(measure, RateSearch(attainment=0.9, min_rate=1, max_rate=8, tolerance=0.5, max_steps=3))
    assert out.rate == 8 and out.probes == [(8, 1.0)]
    assert out.best.offered_rate == 8 and out.best.slo_attainment == 1.0


def test_goodput_metrics_are_gated_only_where_the_workload_has_slos():
    from pytest_mm27.gate.compare import Judge
    from pytest_mm27.gate.specs import parse_tolerances
    from pytest_mm27.records.model import RunRecord
    base = RunRecord.from_dict({"schema": "pytest-mm27-run", "levels": [], "workload": {"name": "w", "slo": None}})
    names = lambda judge: [s.name for s in judge.specs]  # noqa: E731
    assert "goodput" not in names(Judge.of(base, {"name": "w", "slo": None}))
    with_slo = names(Judge.of(base, {"name": "w", "slo": {"ttft_ms": 5}}))
    assert "goodput" in with_slo and "max_good_rate" in with_slo and "throughput" in with_slo
    assert parse_tolerances("goodput=3%")["goodput"] == pytest.approx(0.03)


def test_saturation_judges_the_drawn_schedule_against_the_rate_completed():
    base = _level(4, 4.0, 50, 500)
    # a Poisson draw of only 6.5/s for a nominal 8/s, all completed: not saturated
    drawn = _level(8, 5.0, 400, 2000)
    drawn.schedule_rate, drawn.completion_rate = 6.5, 6.4
    assert saturation(base, drawn)[0] is False
    drawn.completion_rate = 4.1
    hit, note = saturation(base, drawn)
    assert hit and "(drawn 6.50/s), completed 4.10 req/s (37% short)" in note


def test_a_cap_that_queues_in_the_client_is_saturation_too():
    base = _level(4, 4.0, 50, 500)
    capped = _level(64, 12.0, 55, 520)        # the server's latency flat: the cap held requests back
    capped.client_queue_ms = Percentiles(900, 900, 900, 900, 900, 900, 10)
    hit, note = saturation(base, capped)
    assert hit and "client queue p50 0 -> 900 ms" in note
    capped.client_queue_ms = Percentiles(0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 10)    # under a millisecond: no climb
    assert saturation(base, capped)[0] is False
