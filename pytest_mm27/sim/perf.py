"""The physical model of one engine step (one forward pass of a continuous batch).

Every term is per GPU of one tensor-parallel group, because the TP ranks work
in lock-step and the step takes as long as one rank's share:

    step = host overhead + per-seq overhead x seqs
         (+ pipeline hops: a micro-batch passes every stage, PP = p runs p of them at once)
         + layers x kernels per layer x per-kernel cost (CUDA graph or eager)
         + (weight bytes + KV bytes) / achieved bandwidth
         + FLOPs / achieved tensor throughput
         + all-reduces (latency + bytes / bus bandwidth)

Memory and compute terms are added, not overlapped: a decode step alternates
memory-bound GEMV / small grouped-GEMM kernels with compute-bound ones, and the
measured curves on these GPUs do not show the overlap a roofline max() assumes.

The kernel term is what a small model's decode step is made of: on an H200 a
0.75 B Llama reads its weights in ~0.35 ms, yet a step takes ~1.9 ms. Each
kernel costs a floor (launch gap and a minimum runtime) that does not shrink
with the model; CUDA graphs (vLLM captures batches up to
``cudagraph_max_tokens``) cut the launch part, so steps larger than that,
prefill chunks mostly, pay the eager rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigError
from .specs import BYTES_PER_PARAM, GIB, Calibration, HardwareProfile, ModelSpec


@lru_cache(maxsize=64)
def _expert_popularity(num_experts: int, top_k: int, skew: float) -> tuple[float, ...]:
    """Per-expert probability that one token is routed to it (sums to top_k).

    skew = 0 is uniform routing (p = k/E). skew > 0 is a Zipf-shaped popularity,
    the usual picture of real routers: a few hot experts, a long tail.
    """
    if skew <= 0.0:
        return (top_k / num_experts,) * num_experts
    w = [(i + 1) ** -skew for i in range(num_experts)]
    scale = top_k / sum(w)
    p = [min(1.0, x * scale) for x in w]
    return tuple(p)


def distinct_experts(num_experts: int, top_k: int, tokens: int, skew: float = 0.0) -> float:
    """Expected number of distinct experts a batch of ``tokens`` tokens touches in one layer.

    Uniform routing: E * (1 - (1 - k/E)^B). Each expert is read from memory once
    per step however many of the batch's tokens it serves, so this, not top-k and
    not all E, sets the bytes a MoE decode step reads.
    """
    if tokens <= 0 or num_experts <= 0:
        return 0.0
    if skew <= 0.0:
        return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)
    return sum(1.0 - (1.0 - p) ** tokens for p in _expert_popularity(num_experts, top_k, skew))


@dataclass(frozen=True)
class StepShape:
    """What one scheduled step computes."""

    tokens: int          # all tokens in the step (decode + prefill chunks)
    seqs: int            # sequences scheduled
    sampled: int         # sequences that sample a token this step (lm_head rows)
    kv_tokens: int       # sum over sequences of the context attended to (KV read)
    attn_pairs: float    # query x key pairs of prefill chunks (attention FLOPs)


@dataclass(frozen=True)
class StepCost:
    """A step's time split into its terms (seconds), for explanations and tests."""

    overhead: float
    kernels: float
    weights: float
    kv: float
    compute: float
    allreduce: float

    @property
    def total(self) -> float:
        return self.overhead + self.kernels + self.weights + self.kv + self.compute + self.allreduce


@dataclass(frozen=True)
class MemoryFit:
    fits: bool
    weights_gib_per_gpu: float
    usable_gib_per_gpu: float       # memory * utilization - runtime reserve
    kv_gib_per_gpu: float
    kv_tokens: int                  # KV-cache capacity of one engine, tokens
    reason: str


class PerfModel:
    """Step time and memory for one model on one engine (TP group) of one hardware profile."""

    def __init__(self, hw: HardwareProfile, model: ModelSpec, cal: Calibration, tp: int,
                 slowdown: float = 1.0, pp: int = 1, net_hops: int = 0, tp_over_network: int = 0):
        """``net_hops``: pipeline stage boundaries that cross nodes; ``tp_over_network``: the TP
        group spans nodes, this many GPUs per node sharing its network (0: it does not).
        Both need the hardware profile's [network]."""
        self.hw, self.model, self.cal, self.tp, self.pp = hw, model, cal, tp, pp
        self.slowdown = slowdown
        net = hw.network
        if (net_hops or tp_over_network) and net is None:
            raise ConfigError(f"hardware profile {hw.name!r} has no [network] table, so the simulator "
                              "cannot place a TP group or pipeline stage across nodes")
        m = model
        bw = hw.memory_bandwidth_gbs * 1e9 * cal.bandwidth_efficiency
        exp_bytes = BYTES_PER_PARAM[m.expert_dtype]
        exp_factor = cal.nvfp4_bandwidth_factor if m.expert_dtype == "nvfp4" else 1.0
        # Weights read every step whatever the batch: attention projections,
        # router and dense MLP of every layer, and the lm_head (bf16).
        dense = m.num_layers * (m.attention_params * BYTES_PER_PARAM[m.attention_dtype]
                                + m.router_params * 2.0
                                + m.dense_mlp_params * exp_bytes)
        dense += m.lm_head_params * 2.0
        self._t_dense = dense / tp / bw
        # One expert in all layers, this rank's shard (TP splits each expert).
        self._t_expert = m.num_layers * m.expert_params * exp_bytes * exp_factor / tp / bw
        self._t_kv_token = m.kv_bytes_per_token(tp) / bw
        flops = hw.tflops_for(m.expert_dtype) * 1e12 * cal.compute_efficiency
        # 2 FLOPs per multiply-add; lm_head only for the rows that sample.
        self._t_flop_token = 2.0 * (m.active_params - m.lm_head_params) / tp / flops
        self._t_flop_sample = 2.0 * m.lm_head_params / tp / flops
        # QK^T and PV: 2 x 2 FLOPs per (query, key) pair per head-dim per head.
        self._t_flop_pair = 4.0 * m.num_layers * m.num_attention_heads * m.head_dim / tp / flops
        # Two all-reduces per layer (after attention, after the MLP/MoE) of the
        # hidden states in bf16; ring: 2(n-1)/n of the bytes cross each link.
        # A TP group wider than a node all-reduces over the network: its ring is as
        # fast as each GPU's share of the node's network bandwidth.
        if tp_over_network and net is not None:
            ar_lat_us, ar_bw = net.latency_us, net.bandwidth_gbs / tp_over_network
        else:
            ar_lat_us, ar_bw = hw.allreduce_latency_us, hw.allreduce_bandwidth_gbs
        if tp > 1:
            self._ar_calls = 2 * m.num_layers
            self._ar_latency = ar_lat_us * 1e-6 * cal.allreduce_latency_factor
            self._ar_token = ((2 * (tp - 1) / tp) * m.hidden_size * 2.0
                              / (ar_bw * 1e9 * cal.allreduce_bandwidth_efficiency))
        else:
            self._ar_calls, self._ar_latency, self._ar_token = 0, 0.0, 0.0
        # Pipeline stages hand the hidden states on (bf16), over the network where a
        # stage boundary is a node boundary (one transfer at a time: the whole
        # node's bandwidth), else over the box's own link.
        local = pp - 1 - net_hops
        self._hop_latency = local * hw.allreduce_latency_us * 1e-6
        self._hop_token = local * m.hidden_size * 2.0 / (hw.allreduce_bandwidth_gbs * 1e9)
        if net_hops and net is not None:
            self._hop_latency += net_hops * net.latency_us * 1e-6
            self._hop_token += net_hops * m.hidden_size * 2.0 / (net.bandwidth_gbs * 1e9)
        self._overhead = cal.step_overhead_ms * 1e-3
        # A kernel takes at least its floor; a weight GEMM's own read time (already
        # in the weights term) hides the floor, so only the excess is added.
        gemm_reads = [b / tp / bw for b in m.layer_gemm_bytes()]
        others = m.layer_kernels - len(gemm_reads)

        def floors(floor_us: float) -> float:
            f = floor_us * 1e-6
            return m.num_layers * (others * f + sum(max(0.0, f - t) for t in gemm_reads))

        self._kernels_graph = floors(cal.kernel_graph_us)
        self._kernels_eager = floors(cal.kernel_eager_us)
        self._graph_max = cal.cudagraph_max_tokens
        self._per_seq = cal.per_seq_overhead_us * 1e-6
        self._skew = cal.routing_skew if m.router == "trained" else 0.0
        self._distinct: dict[int, float] = {}

    def experts_touched(self, tokens: int) -> float:
        if not self.model.is_moe:
            return 0.0
        d = self._distinct.get(tokens)
        if d is None:
            m = self.model
            d = distinct_experts(m.num_experts, m.experts_per_token, tokens, self._skew)
            self._distinct[tokens] = d
        return d

    def cost(self, shape: StepShape) -> StepCost:
        s = self.slowdown
        return StepCost(
            overhead=s * (self._overhead + self._per_seq * shape.seqs),
            kernels=s * self.kernel_time(shape.tokens),
            weights=s * (self._t_dense + self._t_expert * self.experts_touched(shape.tokens)),
            kv=s * self._t_kv_token * shape.kv_tokens,
            compute=s * (self._t_flop_token * shape.tokens + self._t_flop_sample * shape.sampled
                         + self._t_flop_pair * shape.attn_pairs),
            allreduce=s * (self._ar_calls * (self._ar_latency + self._ar_token * shape.tokens)
                           + self._hop_latency + self._hop_token * shape.tokens),
        )

    def kernel_time(self, tokens: int) -> float:
        """Per-kernel floors of one forward pass: graph replay when vLLM captured this size."""
        return self._kernels_graph if tokens <= self._graph_max else self._kernels_eager

    def step_time(self, tokens: int, seqs: int, sampled: int, kv_tokens: int, attn_pairs: float) -> float:
        """Seconds for one step; the hot path of the scheduler (no objects built)."""
        d = self._distinct.get(tokens)
        if d is None:
            d = self.experts_touched(tokens)
        t = (self._overhead + self._per_seq * seqs
             + (self._kernels_graph if tokens <= self._graph_max else self._kernels_eager)
             + self._t_dense + self._t_expert * d
             + self._t_kv_token * kv_tokens
             + self._t_flop_token * tokens + self._t_flop_sample * sampled + self._t_flop_pair * attn_pairs
             + self._ar_calls * (self._ar_latency + self._ar_token * tokens)
             + self._hop_latency + self._hop_token * tokens)
        return t * self.slowdown

    def memory(self, gpu_memory_utilization: float) -> MemoryFit:
        """Does the checkpoint fit one TP group, and how many KV tokens are left.

        Like vLLM: usable = device memory x utilization; from it go the weights
        shard and the runtime's own memory (activations at the max batched
        tokens, CUDA graphs, NCCL buffers); the rest becomes KV-cache blocks.
        """
        m, cal = self.model, self.cal
        weights = m.weights_gb * 1e9 / self.tp / self.pp / GIB
        usable = self.hw.memory_gib * gpu_memory_utilization - cal.runtime_reserve_gib
        kv_gib = usable - weights
        # each pipeline stage holds its own layers' KV of every token
        per_token = m.kv_bytes_per_token(self.tp) / self.pp
        if kv_gib <= 0:
            return MemoryFit(False, weights, usable, 0.0, 0,
                             f"weights {weights:.1f} GiB/GPU at TP={self.tp}{f' x PP={self.pp}' if self.pp > 1 else ''} exceed the usable "
                             f"{usable:.1f} GiB/GPU ({self.hw.memory_gib:g} GiB x {gpu_memory_utilization:g} "
                             f"- {cal.runtime_reserve_gib:.1f} GiB runtime reserve)")
        blocks = int(kv_gib * GIB / (per_token * cal.block_size))
        tokens = blocks * cal.block_size
        return MemoryFit(True, weights, usable, kv_gib, tokens,
                         f"weights {weights:.1f} GiB/GPU, KV cache {kv_gib:.1f} GiB/GPU = "
                         f"{tokens:,} tokens at {per_token / 1024:.0f} KiB/token/GPU")
