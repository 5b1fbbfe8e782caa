"""Change points and the history gate on synthetic series: placement, direction, drift, messages."""

from __future__ import annotations

import math
import random

import pytest

from pytest_mm27.history.changepoints import find_change_points, regression_chain, robust_sigma, welch
from pytest_mm27.history.gate import history_gate, judge_values
from pytest_mm27.history.report import markdown_history, plot_history, terminal_history
from pytest_mm27.history.series import Point, RunInfo, SeriesKey


def noisy(true: list[float], noise: float = 0.03, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [v * math.exp(rng.gauss(0, noise)) for v in true]


def step(at: int, n: int = 60, factor: float = 0.9, noise: float = 0.03, seed: int = 0) -> list[float]:
    return noisy([1000.0 if i < at else 1000.0 * factor for i in range(n)], noise, seed)


def runs(n: int) -> list[RunInfo]:
    return [RunInfo(f"night-{i}", "h200", "dp3", "default", git_commit=f"{i:02d}" * 20, engine="vllm",
                    engine_version=f"0.{10 + i // 30}.0", created_at=f"2025-01-01T{i % 24:02d}:00") for i in range(n)]


KEY = SeriesKey("h200", "dp3", "default", 16, "", "throughput")
TTFT = SeriesKey("h200", "dp3", "default", 16, "", "ttft_p99")


@pytest.mark.parametrize("seed", range(8))
def test_flat_series_has_no_change_point(seed: int) -> None:
    assert find_change_points(noisy([1000.0] * 60, seed=seed), higher_is_better=True) == []


@pytest.mark.parametrize("at,seed", [(10, 1), (30, 2), (45, 3), (52, 4)])
def test_step_found_at_its_run(at: int, seed: int) -> None:
    cps = find_change_points(step(at, seed=seed), higher_is_better=True)
    assert len(cps) == 1
    assert abs(cps[0].index - at) <= 1
    assert cps[0].regression
    assert cps[0].shift.low < 0.9 < cps[0].shift.high or abs(cps[0].shift.ratio - 0.9) < 0.03


def test_direction_latency_up_is_a_regression_and_down_an_improvement() -> None:
    up = find_change_points(step(30, factor=1.12, seed=5), higher_is_better=False)
    down = find_change_points(step(30, factor=0.88, seed=5), higher_is_better=False)
    assert [c.regression for c in up] == [True]
    assert [c.regression for c in down] == [False]
    faster = find_change_points(step(30, factor=1.12, seed=5), higher_is_better=True)
    assert [c.regression for c in faster] == [False]


def test_short_constant_and_bad_series() -> None:
    assert find_change_points([1.0, 2.0, 3.0, 4.0, 5.0], higher_is_better=True) == []
    assert find_change_points([5.0] * 20, higher_is_better=True) == []
    exact = find_change_points([5.0] * 10 + [4.0] * 10, higher_is_better=True)
    assert [(c.index, round(c.shift.ratio, 6), c.shift.p_value) for c in exact] == [(10, 0.8, 0.0)]
    with pytest.raises(ValueError, match="value 2 of the series is 0.0"):
        find_change_points([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], higher_is_better=True)


def test_robust_sigma_ignores_a_step() -> None:
    values = [math.log(v) for v in step(30, factor=0.5, noise=0.02, seed=9)]
    assert 0.014 < robust_sigma(values) < 0.03


def test_welch_interval_covers_the_truth() -> None:
    rng = random.Random(3)
    a = [rng.gauss(0.0, 0.03) for _ in range(30)]
    b = [rng.gauss(math.log(0.9), 0.03) for _ in range(30)]
    s = welch(a, b)
    assert s.low < 0.9 < s.high and s.p_value < 1e-10 and (s.n_before, s.n_after) == (30, 30)


def test_gate_message_names_first_bad_run_commit_version_and_interval() -> None:
    values = step(40, factor=0.85, seed=11)
    info = runs(60)
    v = judge_values(KEY, info, values, find_change_points(values, higher_is_better=True), 0.05)
    assert v.failed
    assert v.first_bad is not None and v.first_bad.run_id in ("night-39", "night-40", "night-41")
    msg = v.message()
    assert msg.startswith("history: h200/dp3/default c=16 throughput regressed -1")
    assert f"first bad run {v.first_bad.run_id} (commit {v.first_bad.git_commit[:12]}, vllm 0.11.0" in msg
    assert "(95% interval, p" in msg and "tolerance 5%" in msg and "slower" in msg
    low, high = v.shift.low - 1, v.shift.high - 1
    assert f"[{low:+.1%}, {high:+.1%}]" in msg


def test_shift_within_tolerance_is_found_but_passes() -> None:
    values = step(30, factor=0.97, noise=0.004, seed=2)
    v = judge_values(KEY, runs(60), values, find_change_points(values, higher_is_better=True), 0.05)
    assert len(v.change_points) == 1 and v.shift is not None
    assert not v.failed and "shifted (within tolerance)" in v.message()


def test_improvement_then_nothing_passes() -> None:
    values = step(30, factor=1.2, seed=4)
    v = judge_values(KEY, runs(60), values, find_change_points(values, higher_is_better=True), 0.05)
    assert v.change_points and not v.failed and v.shift is None


def test_recovered_regression_passes() -> None:
    true = [1000.0] * 20 + [850.0] * 20 + [1000.0] * 20
    values = noisy(true, seed=6)
    cps = find_change_points(values, higher_is_better=True)
    assert [c.regression for c in cps] == [True, False]
    assert not judge_values(KEY, runs(60), values, cps, 0.05).failed


def test_drift_staircase_is_judged_from_before_its_first_step() -> None:
    per_night = 0.99 ** (1 / 7)
    true = [1000.0] * 20 + [1000.0 * per_night ** i for i in range(1, 71)]
    values = noisy(true, noise=0.01, seed=8)
    cps = find_change_points(values, higher_is_better=True)
    chain = regression_chain(cps)
    assert len(chain) >= 2 and all(c.regression for c in chain)
    v = judge_values(KEY, runs(90), values, cps, 0.05)
    assert v.failed
    assert v.shift.ratio < min(c.shift.ratio for c in chain)        # more than any one step
    assert v.first_bad == runs(90)[chain[0].index]


def series_of(values: list[float], key: SeriesKey = KEY, valid: bool = True) -> list[tuple[RunInfo, Point]]:
    return [(r, Point(key.concurrency, key.case, key.metric, v, v, v, 1, valid)) for r, v in zip(runs(len(values)),
                                                                                             values)]


def test_history_gate_judges_only_the_sessions_groups_and_valid_points() -> None:
    bad = step(40, factor=0.8, seed=12)
    other = SeriesKey("h200", "tp4", "default", 16, "", "throughput")
    series = {KEY: series_of(bad), other: series_of(bad, other),
              TTFT: series_of(step(40, factor=1.3, seed=13), TTFT)}
    verdicts = history_gate(series, None, {("h200", "dp3", "default")})
    assert {v.key for v in verdicts} == {KEY, TTFT}
    assert all(v.failed for v in verdicts)
    ttft = next(v for v in verdicts if v.key == TTFT)
    assert "ttft_p99 regressed +" in ttft.message() and "higher" in ttft.message() and "tolerance 10%" in ttft.message()
    # a tolerance past the shift lets it through
    assert not any(v.failed for v in history_gate(series, {"throughput": 0.3, "ttft_p99": 0.5},
                                                  {("h200", "dp3", "default")}))
    # invalid points are never judged
    invalid = {KEY: series_of(bad[:40]) + series_of(bad, valid=False)[40:]}
    assert not history_gate(invalid)[0].failed


def test_reports_mark_change_points(tmp_path) -> None:
    series = {KEY: series_of(step(40, factor=0.8, seed=12)), TTFT: series_of(noisy([50.0] * 60, seed=1), TTFT)}
    md = markdown_history(series, None, last=5)
    assert "### h200 / dp3 / default — last 5 run(s)" in md and "| tok/s c=16 |" in md
    assert "c=16 throughput: newest change point a regression of -" in md and "FAILS the history gate" in md
    text = terminal_history(series, None, last=30)
    assert any("▼" in line for line in text)            # the first bad run is in the last 30
    pytest.importorskip("matplotlib")
    paths = plot_history(series, None, tmp_path)
    assert sorted(p.name for p in paths) == ["history-h200--dp3--default-throughput.png",
                                             "history-h200--dp3--default-ttft_p99.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_accuracy_benchmark_prints_every_rate(capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_mm27.benchmarks.history_accuracy import main, wilson

    assert main(["--series", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    for needle in ("step found at its night +-1 (goal >= 95%):", "false change points per 100 series (goal < 1):",
                   "drift flagged within 4 weeks of passing 5%", "(3/3)"):
        assert needle in out
    lo, hi = wilson(95, 100)
    assert 0.88 < lo < 0.95 < hi < 0.98
