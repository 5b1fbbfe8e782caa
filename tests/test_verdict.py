"""Level verdicts: errors past the limit, floors, client-bound levels."""

from pathlib import Path

from pytest_mm27.catalog.floors import Floor
from pytest_mm27.gate.verdict import FAIL, INVALID, PASS, judge_level

FLOOR = Floor("t", "w", 8, 1000.0, "test floor", Path("hw.toml"))


def metrics(tok_s=1200.0, requests=16, failed=0, client_bound=False, queue_ms=0.0, e2el_ms=1000.0):
    return {"concurrency": 8, "requests": requests, "ok": requests - failed, "failed": failed,
            "errors": {"HTTP 500: boom": failed} if failed else {}, "output_tok_s": tok_s,
            "client_bound": client_bound, "client_bound_reason": "loop lag" if client_bound else None,
            "queue_ms": {"mean": queue_ms}, "e2el_ms": {"mean": e2el_ms}}


def test_pass_above_floor():
    assert judge_level(metrics(), FLOOR, 0.0).status == PASS


def test_below_floor_fails_with_numbers():
    verdict = judge_level(metrics(tok_s=800), FLOOR, 0.0)
    assert verdict.status == FAIL
    assert "output tok/s 800 is below the floor 1,000 (20.0% short) at c=8" in verdict.message
    assert "test floor" in verdict.message


def test_errors_past_limit_fail_and_name_the_reason():
    verdict = judge_level(metrics(failed=2), FLOOR, 0.05)
    assert verdict.status == FAIL and "2 of 16 requests failed (12.5%, limit 5.0%)" in verdict.message
    assert "HTTP 500: boom" in verdict.message
    assert judge_level(metrics(failed=2), FLOOR, 0.2).status == PASS


def test_all_failed():
    verdict = judge_level(metrics(failed=16), None, 0.5)
    assert verdict.status == FAIL and "no request succeeded" in verdict.message


def test_client_bound_small_miss_is_not_gated():
    verdict = judge_level(metrics(tok_s=960, client_bound=True, queue_ms=10), FLOOR, 0.0)
    assert verdict.status == INVALID and "not gated" in verdict.message


def test_client_bound_cannot_explain_a_large_miss():
    verdict = judge_level(metrics(tok_s=500, client_bound=True, queue_ms=10), FLOOR, 0.0)
    assert verdict.status == FAIL
    assert any("can explain at most" in n for n in verdict.notes)


def test_no_floor_is_noted():
    verdict = judge_level(metrics(), None, 0.0)
    assert verdict.status == PASS and verdict.notes == ("no floor for this level",)


def test_miss_inside_the_simulators_own_error_is_inconclusive():
    # the simulator predicts 4.4% below the published figure here: a 2% miss says nothing
    verdict = judge_level(metrics(tok_s=980), FLOOR, 0.0, model_error=-0.044)
    assert verdict.status == INVALID and "simulator's own error" in verdict.message
    assert verdict.tag == "within sim error" and verdict.to_dict()["tag"] == "within sim error"
    # a miss larger than that error, or any miss where the model over-predicts, fails
    assert judge_level(metrics(tok_s=900), FLOOR, 0.0, model_error=-0.044).status == FAIL
    assert judge_level(metrics(tok_s=980), FLOOR, 0.0, model_error=+0.02).status == FAIL
