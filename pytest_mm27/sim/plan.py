"""Planning: which TP x PP x DP split of N nodes x G GPUs serves a model best, and why the others don't.

Engines and their pipeline stages are laid out on consecutive GPUs, node after
node; a TP group either fits in a node (G divisible by TP) or spans whole nodes
(TP a multiple of G), as NCCL rings are built in practice. Stage boundaries and
TP groups that cross nodes go over the hardware profile's ``[network]``.

The DP replicas of a split are identical and the client balances them, and so
are a PP engine's micro-batch schedulers: a level at concurrency c is simulated
on one of the DP x PP schedulers at c / (DP x PP), with its share of the API
processes, and scaled, so a plan over 64 GPUs stays a few seconds. ``sim
predict`` simulates every engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .cluster import SimSetup, setup_for
from .perf import MemoryFit
from .virtual import LevelPrediction, simulate_level

DEFAULT_LEVELS = (1, 4, 8, 16, 32, 64, 128, 256, 384, 512)


@dataclass(frozen=True)
class Candidate:
    tp: int
    dp: int
    fit: MemoryFit
    problem: str | None                  # why it cannot run, None if it can
    curve: tuple[LevelPrediction, ...] = ()
    pp: int = 1

    @property
    def label(self) -> str:
        pp = f" x PP={self.pp}" if self.pp > 1 else ""
        return f"TP={self.tp}{pp} x DP={self.dp}"

    @property
    def peak(self) -> LevelPrediction | None:
        return max(self.curve, key=lambda p: p.output_tok_s) if self.curve else None


def tp_choices(setup: SimSetup, gpus: int, gpus_per_node: int | None = None) -> list[int]:
    """TP sizes vLLM accepts for this model that divide the GPU count (and fit the nodes)."""
    m = setup.model
    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp or m.num_attention_heads % tp:
            continue
        if m.num_kv_heads % tp and tp % m.num_kv_heads:
            continue
        if gpus_per_node is not None and gpus_per_node % tp and tp % gpus_per_node:
            continue
        out.append(tp)
    return out


def default_levels(gpus: int) -> tuple[int, ...]:
    """The single-box levels, scaled with the GPU count past 8 so big clusters reach saturation."""
    scale = max(1, gpus // 8)
    return tuple(c * scale for c in DEFAULT_LEVELS)


def _scaled(p: LevelPrediction, c: int, dp: int) -> LevelPrediction:
    """One scheduler's level as the whole deployment's: ``dp`` times the throughput, same latencies."""
    return replace(p, concurrency=c, requests=p.requests * dp, output_tok_s=p.output_tok_s * dp,
                   output_tokens=p.output_tokens * dp, preemptions=p.preemptions * dp,
                   stream_output_tok_s=p.stream_output_tok_s * dp)


def plan(hardware: str, model: str, gpus: int, workload: Any, *, levels: tuple[int, ...] | None = None,
         max_num_seqs: int = 256, gpu_memory_utilization: float = 0.9, max_model_len: int = 32768,
         extra_dirs: list[Path] | None = None, nodes: int = 1, api_server_count: int = 1,
         max_pp: int | None = None) -> list[Candidate]:
    """Rank the splits of ``nodes`` x ``gpus`` GPUs (``gpus`` per node)."""
    total = nodes * gpus
    per_node = gpus if nodes > 1 else None
    levels = levels or default_levels(total)
    base = setup_for(hardware, model, 1, 1, max_num_seqs, gpu_memory_utilization, max_model_len,
                     extra_dirs=extra_dirs, api_server_count=api_server_count, dp_mode="replicas",
                     gpus_per_node=per_node)
    steady = bool(getattr(workload, "steady", False))
    out: list[Candidate] = []
    for tp in tp_choices(base, total, per_node):
        rest = total // tp
        for pp in range(1, rest + 1):
            if rest % pp or pp > base.model.num_layers or (max_pp is not None and pp > max_pp):
                continue
            dp = rest // pp
            setup = base.with_(tp=tp, pp=pp, dp=dp)
            fit = setup.memory()
            problem = None
            if not fit.fits:
                problem = f"does not fit: {fit.reason}"
            elif fit.kv_tokens < max_model_len:
                problem = (f"KV cache too small: {fit.kv_tokens:,} tokens per engine < max_model_len "
                           f"{max_model_len:,} ({fit.reason})")
            elif fit.kv_tokens < workload.input_tokens + workload.output_tokens:
                problem = "KV cache cannot hold one request of this workload"
            curve: tuple[LevelPrediction, ...] = ()
            if problem is None:
                engines = dp * pp
                curve = tuple(
                    _scaled(simulate_level(setup, math.ceil(c / engines), workload.requests_for(math.ceil(c / engines)),
                                           workload.input_tokens, workload.output_tokens, steady=steady,
                                           one_engine=True), c, engines)
                    for c in levels)
            out.append(Candidate(tp, dp, fit, problem, curve, pp=pp))
    runnable = sorted((c for c in out if c.problem is None), key=lambda c: -c.peak.output_tok_s)
    return runnable + [c for c in out if c.problem is not None]


def render_plan(cands: list[Candidate], hardware: str, model: str, gpus: int, workload_name: str,
                nodes: int = 1, errors: dict[str, float] | None = None) -> str:
    where = f"{nodes} nodes x {gpus}" if nodes > 1 else f"{gpus}"
    lines = [f"plan: {model} on {where} x {hardware}, workload {workload_name!r}"]
    if errors:
        lines.append("error estimate (cases the fit never saw): "
                     + ", ".join(f"{k} +-{v:.0%}" for k, v in errors.items()))
    lines.append("")
    rank = 0
    for c in cands:
        if c.problem is None:
            rank += 1
            p = c.peak
            lines.append(f"{rank}. {c.label}: peak {p.output_tok_s:,.0f} output tok/s at c={p.concurrency} "
                         f"(TTFT p50 {p.ttft_p50_ms:,.0f} ms, TPOT p50 {p.tpot_p50_ms:.1f} ms)")
            lines.append(f"   {c.fit.reason}")
            lines.append("   curve: " + ", ".join(f"c={q.concurrency}: {q.output_tok_s:,.0f}" for q in c.curve))
        else:
            lines.append(f"-  {c.label}: {c.problem}")
    return "\n".join(lines)
