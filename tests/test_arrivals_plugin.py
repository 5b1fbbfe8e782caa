"""Rate levels through the plugin on the simulator: ids, records, saturation, samples, floors on goodput."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pytest_mm27.loadgen import Percentiles
from pytest_mm27.records.samples import latency_percentiles, read_samples
from pytest_mm27.testing import sim_topology

REPO = Path(__file__).resolve().parents[1]
SUITE = (REPO / "suites" / "test_throughput.py").read_text()

SWEEP = textwrap.dedent("""\
    name = "sweep"
    input_tokens = 64
    output_tokens = 32
    [arrival]
    kind = "poisson"
    rates = [2, 400]
    requests = 24
    max_concurrency = 32
    [slo]
    ttft_ms = 60000
    """)


def setup(pytester: pytest.Pytester, workload: str = SWEEP, floors: str = "") -> None:
    pytester.makepyfile(test_throughput=SUITE)
    for folder, name, text in (("topologies", "one.toml", sim_topology("one", "[1]", 1, "replicas")),
                               ("workloads", "sweep.toml", workload), ("floors", "rtx-pro-6000.toml", floors)):
        (pytester.path / folder).mkdir(exist_ok=True)
        (pytester.path / folder / name).write_text(text)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "--topology-dir", "topologies", "--workload-dir", "workloads", "--floors-dir", "floors",
        "--topology", "one", "--workload", "sweep", "--engine", "sim", "--results-dir", "results", "-v", *args, timeout=240)


def records(pytester: pytest.Pytester) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(pytester.path.glob("results/runs/*/*.json"))}


def test_a_rate_sweep_runs_one_level_per_rate(no_leftovers):
    pytester = no_leftovers
    setup(pytester, workload=SWEEP.replace("max_concurrency = 32", "max_concurrency = 4"))
    result = run(pytester)
    result.stdout.fnmatch_lines(["*test_throughput?one-r2? PASSED*", "*test_throughput?one-r400? *"])
    recs = records(pytester)
    assert set(recs) == {"one--sweep_rate=2_", "one--sweep_rate=400_"}, recs.keys()
    low = recs["one--sweep_rate=2_"]
    level = low["levels"][0]
    m = level["metrics"]
    assert level["concurrency"] == 4 and low["workload"]["arrival"]["rate"] == 2
    assert m["arrival"] == "poisson 2/s" and m["offered_rate"] == 2 and m["requests"] == 24
    assert m["slo_attainment"] == 1.0 and m["goodput_req_s"] == pytest.approx(m["request_tok_s"])
    assert m["saturated"] is False
    # 400 req/s is far past what one simulated replica serves: achieved falls short, latency climbs
    high = recs["one--sweep_rate=400_"]["levels"][0]["metrics"]
    assert high["offered_rate"] == 400 and high["request_tok_s"] < 0.9 * 400
    # 24 requests due within ~0.1 s, 4 at a time served over a second or more: completions fall far
    # behind the schedule while the cap's queue in the client climbs
    assert high["completion_rate"] < 0.5 * high["schedule_rate"] and high["max_in_flight"] == 4
    assert high["saturated"] is True and "saturated: offered 400 req/s" in high["saturation_note"]
    assert "client queue p50" in high["saturation_note"]
    # samples beside the record, one file per trial, named by the trial
    files = list(pytester.path.glob("results/runs/*/one--sweep_rate=2_.samples/c4-t1.jsonl*"))
    assert len(files) == 1
    assert files[0].parent.parent / level["trials"][0]["samples"] == files[0]
    # through JSON and back, the recorded percentiles come out of the samples bit for bit
    header, samples = read_samples(files[0])
    assert header["workload"] == "sweep[rate=2]" and header["wall_epoch"] == m["wall_epoch"]
    recomputed = latency_percentiles([s.record for s in samples if s.measured])
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert recomputed[name] == Percentiles.from_dict(m[name]), name


def test_rate_option_turns_a_closed_workload_into_poisson_levels(no_leftovers):
    pytester = no_leftovers
    setup(pytester, workload='name = "sweep"\ninput_tokens = 32\noutput_tokens = 8\nrequests_per_concurrency = 2\n')
    result = run(pytester, "--rate", "3,1.5")
    result.stdout.fnmatch_lines(["*one-r1.5? PASSED*", "*one-r3? PASSED*"])
    recs = records(pytester)
    m = recs["one--sweep_arrival_kind=poisson,rate=3_"]["levels"][0]["metrics"]
    assert m["arrival"] == "poisson 3/s" and m["requests"] == 60      # 3/s x the default 20 s


def test_a_floor_on_goodput_fails_the_level(no_leftovers):
    pytester = no_leftovers
    floors = textwrap.dedent("""\
        [[floor]]
        topology = "one"
        workload = "sweep[rate=2]"
        concurrency = 32
        metric = "goodput_tok_s"
        tok_s = 1000000
        note = "a goodput floor no simulated replica reaches"
        """)
    setup(pytester, workload=SWEEP.replace("rates = [2, 400]", "rates = [2]"), floors=floors)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*goodput tok/s * is below the floor 1,000,000*no simulated replica reaches*"])


def test_bad_rate_option_is_a_usage_error(pytester):
    result = pytester.runpytest_subprocess("--rate", "2,fast")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*request rates must be positive numbers*'fast'*"])


SEARCH = SWEEP.replace("rates = [2, 400]", "rates = [4]").replace("requests = 24", "requests = 16") + textwrap.dedent("""\
    [slo.search]
    attainment = 0.9
    min_rate = 1
    max_rate = 16
    tolerance = 0.5
    max_steps = 4
    """)


def test_the_rate_search_is_a_level_recorded_and_gated(no_leftovers):
    pytester = no_leftovers
    floors = textwrap.dedent("""\
        [[floor]]
        topology = "one"
        workload = "sweep[rate-search]"
        concurrency = 32
        metric = "max_good_rate"
        tok_s = 1000
        note = "no replica holds its SLOs at 1,000 req/s"
        """)
    setup(pytester, workload=SEARCH, floors=floors)
    result = run(pytester)
    result.stdout.fnmatch_lines(["*test_throughput?one-r4? PASSED*", "*test_throughput?one-rate-search? FAILED*",
                                 "*max good rate req/s 16.00 is below the floor 1,000.00*"])
    recs = records(pytester)
    search = recs["one--sweep_rate-search_"]["levels"][0]
    m = search["metrics"]
    # a 60 s TTFT ceiling holds at 16 req/s: the first probe answers it
    assert m["max_good_rate"] == 16 and m["rate_search"]["probes"] == [{"rate": 16, "attainment": 1.0}]
    assert m["offered_rate"] == 16 and "max_rate 16 req/s holds" in m["rate_search"]["stop"]
    probe = recs["one--sweep_rate=16_"]["levels"][0]
    assert probe["case"] == "rate-search" and probe["metrics"]["slo_attainment"] == 1.0


USER_TEST = textwrap.dedent("""\
    def test_rates(mm27_topology):
        low = mm27_topology.run(8, "sweep", rate=3, requests=6)
        assert low.metrics.offered_rate == 3 and low.metrics.requests == 6 and low.metrics.goodput_tok_s > 0
        found = mm27_topology.search_rate("sweep", requests=6)
        assert found.metrics.max_good_rate == 16, found.metrics.rate_search
        assert found.workload == "sweep[requests=6][rate-search]"
    """)


def test_user_tests_run_rate_levels_and_the_search(no_leftovers):
    pytester = no_leftovers
    setup(pytester, workload=SEARCH)
    pytester.makepyfile(test_mine=USER_TEST)
    result = pytester.runpytest_subprocess(
        "test_mine.py", "--topology-dir", "topologies", "--workload-dir", "workloads", "--floors-dir", "floors",
        "--topology", "one", "--engine", "sim", "--results-dir", "results", "-v", timeout=240)
    result.assert_outcomes(passed=1)
    recs = records(pytester)
    assert "one--sweep_rate=3,requests=6_" in recs and "one--sweep_requests=6__rate-search_" in recs, recs.keys()
    probe = recs["one--sweep_requests=6__rate-search_"]["levels"][0]
    assert probe["case"] == "test_mine.py::test_rates[one]"


def test_the_catalog_trace_replay_runs_one_level_and_keeps_the_trace_ids(no_leftovers):
    pytester = no_leftovers
    setup(pytester)
    result = run(pytester, "--workload", "trace-replay")
    result.stdout.fnmatch_lines(["*test_throughput?one-c256? PASSED*"])
    rec = records(pytester)["one"]      # the topology's own workload (--workload), so its own record
    m = rec["levels"][0]["metrics"]
    assert m["arrival"] == "trace example.jsonl x0.5" and (m["requests"], m["failed"]) == (40, 0)
    run_dir = next(pytester.path.glob("results/runs/*"))
    _, samples = read_samples(run_dir / rec["levels"][0]["trials"][0]["samples"])
    by_index = {s.record.index: s for s in samples}
    rows = [json.loads(line) for line in (REPO / "fixtures/traces/example.jsonl").read_text().splitlines()
            if line.startswith("{")]
    for i, row in enumerate(rows):
        assert by_index[i].record.output_tokens == row["output_tokens"]
        assert by_index[i].extra.get("prefix_id") == row.get("prefix_id")
        assert by_index[i].extra.get("session_id") == row.get("session_id")
