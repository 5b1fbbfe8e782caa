"""Unit tests of the simulator's physical step model and memory model."""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from pytest_mm27.sim.cluster import setup_for
from pytest_mm27.sim.perf import PerfModel, StepShape, distinct_experts
from pytest_mm27.sim.scheduler import EngineCore as Engine, Seq
from pytest_mm27.sim.specs import GIB, Calibration, load_hardware, load_model

NVFP4 = "minimax-m2.7-nvfp4"
FP8 = "minimax-m2.7-fp8"


def test_distinct_experts_formula():
    E, k = 256, 8
    assert distinct_experts(E, k, 0) == 0
    assert distinct_experts(E, k, 1) == pytest.approx(k)
    assert distinct_experts(E, k, 64) == pytest.approx(E * (1 - (1 - k / E) ** 64))
    assert distinct_experts(E, k, 64) == pytest.approx(222.4, abs=0.1)
    assert distinct_experts(E, k, 10_000) == pytest.approx(E)


@given(st.integers(1, 4096), st.floats(0.0, 2.0))
def test_distinct_experts_bounded_and_monotone(tokens, skew):
    d = distinct_experts(256, 8, tokens, skew)
    assert 0 < d <= 256 + 1e-9
    assert distinct_experts(256, 8, tokens + 1, skew) >= d - 1e-9
    # skewed routing never touches more experts than uniform routing
    assert d <= distinct_experts(256, 8, tokens) + 1e-9


def test_minimax_parameter_counts_match_model_card():
    m = load_model(NVFP4)
    assert m.total_params / 1e9 == pytest.approx(230, rel=0.02)
    assert m.active_params / 1e9 == pytest.approx(10.4, rel=0.05)
    # K and V, 62 layers x 8 heads x 128 dims, bf16
    assert m.kv_bytes_per_token(1) == 62 * 2 * 8 * 128 * 2
    assert m.kv_bytes_per_token(2) == m.kv_bytes_per_token(1) / 2
    assert m.kv_bytes_per_token(16) == m.kv_bytes_per_token(8)   # a KV head is replicated, not split


def _perf(model=NVFP4, hw="rtx-pro-6000", tp=2, **cal):
    base = dict(bandwidth_efficiency=1.0, nvfp4_bandwidth_factor=1.0, compute_efficiency=1.0,
                step_overhead_ms=0.0, per_seq_overhead_us=0.0, routing_skew=0.0)
    c = replace(Calibration(), **{**base, **cal})
    return PerfModel(load_hardware(hw), load_model(model), c, tp)


def test_weight_bytes_of_a_decode_step():
    perf = _perf(tp=2)
    m, hw = perf.model, perf.hw
    bw = hw.memory_bandwidth_gbs * 1e9
    one = perf.cost(StepShape(tokens=1, seqs=1, sampled=1, kv_tokens=0, attn_pairs=0))
    dense = m.num_layers * (m.attention_params * 2 + m.router_params * 2) + m.lm_head_params * 2
    experts = m.num_layers * 8 * m.expert_params * 0.5625
    assert one.weights == pytest.approx((dense + experts) / 2 / bw)
    # a batch of 64 reads the experts it touches (~222 of 256), not 64 x top-8 and not all
    b64 = perf.cost(StepShape(tokens=64, seqs=64, sampled=64, kv_tokens=0, attn_pairs=0))
    touched = 256 * (1 - (1 - 8 / 256) ** 64)
    assert b64.weights == pytest.approx((dense + experts / 8 * touched) / 2 / bw)
    # KV: every scheduled token's context is read once
    kv = perf.cost(StepShape(tokens=1, seqs=1, sampled=1, kv_tokens=1000, attn_pairs=0))
    assert kv.kv == pytest.approx(1000 * m.kv_bytes_per_token(2) / bw)


def test_tensor_parallel_allreduce():
    assert _perf(tp=1).cost(StepShape(8, 8, 8, 0, 0)).allreduce == 0
    p2 = _perf(tp=2)
    p4 = _perf(tp=4)
    m, hw = p2.model, p2.hw
    lat = hw.allreduce_latency_us * 1e-6
    per_call_bytes = 100 * m.hidden_size * 2
    want2 = 2 * m.num_layers * (lat + 1.0 * per_call_bytes / (hw.allreduce_bandwidth_gbs * 1e9))
    want4 = 2 * m.num_layers * (lat + 1.5 * per_call_bytes / (hw.allreduce_bandwidth_gbs * 1e9))
    assert p2.cost(StepShape(100, 1, 1, 0, 0)).allreduce == pytest.approx(want2)
    assert p4.cost(StepShape(100, 1, 1, 0, 0)).allreduce == pytest.approx(want4)
    # NVLink all-reduce is much cheaper than PCIe without P2P
    h = _perf(hw="h100-sxm", tp=4)
    assert h.cost(StepShape(100, 1, 1, 0, 0)).allreduce < p4.cost(StepShape(100, 1, 1, 0, 0)).allreduce / 3


def test_kv_capacity_and_fit():
    cal = Calibration(runtime_reserve_gib=8.0)
    perf = PerfModel(load_hardware("rtx-pro-6000"), load_model(NVFP4), cal, 2)
    fit = perf.memory(0.9)
    assert fit.fits
    weights = 126e9 / 2 / GIB
    kv_gib = 95.6 * 0.9 - 8.0 - weights
    assert fit.weights_gib_per_gpu == pytest.approx(weights)
    assert fit.kv_tokens == pytest.approx(kv_gib * GIB / perf.model.kv_bytes_per_token(2), abs=16)
    assert fit.kv_tokens % 16 == 0
    fp8 = PerfModel(load_hardware("rtx-pro-6000"), load_model(FP8), cal, 2).memory(0.9)
    assert not fp8.fits
    assert "exceed" in fp8.reason and "TP=2" in fp8.reason
    assert PerfModel(load_hardware("rtx-pro-6000"), load_model(FP8), cal, 4).memory(0.9).fits


def test_dense_model_reads_all_weights_every_step():
    perf = _perf(model="llama-3.1-8b", hw="h100-sxm", tp=1)
    c1 = perf.cost(StepShape(1, 1, 1, 0, 0))
    c64 = perf.cost(StepShape(64, 64, 64, 0, 0))
    assert c1.weights == pytest.approx(c64.weights)
    # every parameter but the input embedding (a row lookup) is read once per step
    assert c1.weights == pytest.approx((8.03e9 - 128256 * 4096) * 2 / 3350e9, rel=0.03)


def _engine(kv_tokens=4096, max_num_seqs=8, budget=512):
    setup = setup_for("rtx-pro-6000", NVFP4, 2, 1, max_num_seqs, 0.9, 2048)
    return Engine(0, setup.perf(), kv_tokens, max_num_seqs, budget, 16)


def _run(eng, seqs, limit=10_000):
    for s in seqs:
        eng.add(s)
    t = 0.0
    for _ in range(limit):
        plan = eng.schedule()
        if plan is None:
            break
        t += plan.duration
        eng.commit(plan, t)
    return t


def test_scheduler_chunked_prefill_and_exact_output():
    eng = _engine(budget=512)
    seqs = [Seq(i, 1000, 5, 0.0) for i in range(3)]
    _run(eng, seqs)
    assert all(s.done and s.generated == 5 for s in seqs)
    assert eng.generation_tokens == 15 and eng.prompt_tokens == 3000 and eng.success == 3
    assert eng.free_blocks == eng.total_blocks


def test_scheduler_respects_max_num_seqs_and_preempts_when_kv_is_full():
    eng = _engine(kv_tokens=16 * 40, max_num_seqs=4, budget=4096)    # 40 blocks = 640 tokens
    seqs = [Seq(i, 150, 100, 0.0) for i in range(6)]               # 250 tokens each at the end
    for s in seqs:
        eng.add(s)
    t, max_running = 0.0, 0
    while (plan := eng.schedule()) is not None:
        max_running = max(max_running, len(eng.running))
        t += plan.duration
        eng.commit(plan, t)
    assert max_running <= 4
    assert eng.preemptions > 0
    assert all(s.done and s.generated == 100 for s in seqs)
    assert eng.free_blocks == eng.total_blocks


# --- per-kernel floors (CUDA graphs vs eager) ---

def test_kernel_floors_graph_below_capture_size_eager_above():
    perf = _perf(model="small-llama-0.75b", hw="h200", tp=1, kernel_graph_us=3.0, kernel_eager_us=9.0,
                 cudagraph_max_tokens=512)
    graph = perf.cost(StepShape(512, 512, 512, 0, 0)).kernels
    eager = perf.cost(StepShape(513, 1, 1, 0, 0)).kernels
    assert graph > 0 and eager > 2.5 * graph
    # what the total says is the sum of its terms, on the scheduler's hot path too
    shape = StepShape(100, 10, 10, 2000, 0)
    assert perf.step_time(*shape.__dict__.values()) == pytest.approx(perf.cost(shape).total)


def test_kernel_floor_is_hidden_by_a_big_gemm_read_but_not_by_a_small_one():
    floor = 4.0
    big = _perf(model="llama-8b-shape", hw="h200", tp=1, kernel_graph_us=floor)
    m = big.model
    # 8B's four weight GEMMs each read for longer than 4 us: only the 6 other kernels pay the floor
    assert all(b / (4800e9) > floor * 1e-6 for b in m.layer_gemm_bytes())
    assert big.kernel_time(1) == pytest.approx(m.num_layers * (m.layer_kernels - 4) * floor * 1e-6)
    small = _perf(model="small-llama-0.75b", hw="h200", tp=1, kernel_graph_us=floor)
    s = small.model
    excess = sum(max(0.0, floor * 1e-6 - b / 4800e9) for b in s.layer_gemm_bytes())
    assert excess > 0
    assert small.kernel_time(1) == pytest.approx(s.num_layers * ((s.layer_kernels - 4) * floor * 1e-6 + excess))


def test_layer_kernel_counts_from_the_layer_type():
    assert load_model("llama-8b-shape").layer_kernels == 10
    assert load_model(NVFP4).layer_kernels == 16
    assert len(load_model(NVFP4).layer_gemm_bytes()) == 2       # the MoE's grouped GEMMs are batch-dependent


def test_a_random_router_routes_uniformly_a_trained_one_with_skew():
    trained = _perf(routing_skew=1.2)
    random_router = PerfModel(trained.hw, replace(trained.model, router="random"), trained.cal, 2)
    assert random_router.experts_touched(64) == pytest.approx(distinct_experts(256, 8, 64))
    assert trained.experts_touched(64) < random_router.experts_touched(64) - 20


def test_model_file_rejects_an_unknown_router(tmp_path):
    from pytest_mm27.errors import ConfigError
    from pytest_mm27.sim.specs import parse_model
    src = (Path(__file__).resolve().parent.parent / "fixtures" / "models" / "small-llama-0.75b.toml").read_text()
    bad = tmp_path / "m.toml"
    bad.write_text(src + 'router = "learned"\n')
    with pytest.raises(ConfigError, match=r"m\.toml.*router"):
        parse_model(bad)


# --- pipeline parallel and nodes ---

def test_pipeline_stages_split_weights_and_kv_per_gpu_and_run_micro_batches():
    one = setup_for("rtx-pro-6000", NVFP4, 2, 1, 256, 0.9, 4096)
    two = one.with_(pp=2)
    f1, f2 = one.memory(), two.memory()
    assert f2.weights_gib_per_gpu == pytest.approx(f1.weights_gib_per_gpu / 2)
    assert f2.kv_tokens > 2 * f1.kv_tokens          # half the weights and half the layers' KV per GPU
    engines = two.with_(dp=3).build_engines()
    assert len(engines) == 6 and all(e.max_num_seqs == 128 for e in engines)
    # a micro-batch passes every stage: same model time, plus one hop over the box's link
    shape = StepShape(64, 64, 64, 0, 0)
    extra = two.perf().cost(shape).allreduce - one.perf().cost(shape).allreduce
    hw = one.hardware
    assert extra == pytest.approx(hw.allreduce_latency_us * 1e-6 + 64 * 3072 * 2 / (hw.allreduce_bandwidth_gbs * 1e9))


def test_stage_boundaries_on_node_boundaries_go_over_the_network():
    base = setup_for("h200", "llama-8b-shape", 4, 1, 256, 0.9, 4096, gpus_per_node=8)
    assert base.with_(pp=2).placement() == (0, 0)       # 8 GPUs: one node
    assert base.with_(pp=4).placement() == (1, 0)       # stage 2 starts on node 2
    assert base.with_(tp=16).placement() == (0, 8)      # TP over two nodes, 8 GPUs sharing each NIC set
    near, far = base.with_(pp=2).perf(), base.with_(pp=4).perf()
    shape = StepShape(32, 32, 32, 0, 0)
    net = base.hardware.network
    local = base.hardware.allreduce_latency_us * 1e-6 + 32 * 4096 * 2 / (base.hardware.allreduce_bandwidth_gbs * 1e9)
    over = net.latency_us * 1e-6 + 32 * 4096 * 2 / (net.bandwidth_gbs * 1e9)
    assert far.cost(shape).allreduce - near.cost(shape).allreduce == pytest.approx(local + over)


def test_crossing_nodes_needs_a_network_table():
    from pytest_mm27.errors import ConfigError
    s = setup_for("h100-sxm", "llama-8b-shape", 1, 1, 256, 0.9, 4096, gpus_per_node=1)
    assert s.hardware.network is None
    s.perf()                                            # one GPU: nothing crosses
    with pytest.raises(ConfigError, match="no \\[network\\] table"):
        s.with_(pp=2).perf()


def test_hardware_network_table_is_checked(tmp_path):
    from pytest_mm27.errors import ConfigError
    from pytest_mm27.sim.specs import parse_hardware
    src = (Path(__file__).resolve().parent.parent / "fixtures" / "hardware" / "h100-sxm.toml").read_text()
    bad = tmp_path / "hw.toml"
    bad.write_text(src + '\n[network]\nkind = "ib"\nlatency_us = 5\n')
    with pytest.raises(ConfigError, match=r"hw\.toml.*bandwidth_gbs"):
        parse_hardware(bad)
    good = tmp_path / "ok.toml"
    good.write_text(src + '\n[network]\nkind = "ib"\nlatency_us = 5\nbandwidth_gbs = 400\n')
    assert parse_hardware(good).network.bandwidth_gbs == 400
