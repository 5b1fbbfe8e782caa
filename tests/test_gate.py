"""The nightly gate end to end: save a baseline, compare against it, catch a slowdown."""

from __future__ import annotations

import json

import pytest

from test_plugin import client_bound, records, run, run_until, setup


def test_save_compare_and_catch_a_slowdown(no_leftovers):
    pytester = no_leftovers
    setup(pytester, levels="[2, 8]")
    common = ("--topology", "tiny", "--trials", "2")

    result = run_until(pytester, lambda r, rec: not client_bound(rec), *common, "--save-baseline",
                       retry_args=("--force",))
    result.assert_outcomes(passed=2)
    [baseline] = list(pytester.path.glob("results/baselines/sim-rtx-pro-6000/tiny--quick.json"))
    saved = json.loads(baseline.read_text())
    assert not client_bound(saved), "every baseline run was client-bound: the machine is too loaded to test the gate"
    assert saved["baseline"]["key"] == {"profile": "sim-rtx-pro-6000", "topology": "tiny", "workload": "quick"}
    assert all(len(lv["trials"]) == 2 for lv in saved["levels"])

    # Never overwritten implicitly.
    result = run(pytester, *common, "--concurrency", "2", "--save-baseline")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*already exists*--force*"])
    assert json.loads(baseline.read_text())["created_at"] == saved["created_at"]

    result = run_until(pytester, lambda r, rec: r.ret == pytest.ExitCode.OK,
                       *common, "--baseline", "auto", "--report-md", "report.md")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*vs baseline *tiny--quick.json*"])

    result = run_until(pytester, lambda r, rec: not client_bound(rec),
                       *common, "--baseline", "auto", "--sim-fault", "slowdown=1.6", "--report-md", "slow.md")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*output_tok_s regressed at c=*baseline*now*tolerance 5%*noise band*"])
    report = (pytester.path / "slow.md").read_text()
    assert "regressed" in report and "tiny" in report
    assert records(pytester)[-1]["levels"][0]["comparison"]["status"] == "regressed"


def test_baseline_mismatch_is_an_error_before_booting(pytester):
    setup(pytester, levels="[2]")
    other = pytester.path / "other.json"
    other.write_text(json.dumps({
        "schema": "pytest-mm27/run-record", "schema_version": 1,
        "hardware": {"profile": "h100-sxm", "simulated": False}, "topology": {"name": "tiny"},
        "workload": {"name": "quick"}, "engine": {"name": "vllm"},
        "levels": [{"concurrency": 2, "metrics": {"output_tok_s": 1.0}, "trials": [{"output_tok_s": 1.0}]}],
    }))
    result = run(pytester, "--topology", "tiny", "--baseline", str(other))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*other.json*hardware profile*h100-sxm*"])
    assert not list(pytester.path.glob("results/runs/*/*.json"))


def test_corrupt_baseline_names_the_file(pytester):
    setup(pytester, levels="[2]")
    (pytester.path / "bad.json").write_text('{"schema": "pytest-mm27/run-record", "schema_')
    result = run(pytester, "--topology", "tiny", "--baseline", "bad.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad.json*not valid JSON*"])


def test_level_tests_and_session_summary_agree(no_leftovers):
    """One gate step: each level's test verdict (judged while the run was under way) is the
    verdict the session summary gives the same level at the end, with a regression and without."""
    from pytest_mm27.gate.compare import compare_records

    pytester = no_leftovers
    setup(pytester, levels="[2, 4, 8]")
    # Wide tolerances: what is checked is that the two verdicts agree, with a 1.6x slowdown
    # (-37% tok/s) and without; the simulator runs on the wall clock, and on a 2-core CI box
    # a neighbour's load (a Ray cluster on the other worker) shifted c=8 by -6% tok/s and
    # +42% TTFT p99 between sessions, three attempts in a row.
    common = ("--topology", "tiny", "--trials", "2", "--regression-tolerance",
              "throughput=15%,ttft_p50=100%,ttft_p99=100%,tpot_p50=50%,tpot_p99=50%")
    run_until(pytester, lambda r, rec: not client_bound(rec), *common, "--save-baseline",
              retry_args=("--force",))
    [baseline_file] = pytester.path.glob("results/baselines/sim-rtx-pro-6000/tiny--quick.json")
    baseline = json.loads(baseline_file.read_text())
    for fault, regressed in ((None, False), ("slowdown=1.6", True)):
        args = (*common, "--baseline", "auto", *(("--sim-fault", fault) if fault else ()))
        # a loaded box can starve the client or shift a TTFT between sessions: measure again then
        wanted = pytest.ExitCode.TESTS_FAILED if regressed else pytest.ExitCode.OK
        result = run_until(pytester, lambda r, rec: not client_bound(rec) and r.ret == wanted, *args)
        record = records(pytester)[-1]
        summary = compare_records(baseline, record)
        for level in record["levels"]:
            at_the_end = summary.level(level["concurrency"])
            assert level["comparison"]["status"] == at_the_end.status, (level["concurrency"], fault)
            failed_test = level["verdict"]["status"] == "FAIL"
            assert failed_test == (at_the_end.status == "regressed"), (level["concurrency"], fault)
        assert summary.regressed is regressed
        assert (result.ret == pytest.ExitCode.TESTS_FAILED) is regressed
