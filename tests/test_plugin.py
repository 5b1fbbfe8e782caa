"""The plugin end to end: real simulator processes booted, swept and torn down.

Each test runs pytest in a subprocess (pytester) on a small topology of its
own, with the quick workload, and checks outcomes, messages, the run record
and that no process is left behind.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pytest_mm27.testing import floors_file, sim_topology

REPO = Path(__file__).resolve().parents[1]

SUITE = (REPO / "suites" / "test_throughput.py").read_text()


def setup(pytester: pytest.Pytester, *, name="tiny", levels="[1, 4]", dp=2, mode="replicas",
          floors: dict[int, float] | None = None) -> None:
    pytester.makepyfile(test_throughput=SUITE)
    topo_dir = pytester.path / "topologies"
    topo_dir.mkdir(exist_ok=True)
    (topo_dir / f"{name}.toml").write_text(sim_topology(name, levels, dp, mode))
    floor_dir = pytester.path / "floors"
    floor_dir.mkdir(exist_ok=True)
    (floor_dir / "rtx-pro-6000.toml").write_text(
        floors_file(name, "quick", floors or {}))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "--topology-dir", "topologies", "--floors-dir", "floors", "--workload", "quick",
        "--engine", "sim", "--results-dir", "results", *args, timeout=240)


def records(pytester: pytest.Pytester) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(pytester.path.glob("results/runs/*/*.json"))]


ATTEMPTS = 3


def client_bound(record: dict) -> bool:
    return any(t.get("client_bound") for lv in record["levels"] for t in lv.get("trials", []))


def run_until(pytester: pytest.Pytester, clean, *args: str, retry_args: tuple[str, ...] = ()) -> pytest.RunResult:
    """Run up to ATTEMPTS times until ``clean(result, record)`` holds; return the last result.

    The simulator runs on the wall clock, so a loaded CI box can starve the
    client (client-bound levels, which the gate rightly refuses to judge) or
    shift latencies between two sessions. What these tests check is the
    gate's plumbing, which a clean run must show; they are not a noise study
    (benchmarks/gate_accuracy.py is).
    """
    for attempt in range(ATTEMPTS):
        result = run(pytester, *args, *(retry_args if attempt else ()))
        if clean(result, records(pytester)[-1]):
            break
    return result


def test_replicas_sweep_passes_and_writes_record(no_leftovers):
    pytester = no_leftovers
    setup(pytester, floors={1: 1.0})
    result = run(pytester, "--topology", "tiny", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*engine: sim*", "*test_throughput?tiny-c1? PASSED*",
                                 "*test_throughput?tiny-c4? PASSED*", "*pytest-mm27*", "*conc*output tok/s*"])
    [record] = records(pytester)
    assert record["status"] == "complete"
    assert record["engine"]["name"] == "sim"
    assert [lv["concurrency"] for lv in record["levels"]] == [1, 4]
    assert len(record["launch"]["servers"]) == 2
    level = record["levels"][1]["metrics"]
    assert level["ok"] == level["requests"] >= 4 and level["failed"] == 0
    assert level["output_tokens"] == 32 * level["ok"]
    assert record["levels"][0]["verdict"]["status"] == "pass"
    logs = list(pytester.path.glob("results/runs/*/logs/*.log"))
    assert len(logs) == 2


def test_native_dp_one_server(no_leftovers):
    pytester = no_leftovers
    setup(pytester, mode="native", levels="[2]")
    result = run(pytester, "--topology", "tiny")
    result.assert_outcomes(passed=1)
    [record] = records(pytester)
    assert len(record["launch"]["servers"]) == 1
    assert len(record["launch"]["endpoints"]) == 1


def test_impossible_floor_fails_with_measured_and_floor(no_leftovers):
    pytester = no_leftovers
    setup(pytester, levels="[1]", floors={1: 1e9})
    result = run(pytester, "--topology", "tiny")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*output tok/s * is below the floor 1,000,000,000*test floor*"])
    [record] = records(pytester)
    assert record["levels"][0]["verdict"]["status"] == "FAIL"


def test_slowdown_knob_breaks_a_floor_that_holds(no_leftovers):
    pytester = no_leftovers
    setup(pytester, levels="[4]")
    run(pytester, "--topology", "tiny").assert_outcomes(passed=1)
    measured = records(pytester)[0]["levels"][0]["metrics"]["output_tok_s"]
    setup(pytester, levels="[4]", floors={4: measured * 0.7})
    run_until(pytester, lambda r, rec: r.ret == pytest.ExitCode.OK, "--topology", "tiny").assert_outcomes(passed=1)
    result = run(pytester, "--topology", "tiny", "--sim-fault", "slowdown=2.0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*is below the floor*"])


def test_crash_at_start_shows_log_tail(no_leftovers):
    pytester = no_leftovers
    setup(pytester, levels="[1, 4]")
    topo = pytester.path / "topologies" / "tiny.toml"
    topo.write_text(topo.read_text().replace("minimax-m2.7-nvfp4", "no-such-model-spec"))
    result = run(pytester, "--topology", "tiny")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*could not measure*", "*no-such-model-spec*"])
    [record] = records(pytester)
    assert record["status"] == "failed"
    assert "no-such-model-spec" in record["errors"][0]["message"]


def test_crash_mid_sweep_keeps_finished_levels(no_leftovers):
    pytester = no_leftovers
    # Level c=1 sends 2 requests per replica at most; the crash comes in the c=8 level.
    setup(pytester, levels="[1, 8, 16]")
    result = run(pytester, "--topology", "tiny", "--sim-fault", "crash-after=4")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("failed") == 2, result.stdout.str()
    [record] = records(pytester)
    assert record["status"] == "failed"
    assert record["levels"][0]["concurrency"] == 1 and record["levels"][0]["metrics"]["failed"] == 0
    assert any("exit" in e["message"] or "died" in e["message"] for e in record["errors"]), record["errors"]


def test_unknown_topology_is_a_usage_error(pytester):
    setup(pytester)
    result = run(pytester, "--topology", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown topology 'nope'; known: *dp3*tiny*"])


def test_broken_toml_is_a_usage_error_naming_file(pytester):
    setup(pytester)
    (pytester.path / "topologies" / "broken.toml").write_text("name = \n")
    result = run(pytester, "--topology", "tiny")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*broken.toml: not valid TOML*"])


def test_bad_option_values_are_usage_errors(pytester):
    setup(pytester)
    result = run(pytester, "--concurrency", "4,x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*concurrency levels must be positive integers, got 'x'*"])
    result = run(pytester, "--engine", "tgi")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_ini_twins(no_leftovers):
    pytester = no_leftovers
    setup(pytester, levels="[1, 4, 8]")
    pytester.makeini(textwrap.dedent("""
        [pytest]
        mm27_topology = tiny
        mm27_concurrency = 2
        mm27_workload = quick
        mm27_engine = sim
        mm27_topology_dir = topologies
        mm27_results_dir = out
    """))
    result = pytester.runpytest_subprocess("-v", timeout=120)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*tiny-c2*PASSED*"])
    assert list(pytester.path.glob("out/runs/*/tiny.json"))


def test_help_lists_options(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*pytest-mm27*", "*--topology=NAME*", "*--engine=ENGINE*", "*mm27_topology*"])


def test_xdist_runs_each_topology_on_one_worker(no_leftovers):
    pytester = no_leftovers
    setup(pytester, name="ta", levels="[1, 2]")
    (pytester.path / "topologies" / "tb.toml").write_text(
        sim_topology("tb", "[1, 2]", 1, "native"))
    result = run(pytester, "--topology", "ta,tb", "-n", "2", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*TopologyScheduling*"])
    recs = {r["topology"]["name"]: r for r in records(pytester)}
    assert set(recs) == {"ta", "tb"}
    for rec in recs.values():
        assert rec["status"] == "complete" and [lv["concurrency"] for lv in rec["levels"]] == [1, 2]
        assert rec["parallel"]["xdist_workers"] == 2
    assert {r["parallel"]["xdist_worker"] for r in recs.values()} == {"gw0", "gw1"}
    # the controller prints both tables from the records the workers wrote
    result.stdout.fnmatch_lines(["*ta (TP=2 x DP=2 replicas)*", "*tb (TP=2 x DP=1 native)*"])
