"""Judging one measured level: errors past the limit, floors, client-bound levels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..catalog.floors import Floor
from ..host.telemetry import throttled

PASS = "pass"
FAIL = "FAIL"
INVALID = "invalid"      # measured, but the numbers cannot be trusted (client-bound)
ERROR = "error"          # nothing measured: the server or the run broke


@dataclass(frozen=True)
class Verdict:
    status: str                         # PASS, FAIL, INVALID or ERROR
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    tag: str = ""                       # why, in a word or two, for tables: "client-bound"

    @property
    def message(self) -> str:
        return "\n".join(self.problems or self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "problems": list(self.problems), "notes": list(self.notes),
                "tag": self.tag}


# A client-bound level that misses its floor by more than the client could have
# cost (its idle-slot share) plus this margin is a real miss, not an artefact.
CLIENT_SLACK = 0.05


def client_understatement(metrics: Mapping[str, Any]) -> float:
    """Upper bound on the throughput a slow client hid: the share of slot time
    requests spent waiting to be sent instead of being served."""
    queue = (metrics.get("queue_ms") or {}).get("mean") or 0.0
    e2el = (metrics.get("e2el_ms") or {}).get("mean") or 0.0
    return queue / (queue + e2el) if queue + e2el > 0 else 1.0


def verdict_label(level: Mapping[str, Any], empty: str = "-") -> str:
    """A level's verdict for tables: the status and, when there is one, why ("pass (client-bound)")."""
    verdict = level.get("verdict") or {}
    # Records written before verdicts had tags: the client-bound flag was the only reason shown.
    tag = verdict.get("tag", "client-bound" if (level.get("metrics") or {}).get("client_bound") else "")
    status = verdict.get("status", empty)
    return f"{status} ({tag})" if tag else status


def _top_errors(errors: Mapping[str, int], limit: int = 3) -> str:
    items = sorted(errors.items(), key=lambda kv: -kv[1])[:limit]
    return "; ".join(f"{count} x {reason}" for reason, count in items)


FRONT_END_ADVICE = {
    "vllm": "raise vLLM's --api-server-count ([serve] api_server_count in the topology) or add data-parallel ranks",
    "sim": "the simulator's one server process saturated a core, so its timing may lag its model",
}


def front_end_note(metrics: Mapping[str, Any], engine: str | None) -> str | None:
    """What a front-end-bound level must say: which process was at its limit, and what to do."""
    if not metrics.get("front_end_bound"):
        return None
    advice = FRONT_END_ADVICE.get(engine or "", "give the server more API processes")
    return (f"front-end bound: {metrics.get('front_end_reason')}: the server's API process, not the GPU, "
            f"set this level's numbers; {advice}")


def judge_level(metrics: Mapping[str, Any], floor: Floor | None, max_error_rate: float,
                model_error: float | None = None, engine: str | None = None) -> Verdict:
    """Decide a level from its metrics dict (``LevelMetrics.to_dict()``).

    ``model_error``: on the simulator, its known error at this (topology,
    concurrency) against the published figure (predicted / published - 1).
    A floor missed by less than the simulator's own under-prediction there
    is inconclusive: it says something about the model, not the system.
    A front-end-bound level (the server's API process at a full core) is
    judged like any other; its verdict names that limit (``engine`` picks
    the advice), and so does a GPU whose clocks were cut during the level.
    """
    problems: list[str] = []
    notes: list[str] = []
    requests = int(metrics.get("requests", 0))
    failed = int(metrics.get("failed", 0))
    ok = int(metrics.get("ok", requests - failed))
    rate = failed / requests if requests else 1.0
    if ok == 0:
        problems.append(f"no request succeeded ({failed} failed): {_top_errors(metrics.get('errors', {}))}")
    elif rate > max_error_rate:
        problems.append(f"{failed} of {requests} requests failed ({rate:.1%}, limit {max_error_rate:.1%}): "
                        f"{_top_errors(metrics.get('errors', {}))}")
    tok_s = float(metrics.get(floor.metric if floor else "output_tok_s") or 0.0)
    if floor is not None and ok and tok_s < floor.tok_s:
        shortfall = 1 - tok_s / floor.tok_s
        floor_problem = (f"{floor.label} {tok_s:,.0f} is below the floor {floor.tok_s:,.0f} "
                         f"({shortfall:.1%} short) at c={metrics.get('concurrency')}; floor: {floor.describe()}")
        if model_error is not None and model_error < 0 and shortfall <= -model_error:
            notes.append(floor_problem)
            notes.append(f"inside the simulator's own error here: it predicts {-model_error:.1%} below the "
                         "published figure at this point (fixtures/sim/calibration.toml [fit_error]); "
                         "not gated on the simulator")
            return Verdict(INVALID, tuple(problems), tuple(notes), tag="within sim error")
        client_share = client_understatement(metrics)
        if metrics.get("client_bound") and shortfall <= client_share + CLIENT_SLACK:
            notes.append(floor_problem)
            notes.append(f"client-bound level, not gated: {metrics.get('client_bound_reason') or 'client was the limit'}"
                         f"; the client may have cost up to {client_share:.1%} of throughput")
            return Verdict(INVALID, tuple(problems), tuple(notes), tag="client-bound")
        problems.append(floor_problem)
        if metrics.get("client_bound"):
            notes.append(f"client-bound ({metrics.get('client_bound_reason')}), but the client can explain at most "
                         f"{client_share:.1%} of a {shortfall:.1%} shortfall")
    if floor is None:
        notes.append("no floor for this level")
    front_end = front_end_note(metrics, engine)
    if front_end:
        notes.append(front_end)
    notes.extend(f"GPU clocks cut: {phrase}" for phrase in throttled(metrics.get("gpu")))
    tag = "client-bound" if metrics.get("client_bound") else "front-end bound" if front_end else ""
    if problems:
        return Verdict(FAIL, tuple(problems), tuple(notes), tag)
    return Verdict(PASS, (), tuple(notes), tag)
