"""The arrival benchmarks run end to end at small sizes (their figures are not judged here)."""

from __future__ import annotations

from pytest_mm27.benchmarks import arrival_accuracy
from pytest_mm27.benchmarks.vllm_rate_crosscheck import table


def test_arrival_accuracy_prints_a_floor_and_an_open_loop_row_per_rate(capsys):
    assert arrival_accuracy.main(["--rates", "20,50", "--duration", "0.5", "--server", "python", "--no-pin"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.strip().startswith(("timer floor", "open loop"))]
    assert [r[0] for r in rows] == ["timer", "open", "timer", "open"]
    # offered, drawn; then the open loop's sent and done rates are figures, the floor's are not
    assert rows[0][2] == "20" and rows[0][3] == rows[1][3] and rows[0][4] == "-" and float(rows[1][4]) > 0
    assert rows[2][2] == "50"


def test_rate_crosscheck_table_diffs_against_vllm_bench():
    row = {"tok_s": 100.0, "sent": 2.0, "tok_per_req": 50.0, "ttft_p50": 10.0, "ttft_mean": 10.0, "tpot_p50": 1.0,
           "tpot_mean": 1.0, "e2el_p50": 40.0, "e2el_mean": 40.0, "failed": 0}
    text = table({2.0: {"theirs": [row], "replay": [{**row, "tok_s": 105.0}], "poisson": [{**row, "sent": 1.5}]}})
    [tok] = [line for line in text.splitlines() if "output tok/s" in line]
    [sent] = [line for line in text.splitlines() if "sent req/s" in line]
    assert tok.split()[-4:] == ["105.00", "+5.0%", "100.00", "+0.0%"]
    assert sent.split()[-4:] == ["2.000", "+0.0%", "1.500", "-25.0%"]
