"""Synthetic run records: trials drawn around true values with multiplicative noise.

Used by the gate-accuracy benchmark and by the tests of the comparison and
the reports, so both exercise records shaped exactly like the harness's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ..records.store import SCHEMA, SCHEMA_VERSION

DEFAULT_LEVELS = (1, 8, 32, 64, 128, 256)


def true_values(concurrency: int) -> dict[str, float]:
    """A plausible serving curve: throughput saturating, latency growing with load."""
    tok_s = 12_000 * concurrency / (concurrency + 60)
    return {
        "output_tok_s": tok_s,
        "ttft_p50": 40 + 1.5 * concurrency,
        "ttft_p99": 90 + 4.0 * concurrency,
        "tpot_p50": 8 + 0.08 * concurrency,
        "tpot_p99": 11 + 0.12 * concurrency,
    }


GATED = ("throughput", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")


def trial_metrics(concurrency: int, truth: Mapping[str, float], rng: random.Random, noise: float, *,
                  slowdown: float = 1.0, requests: int = 500, failed: int = 0,
                  client_bound: bool = False, within: float | None = None) -> dict[str, Any]:
    """One trial's metrics dict (the keys of ``LevelMetrics.to_dict()`` the gate reads).

    ``slowdown`` 1.1 means a 10 % slower server: throughput / 1.1, latencies x 1.1.
    Each metric gets its own lognormal noise of relative size ``noise``; the
    trial reports ``within`` (default: ``noise``) as its own within-level
    noise, as a steady window's batch means would. A ``within`` below
    ``noise`` is a server whose trials differ by more than one level can see.
    """
    def draw(value: float, factor: float) -> float:
        return value * factor * math.exp(rng.gauss(0.0, noise))

    def pct(p50: float, p99: float) -> dict[str, float]:
        a, b = draw(p50, slowdown), draw(p99, slowdown)
        return {"mean": (a + b) / 2, "p50": a, "p90": (a + 2 * b) / 3, "p99": b, "min": a / 2, "max": b * 1.2}

    tok_s = draw(truth["output_tok_s"], 1 / slowdown)
    duration = 60.0
    e2el = pct(truth["ttft_p50"] + 256 * truth["tpot_p50"], truth["ttft_p99"] + 256 * truth["tpot_p99"])
    # A client-bound trial sent its requests late: 10 % of slot time lost to dispatch lag.
    queue_mean = e2el["mean"] * (0.1 if client_bound else 0.001)
    return {
        "concurrency": concurrency, "requests": requests, "ok": requests - failed, "failed": failed,
        "error_rate": failed / requests if requests else 0.0,
        "errors": {"HTTP 500": failed} if failed else {},
        "duration_s": duration, "output_tokens": int(tok_s * duration), "output_tok_s": tok_s,
        "total_tok_s": tok_s * 1.5, "steady_output_tok_s": tok_s,
        "ttft_ms": pct(truth["ttft_p50"], truth["ttft_p99"]),
        "tpot_ms": pct(truth["tpot_p50"], truth["tpot_p99"]),
        "itl_ms": pct(truth["tpot_p50"], truth["tpot_p99"] * 2),
        "e2el_ms": e2el,
        "queue_ms": {"mean": queue_mean, "p50": queue_mean, "p90": queue_mean, "p99": queue_mean,
                     "min": 0.0, "max": queue_mean},
        "client_bound": client_bound,
        "client_bound_reason": "refill dispatch lag p99 25 ms > 10 ms" if client_bound else None,
        "timed_out": False,
        "noise": {name: noise if within is None else within for name in GATED},
    }


def make_record(*, trials: int = 3, noise: float | Mapping[int, float] = 0.03, slowdown: float | Mapping[int, float] = 1.0,
                seed: int = 0, levels: Sequence[int] = DEFAULT_LEVELS, topology: str = "dp3",
                workload: str = "default", profile: str = "rtx-pro-6000-x3", simulated: bool = False,
                engine: str = "vllm", engine_version: str = "0.11.0",
                failed: Mapping[int, int] | None = None, client_bound: Sequence[int] = (),
                floors: Mapping[int, float] | None = None, within: float | Mapping[int, float] | None = None,
                front_end: Sequence[int] = ()) -> dict[str, Any]:
    """A complete run record (schema of ``record.RunRecord``) with ``trials`` trials per level.

    ``noise`` and ``slowdown`` may be given per concurrency (a mapping; noise defaults to 3 %);
    ``within`` is the within-level noise each trial reports (see ``trial_metrics``), also per
    concurrency; levels in ``front_end`` are marked front-end bound, as the harness marks a level
    whose API server process was at a full core.
    """
    rng = random.Random(seed)
    out_levels = []
    for c in levels:
        factor = slowdown.get(c, 1.0) if isinstance(slowdown, Mapping) else slowdown
        truth = true_values(c)
        level_noise = noise.get(c, 0.03) if isinstance(noise, Mapping) else noise
        level_within = within.get(c) if isinstance(within, Mapping) else within
        ts = [trial_metrics(c, truth, rng, level_noise, slowdown=factor, failed=(failed or {}).get(c, 0),
                            client_bound=c in client_bound, within=level_within) for _ in range(trials)]
        for t in ts:
            t["front_end_bound"] = c in front_end
        best = max(ts, key=lambda t: t["output_tok_s"])
        out_levels.append({
            "concurrency": c, "floor": (floors or {}).get(c), "floor_note": None, "metrics": best,
            "trials": ts, "verdict": {"status": "pass", "problems": [], "notes": []},
        })
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "harness_version": "0.1.0",
        "created_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T01:00:00+00:00",
        "status": "complete", "run_id": f"synthetic-{seed}", "git_commit": "0" * 40,
        "engine": {"name": engine, "version": engine_version, "reason": "synthetic"},
        "host": {"hostname": "synthetic"},
        "hardware": {"profile": profile, "simulated": simulated, "gpus": []},
        "topology": {"name": topology, "tensor_parallel": 1, "data_parallel": 3, "dp_mode": "replicas"},
        "workload": {"name": workload},
        "options": {"max_error_rate": 0.0},
        "launch": None, "levels": out_levels, "errors": [],
    }
