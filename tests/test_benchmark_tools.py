"""The benchmark scripts' own arithmetic: paired client comparison, CPU shares, GuideLLM's report."""

from __future__ import annotations

import json
import math

from pytest_mm27.benchmarks.vllm_crosscheck import CpuSampler, paired
from pytest_mm27.loadgen.bench_client import Row, parse_guidellm


def test_paired_comparison_sees_a_steady_gap_through_drift():
    theirs = [1000.0, 2500.0, 700.0, 1800.0, 1200.0]          # the server drifts 3.5x between rounds
    line = paired("output tok/s", [v * 1.2 for v in theirs], theirs)
    assert "+20.0%" in line and line.endswith(": differ")
    noisy = paired("output tok/s", [1100.0, 2300.0, 800.0], [1000.0, 2500.0, 700.0])
    assert noisy.endswith("no significant difference")
    assert paired("TPOT", [1.0, 2.0], [1.0, 2.0]).endswith("too few rounds")


def test_cpu_shares_over_a_window():
    sampler = CpuSampler(server_pid=-1)
    # t, API server, engine, client CPU seconds (cumulative)
    sampler.samples = [(0.0, 0.0, 0.0, 0.0), (1.0, 0.2, 1.5, 0.1), (2.0, 0.5, 3.0, 0.2), (3.0, 0.6, 4.0, 0.2)]
    api, engine, client = sampler.shares(1.0, 2.0)
    assert (round(api, 6), round(engine, 6), round(client, 6)) == (0.3, 1.5, 0.1)
    assert all(math.isnan(x) for x in sampler.shares(5.0, 6.0))


def test_guidellm_report_is_read_from_its_json(tmp_path):
    report = tmp_path / "g.json"
    report.write_text(json.dumps({"benchmarks": [{"metrics": {
        "output_tokens_per_second": {"total": {"mean": 735.2}},
        "inter_token_latency_ms": {"successful": {"mean": 10.29}},
        "time_per_output_token_ms": {"successful": {"mean": 10.52}},   # includes TTFT: not used
        "time_to_first_token_ms": {"successful": {"median": 11.7}},
        "request_totals": {"errored": 2},
    }}]}))
    row = Row("guidellm", 8)
    parse_guidellm(report, row)
    assert (row.tok_s, row.tpot, row.ttft_p50, row.failed) == (735.2, 10.29, 11.7, 2)
    empty = Row("guidellm", 8)
    parse_guidellm(tmp_path / "missing.json", empty)
    assert math.isnan(empty.tok_s)
