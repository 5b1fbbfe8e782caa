"""Planning: which TP x DP split of N GPUs serves a model best, and why the others don't fit."""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def label(self) -> str:
        return f"TP={self.tp} x DP={self.dp}"

    @property
    def peak(self) -> LevelPrediction | None:
        return max(self.curve, key=lambda p: p.output_tok_s) if self.curve else None


def tp_choices(setup: SimSetup, gpus: int) -> list[int]:
    """TP sizes vLLM accepts for this model that divide the GPU count."""
    m = setup.model
    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp or m.num_attention_heads % tp:
            continue
        if m.num_kv_heads % tp and tp % m.num_kv_heads:
            continue
        out.append(tp)
    return out


def plan(hardware: str, model: str, gpus: int, workload: Any, *, levels: tuple[int, ...] = DEFAULT_LEVELS,
         max_num_seqs: int = 256, gpu_memory_utilization: float = 0.9, max_model_len: int = 32768,
         extra_dirs: list[Path] | None = None) -> list[Candidate]:
    base = setup_for(hardware, model, 1, 1, max_num_seqs, gpu_memory_utilization, max_model_len,
                     extra_dirs=extra_dirs)
    out: list[Candidate] = []
    for tp in tp_choices(base, gpus):
        setup = base.with_(tp=tp, dp=gpus // tp)
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
            curve = tuple(simulate_level(setup, c, workload.requests_for(c), workload.input_tokens,
                                         workload.output_tokens) for c in levels)
        out.append(Candidate(tp, gpus // tp, fit, problem, curve))
    runnable = sorted((c for c in out if c.problem is None), key=lambda c: -c.peak.output_tok_s)
    return runnable + [c for c in out if c.problem is not None]


def render_plan(cands: list[Candidate], hardware: str, model: str, gpus: int, workload_name: str) -> str:
    lines = [f"plan: {model} on {gpus} x {hardware}, workload {workload_name!r}", ""]
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
