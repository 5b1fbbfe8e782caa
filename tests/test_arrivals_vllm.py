"""Open-loop levels and non-streaming requests on the CPU build of vLLM (skipped without it; see test_vllm_real)."""

from __future__ import annotations

import json
import shlex
import textwrap
from pathlib import Path

import pytest

from pytest_mm27.loadgen import Percentiles
from pytest_mm27.records.samples import latency_percentiles, read_samples

from test_vllm_real import SUITE, assert_clean_teardown, clean_host, one_vllm_at_a_time, vllm  # noqa: F401

pytestmark = [pytest.mark.xdist_group("vllm")]

OPEN = textwrap.dedent("""\
    name = "tiny-open"
    input_tokens = 64
    output_tokens = 32
    warmup_requests = 2
    request_timeout_s = 120
    stream = {stream}
    [arrival]
    kind = "poisson"
    rates = [1, 4]
    requests = 12
    max_concurrency = 8
    [slo]
    ttft_ms = 60000
    e2el_ms = 120000
    """)


def run(pytester: pytest.Pytester, vllm: list[str], stream: str = "true") -> pytest.RunResult:  # noqa: F811
    pytester.makepyfile(test_throughput=SUITE)
    (pytester.path / "workloads").mkdir()
    (pytester.path / "workloads" / "tiny-open.toml").write_text(OPEN.format(stream=stream))
    return pytester.runpytest_subprocess(
        "--engine", "vllm", f"--vllm={shlex.join(vllm)}", "--topology", "tiny-tp1", "--workload-dir", "workloads",
        "--workload", "tiny-open", "--results-dir", "results", "-v", "-p", "no:cacheprovider", timeout=420)


def records(pytester: pytest.Pytester) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(pytester.path.glob("results/runs/*/*.json"))}


def test_open_loop_rate_levels_on_vllm(no_leftovers, clean_host):  # noqa: F811
    pytester, vllm = no_leftovers, clean_host
    result = run(pytester, vllm)
    result.stdout.fnmatch_lines(["*test_throughput?tiny-tp1-r1? PASSED*", "*test_throughput?tiny-tp1-r4? PASSED*"])
    recs = records(pytester)
    assert set(recs) == {"tiny-tp1--tiny-open_rate=1_", "tiny-tp1--tiny-open_rate=4_"}
    for rate, rec in zip((1, 4), (recs["tiny-tp1--tiny-open_rate=1_"], recs["tiny-tp1--tiny-open_rate=4_"])):
        level = rec["levels"][0]
        m = level["metrics"]
        assert m["arrival"] == f"poisson {rate}/s" and m["offered_rate"] == rate and level["concurrency"] == 8
        assert (m["requests"], m["failed"]) == (12, 0) and m["output_tokens"] == 12 * 32
        assert m["server_tokens_match"] is True, m["server_output_tokens"]
        assert m["slo_attainment"] == 1.0 and m["goodput_tok_s"] == pytest.approx(m["output_tok_s"])
        assert 1 <= m["max_in_flight"] <= 8 and m["schedule_lag_ms"]["n"] == 12
        run_dir = next(pytester.path.glob("results/runs/*"))
        header, samples = read_samples(run_dir / level["trials"][0]["samples"])
        back = latency_percentiles([s.record for s in samples if s.measured])
        assert back["ttft_ms"] == Percentiles.from_dict(m["ttft_ms"])
        assert_clean_teardown(rec)


def test_non_streaming_requests_on_vllm(no_leftovers, clean_host):  # noqa: F811
    pytester, vllm = no_leftovers, clean_host
    result = run(pytester, vllm, stream="false")
    result.assert_outcomes(passed=2)
    for rec in records(pytester).values():
        m = rec["levels"][0]["metrics"]
        assert m["failed"] == 0 and m["output_tokens"] == 12 * 32
        assert m["ttft_ms"] == m["e2el_ms"] and m["tpot_ms"]["n"] == 0
