"""Comparison: directions, tolerances, noise-aware decisions, invalid and missing levels."""

from __future__ import annotations

import argparse
import math

import pytest

from pytest_mm27.benchmarks.synthetic import make_record
from pytest_mm27.gate.compare import compare_records
from pytest_mm27.gate.specs import DEFAULT_TOLERANCES, parse_tolerances
from pytest_mm27.stats import t_ppf
from pytest_mm27.records.model import IMPROVED, INVALID, MISSING, OK, REGRESSED, SWEEP
from pytest_mm27.report.terminal import comparison_lines

# ---- tolerances ----------------------------------------------------------------------------

def test_parse_tolerances_overrides_named_keeps_defaults() -> None:
    tol = parse_tolerances("throughput=5%,ttft_p99=10%")
    assert tol["throughput"] == pytest.approx(0.05)
    assert tol["ttft_p99"] == pytest.approx(0.10)
    assert tol["tpot_p50"] == DEFAULT_TOLERANCES["tpot_p50"]
    assert set(tol) == set(DEFAULT_TOLERANCES)


def test_parse_tolerances_fractions_aliases_and_spacing() -> None:
    tol = parse_tolerances(" throughput = 0.03 , latency=15%, error-rate=0.5% ")
    assert tol["throughput"] == pytest.approx(0.03)
    assert all(tol[k] == pytest.approx(0.15) for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"))
    assert tol["error_rate"] == pytest.approx(0.005)
    assert parse_tolerances("output_tok_s=7%")["throughput"] == pytest.approx(0.07)
    assert parse_tolerances("") == DEFAULT_TOLERANCES


@pytest.mark.parametrize(("text", "match"), [
    ("thruput=5%", "unknown metric 'thruput'.*known: throughput"),
    ("throughput=five", "must be a percentage like 5% or a fraction"),
    ("throughput=5", "write 5% for a percentage"),
    ("throughput", "must be METRIC=VALUE"),
    ("throughput=-1%", "must be 0 or more"),
    ("throughput=120%", "must be below 100%"),
    ("ttft_p99=", "must be METRIC=VALUE"),
])
def test_parse_tolerances_errors(text: str, match: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse_tolerances(text)


def test_parse_tolerances_as_argparse_type() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--regression-tolerance", type=parse_tolerances)
    assert ap.parse_args(["--regression-tolerance", "throughput=2%"]).regression_tolerance["throughput"] == 0.02
    with pytest.raises(SystemExit):
        ap.parse_args(["--regression-tolerance", "bogus=1%"])


def test_t_quantiles_match_tables() -> None:
    # two-sided 95 % and one-sided 99 % critical values from any t table
    assert t_ppf(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_ppf(0.99, 4) == pytest.approx(3.747, abs=1e-3)
    assert t_ppf(0.99, 24) == pytest.approx(2.492, abs=1e-3)
    assert t_ppf(0.995, 1) == pytest.approx(63.657, abs=1e-2)
    assert t_ppf(0.01, 10) == pytest.approx(-2.764, abs=1e-3)


# ---- deterministic records: the tolerance decides ------------------------------------------

def exact(slowdown=1.0, **kw):
    """Trials without noise: every trial of a level identical."""
    return make_record(noise=0.0, slowdown=slowdown, **kw)


def test_identical_runs_are_ok() -> None:
    result = compare_records(exact(), exact())
    assert result.status == OK and not result.regressed
    assert {m.status for lv in result.levels for m in lv.metrics} == {OK}


def test_directions_throughput_down_latency_up_is_regression() -> None:
    result = compare_records(exact(), exact(slowdown=1.2))
    lv = result.level(64)
    assert lv.get("throughput").status == REGRESSED and lv.get("throughput").change < 0
    assert lv.get("ttft_p99").status == REGRESSED and lv.get("ttft_p99").change > 0
    assert lv.get("tpot_p50").status == REGRESSED
    assert lv.get("error_rate").status == OK


def test_directions_faster_is_improvement() -> None:
    result = compare_records(exact(), exact(slowdown=1 / 1.2))
    assert result.status == IMPROVED
    lv = result.level(64)
    assert lv.get("throughput").status == IMPROVED and lv.get("ttft_p99").status == IMPROVED


def test_change_within_tolerance_is_ok_even_without_noise() -> None:
    result = compare_records(exact(), exact(slowdown=1.04))   # tok/s -3.8 %, latency +4 %
    assert result.status == OK
    tp = result.level(8).get("throughput")
    assert tp.change == pytest.approx(1 / 1.04 - 1) and tp.noise == 0.0


def test_tolerance_is_per_metric() -> None:
    tol = parse_tolerances("throughput=20%,latency=2%")
    lv = compare_records(exact(), exact(slowdown=1.05), tol).level(32)
    assert lv.get("throughput").status == OK
    assert lv.get("ttft_p99").status == REGRESSED


def test_message_format() -> None:
    result = compare_records(exact(), exact(slowdown=1.12, seed=3), baseline_path="b.json")
    m = result.level(256).get("throughput")
    assert m.message.startswith("output_tok_s regressed at c=256: baseline 9,722, now 8,680 (-10.7%), "
                                "tolerance 5%, noise band ±0.0% (98% CI of ratio [0.893, 0.893])")
    assert m.baseline == pytest.approx(12_000 * 256 / 316)
    d = m.to_dict()
    assert d["status"] == REGRESSED and d["ci"] == [pytest.approx(1 / 1.12)] * 2


# ---- noisy trials: the noise decides -------------------------------------------------------

def test_clear_regression_flagged_through_noise() -> None:
    base = make_record(noise=0.03, seed=10)
    now = make_record(noise=0.03, seed=11, slowdown=1.25)
    result = compare_records(base, now)
    flagged = [lv.concurrency for lv in result.levels if lv.get("throughput").status == REGRESSED]
    assert flagged == [lv.concurrency for lv in result.levels]
    m = result.level(64).get("throughput")
    assert 0 < m.noise < 0.1 and m.ci[1] < 1
    assert "noise band ±" in m.message and "98% CI of ratio" in m.message


def test_noise_alone_is_not_flagged() -> None:
    # 20 unchanged pairs x 6 levels x 5 metrics with 3% noise: nothing regressed
    statuses = []
    for seed in range(20):
        result = compare_records(make_record(noise=0.03, seed=2 * seed), make_record(noise=0.03, seed=2 * seed + 1))
        statuses += [m.status for lv in result.levels for m in lv.metrics]
    assert statuses.count(REGRESSED) <= 2   # expected ~1 % of 600 throughput+latency comparisons, mostly 0
    assert statuses.count(OK) >= len(statuses) - 4


def test_past_tolerance_but_within_noise_is_ok() -> None:
    """Large noise: a 7 % drop is past the 5 % tolerance but not outside the noise."""
    base = make_record(noise=0.15, seed=4)
    now = make_record(noise=0.15, seed=5, slowdown=1 / 0.93)
    result = compare_records(base, now)
    tps = [lv.get("throughput") for lv in result.levels]
    assert all(m.status != REGRESSED for m in tps)
    noted = [m for m in tps if "past tolerance but within the noise" in m.message]
    assert noted and all(m.noise > 0.15 for m in noted)


def test_noise_is_pooled_over_levels() -> None:
    base = make_record(noise=0.03, seed=6)
    now = make_record(noise=0.03, seed=7)
    pooled = compare_records(base, now)
    own = compare_records(base, now, pool_levels=False)
    bands = {lv.get("throughput").noise for lv in pooled.levels}
    assert len(bands) == 1                      # same pooled sigma and trial counts everywhere
    assert len({lv.get("throughput").noise for lv in own.levels}) == len(own.levels)
    assert "(12 df)" in pooled.noise_source or "(24 df)" in pooled.noise_source


def test_single_trials_use_the_levels_own_noise() -> None:
    base = make_record(trials=1, noise=0.0, within=0.03, seed=1)
    now = make_record(trials=1, noise=0.0, within=0.03, seed=2, slowdown=1.08)
    result = compare_records(base, now)
    m = result.level(8).get("throughput")
    # 1 vs 1 trial, each level measured ±3 % of itself: exp(z(0.99) * sqrt(0.03² + 0.03²)) - 1 = 10.4 % band
    assert m.noise == pytest.approx(math.expm1(2.3263 * math.sqrt(2 * 0.03 ** 2)), rel=1e-3)
    assert m.status == OK and "within-level noise only" in m.message
    assert "could not have caught a change under 10.4%" in m.message
    assert "within-level noise only (single trials" in result.noise_source
    assert any(line.startswith("  gate sensitivity: output_tok_s could not have caught a change smaller than")
               for line in comparison_lines(result))
    big = compare_records(base, make_record(trials=1, noise=0.0, within=0.03, seed=2, slowdown=1.2))
    assert big.level(8).get("throughput").status == REGRESSED


def test_single_trials_without_measured_noise_are_not_judged() -> None:
    base = make_record(trials=1, noise=0.0, seed=1)
    for trial in (t for lv in base["levels"] for t in lv["trials"]):
        del trial["noise"]            # a record from before within-level noise was measured
    result = compare_records(base, make_record(trials=1, noise=0.0, seed=2, slowdown=1.5))
    m = result.level(8).get("throughput")
    assert m.status == INVALID and "no within-level noise measured" in m.message and "--trials 3" in m.message
    assert m.change == pytest.approx(1 / 1.5 - 1)               # shown, never judged
    assert not result.regressed


def test_uneven_trial_counts() -> None:
    base = make_record(trials=5, noise=0.02, seed=1)
    now = make_record(trials=1, noise=0.02, seed=2, slowdown=1.3)
    m = compare_records(base, now).level(32).get("throughput")
    assert (m.n_baseline, m.n_now) == (5, 1) and m.status == REGRESSED


# ---- invalid and missing levels ------------------------------------------------------------

def test_client_bound_level_is_invalid_not_compared() -> None:
    now = exact(slowdown=1.5, client_bound=[128])
    result = compare_records(exact(), now)
    lv = result.level(128)
    assert lv.status == INVALID and "client-bound" in lv.note and "this run" in lv.note
    assert lv.get("throughput").status == INVALID
    assert lv.get("throughput").now is not None            # shown for context
    assert result.level(64).get("throughput").status == REGRESSED


def test_loop_lag_only_client_bound_keeps_throughput_comparable() -> None:
    # Late wake-ups blur latencies, but requests left on time: throughput is still the server's.
    now = exact(slowdown=1.5, client_bound=[128])
    for lv in now["levels"]:
        if lv["concurrency"] == 128:
            for t in lv["trials"]:
                t["queue_ms"] = {**t["queue_ms"], "mean": 0.0}
    lv = compare_records(exact(), now).level(128)
    assert lv.get("throughput").status == REGRESSED
    assert lv.get("ttft_p99").status == INVALID and "client-bound" in lv.note


def test_client_bound_baseline_level_is_invalid() -> None:
    result = compare_records(exact(client_bound=[1]), exact())
    assert result.level(1).status == INVALID and result.level(1).note.startswith("baseline: client-bound")


def test_level_with_errors_is_invalid_and_error_rate_regresses() -> None:
    result = compare_records(exact(), exact(failed={32: 5}))
    lv = result.level(32)
    assert lv.get("throughput").status == INVALID and "had errors" in lv.note
    err = lv.get("error_rate")
    assert err.status == REGRESSED and err.change == pytest.approx(5 / 500)
    assert "error_rate regressed at c=32: baseline 0.00%, now 1.00%" in err.message
    assert lv.status == REGRESSED and result.regressed


def test_error_rate_limit() -> None:
    tol = parse_tolerances("error_rate=2%")
    result = compare_records(exact(), exact(failed={32: 5}), tol, max_error_rate=0.05)
    lv = result.level(32)
    assert lv.get("error_rate").status == OK
    assert lv.get("throughput").status == OK   # 1 % errors tolerated by max_error_rate 5 %


def test_unmeasured_level_is_invalid() -> None:
    now = exact()
    now["levels"][2].update(metrics=None, trials=[],
                            verdict={"status": "error", "problems": ["dp3 c=32: server died"], "notes": []})
    lv = compare_records(exact(), now).level(32)
    assert lv.status == INVALID and "not measured (dp3 c=32: server died)" in lv.note


def test_missing_levels_both_ways() -> None:
    result = compare_records(exact(levels=(1, 8, 32)), exact(levels=(8, 32, 64)))
    assert result.level(1).status == MISSING and "not measured in this run" in result.level(1).note
    assert result.level(64).status == MISSING and "no baseline" in result.level(64).note
    assert result.level(8).status == OK


def test_old_records_without_trials_use_metrics() -> None:
    base, now = exact(), exact(slowdown=1.3)
    for rec in (base, now):
        for lv in rec["levels"]:
            lv.pop("trials")
    assert compare_records(base, now).level(8).get("throughput").status == REGRESSED


def test_terminal_lines() -> None:
    result = compare_records(exact(), exact(slowdown=1.2, client_bound=[1]), baseline_path="results/baselines/x.json")
    now = exact(slowdown=1.2, client_bound=[1], floors={64: 5_500})
    lines = comparison_lines(result, now)
    assert lines[0].startswith("dp3 (TP=1 x DP=3 replicas) · engine vllm 0.11.0 · workload default")
    assert lines[1].startswith("  vs baseline results/baselines/x.json (engine vllm 0.11.0")
    assert lines[1].endswith("REGRESSED")
    header = lines[2].split()
    assert header[:4] == ["conc", "output", "tok/s", "baseline"]
    row64 = next(ln for ln in lines if ln.split()[:1] == ["64"])
    assert "-16.7% !" in row64 and row64.split()[-3:] == ["5,500", "pass", "regressed"]
    assert any(ln.strip().startswith("output_tok_s regressed at c=64") for ln in lines)
    assert any("c=1 invalid: this run: client-bound" in ln for ln in lines)
    assert len(comparison_lines(result, verbose=True)) > len(lines)


def test_to_dict_is_json_safe() -> None:
    import json
    result = compare_records(make_record(seed=1), make_record(seed=2, failed={8: 1}))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["topology"] == "dp3" and data["levels"][0]["metrics"][0]["metric"] == "output_tok_s"


def test_a_much_noisier_level_keeps_its_own_noise() -> None:
    noise = {1: 0.30, 8: 0.01, 32: 0.01, 64: 0.01, 128: 0.01, 256: 0.01}
    base, now = make_record(noise=noise, seed=20), make_record(noise=noise, seed=21, slowdown=1.1)
    result = compare_records(base, now)
    assert "own noise at c=1" in result.noise_source
    assert result.level(1).get("throughput").noise > 0.2          # not hidden in the quiet pool
    for c in (8, 32, 64, 128, 256):                              # the quiet levels are not drowned
        m = result.level(c).get("throughput")
        assert m.noise < 0.05 and m.status == REGRESSED


# ---- the whole sweep -----------------------------------------------------------------------

def test_single_trials_a_uniform_9_percent_slowdown_is_caught_across_the_sweep() -> None:
    # one trial a side: each level's band (its own ±3 %) is wider than the change,
    # but six levels all 9.1 % slower leave no doubt
    result = compare_records(exact(trials=1, within=0.03), exact(trials=1, slowdown=1.1, within=0.03))
    per_level = [lv.get("throughput") for lv in result.levels]
    assert all(m.status == OK and "within the noise" in m.message for m in per_level)
    [sweep] = result.sweep
    assert sweep.status == REGRESSED and sweep.change == pytest.approx(1 / 1.1 - 1)
    assert sweep.concurrency == SWEEP and sweep.noise < per_level[0].noise / 2
    assert result.regressed and result.status == REGRESSED
    assert "output_tok_s regressed across the sweep: -9.1% on average over 6 levels" in sweep.message
    assert any("across the sweep" in line for line in comparison_lines(result))
    assert result.to_dict()["sweep"][0]["status"] == REGRESSED


def test_sweep_ok_when_unchanged_and_skips_invalid_levels() -> None:
    result = compare_records(exact(trials=1), exact(trials=1))
    assert [m.status for m in result.sweep] == [OK]
    # a client-bound level is not comparable, so it is not in the sweep's mean either
    slow_one = exact(trials=1, slowdown={1: 2.0}, client_bound=[1])
    [sweep] = compare_records(exact(trials=1), slow_one).sweep
    assert sweep.status == OK and "c=1," not in sweep.message


def test_no_sweep_comparison_with_fewer_than_three_comparable_levels() -> None:
    result = compare_records(exact(levels=(1, 8)), exact(levels=(1, 8), slowdown=1.1))
    assert result.sweep == []


def test_front_end_bound_level_keeps_its_own_noise_and_stays_out_of_the_sweep() -> None:
    # On an H200 the level where vLLM's API server saturated scattered 9.6 % from trial to
    # trial against 1.4 % where the GPU set the pace; pooled, it made a -24 % false alarm.
    def mark(rec):
        for t in next(lv for lv in rec["levels"] if lv["concurrency"] == 256)["trials"]:
            t["front_end_bound"] = True
        return rec
    base = mark(make_record(noise={256: 0.10}, seed=3))
    now = mark(make_record(trials=1, noise={256: 0.10}, seed=4, slowdown={256: 1.3}))
    result = compare_records(base, now)
    fe = result.level(256).get("throughput")
    quiet = result.level(64).get("throughput")
    assert fe.noise > 3 * quiet.noise                   # its own, wider band
    assert "own noise at c=256" in result.noise_source
    [sweep] = result.sweep
    assert "256" not in sweep.message.split("(c=")[1].split(")")[0].split(",")


def test_a_differently_defined_workload_is_not_compared_and_a_changed_flag_is_named() -> None:
    base, now = exact(), exact(slowdown=1.3)
    base["workload"] = {"name": "default", "input_tokens": 128, "output_tokens": 256}   # counted requests
    now["workload"] = {"name": "default", "input_tokens": 128, "output_tokens": 256, "measure": "steady"}
    result = compare_records(base, now)
    assert {lv.status for lv in result.levels} == {INVALID} and not result.regressed
    assert "workload measure: 'count' (baseline) vs 'steady' (this run)" in result.level(8).note
    assert any("defined differently: workload measure" in ln for ln in comparison_lines(result))

    base, now = exact(), exact(slowdown=1.3)
    base["topology"]["vllm_args"] = ["--load-format", "dummy"]
    now["topology"]["vllm_args"] = ["--no-async-scheduling", "--load-format", "dummy"]
    result = compare_records(base, now)
    assert result.regressed           # a changed serve flag is what the gate is for
    assert result.definition_differences == [
        "topology vllm_args: ['--load-format', 'dummy'] (baseline) vs "
        "['--no-async-scheduling', '--load-format', 'dummy'] (this run)"]
