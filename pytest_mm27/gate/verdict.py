"""Judging one measured level: errors past the limit, floors, client-bound levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..catalog.floors import Floor
from ..host.telemetry import throttled
from ..records.model import ERROR, FAIL, INVALID, PASS, Trial, Verdict, as_trial
from .slo import Slo, misses

# The verdict type and its statuses live with the record (records.model); judging lives here.
__all__ = ["ERROR", "FAIL", "INVALID", "PASS", "Verdict", "client_understatement", "front_end_note", "judge_level"]


# A client-bound level that misses its floor by more than the client could have
# cost (its idle-slot share) plus this margin is a real miss, not an artefact.
CLIENT_SLACK = 0.05


def client_understatement(trial: Trial | Mapping[str, Any]) -> float:
    """Upper bound on the throughput a slow client hid: the share of slot time
    requests spent waiting to be sent instead of being served."""
    trial = as_trial(trial)
    queue, e2el = trial.queue_ms.mean or 0.0, trial.e2el_ms.mean or 0.0
    return queue / (queue + e2el) if queue + e2el > 0 else 1.0


def _top_errors(errors: Mapping[str, int], limit: int = 3) -> str:
    items = sorted(errors.items(), key=lambda kv: -kv[1])[:limit]
    return "; ".join(f"{count} x {reason}" for reason, count in items)


FRONT_END_ADVICE = {
    "vllm": "raise vLLM's --api-server-count ([serve] api_server_count in the topology) or add data-parallel ranks",
    "sim": "the simulator's one server process saturated a core, so its timing may lag its model",
}


def front_end_note(trial: Trial, engine: str | None) -> str | None:
    """What a front-end-bound level must say: which process was at its limit, and what to do."""
    if not trial.front_end_bound:
        return None
    advice = FRONT_END_ADVICE.get(engine or "", "give the server more API processes")
    return (f"front-end bound: {trial.front_end_reason}: the server's API process, not the GPU, "
            f"set this level's numbers; {advice}")


def judge_level(metrics: Trial | Mapping[str, Any], floor: Floor | None, max_error_rate: float,
                model_error: float | None = None, engine: str | None = None,
                ceilings: Sequence[Slo] = ()) -> Verdict:
    """Decide a level from its (median) trial: errors past the limit, the floor, client-bound levels.

    ``model_error``: on the simulator, its known error at this (topology,
    concurrency) against the published figure (predicted / published - 1).
    A floor missed by less than the simulator's own under-prediction there
    is inconclusive: it says something about the model, not the system.
    A front-end-bound level (the server's API process at a full core) is
    judged like any other; its verdict names that limit (``engine`` picks
    the advice), and so does a GPU whose clocks were cut during the level.
    ``ceilings``: the level's latency and error-rate SLOs; each one missed fails it.
    """
    trial = as_trial(metrics)
    problems: list[str] = []
    notes: list[str] = []
    requests, failed, ok = trial.requests, trial.failed, trial.ok
    rate = failed / requests if requests else 1.0
    if ok == 0:
        problems.append(f"no request succeeded ({failed} failed): {_top_errors(trial.errors)}")
    elif rate > max_error_rate:
        problems.append(f"{failed} of {requests} requests failed ({rate:.1%}, limit {max_error_rate:.1%}): "
                        f"{_top_errors(trial.errors)}")
    tok_s = float(getattr(trial, floor.metric if floor else "output_tok_s", None) or 0.0)
    if floor is not None and ok and tok_s < floor.tok_s:
        shortfall = 1 - tok_s / floor.tok_s
        floor_problem = (f"{floor.label} {floor.fmt(tok_s)} is below the floor {floor.fmt(floor.tok_s)} "
                         f"({shortfall:.1%} short) at c={trial.concurrency}; floor: {floor.describe()}")
        if model_error is not None and model_error < 0 and shortfall <= -model_error:
            notes.append(floor_problem)
            notes.append(f"inside the simulator's own error here: it predicts {-model_error:.1%} below the "
                         "published figure at this point (fixtures/sim/calibration.toml [fit_error]); "
                         "not gated on the simulator")
            return Verdict(INVALID, tuple(problems), tuple(notes), tag="within sim error")
        client_share = client_understatement(trial)
        if trial.client_bound and shortfall <= client_share + CLIENT_SLACK:
            notes.append(floor_problem)
            notes.append(f"client-bound level, not gated: {trial.client_bound_reason or 'client was the limit'}"
                         f"; the client may have cost up to {client_share:.1%} of throughput")
            return Verdict(INVALID, tuple(problems), tuple(notes), tag="client-bound")
        problems.append(floor_problem)
        if trial.client_bound:
            notes.append(f"client-bound ({trial.client_bound_reason}), but the client can explain at most "
                         f"{client_share:.1%} of a {shortfall:.1%} shortfall")
    if ok:
        problems.extend(misses(trial, ceilings))
    if floor is None:
        notes.append("no floor for this level")
    front_end = front_end_note(trial, engine)
    if front_end:
        notes.append(front_end)
    notes.extend(f"GPU clocks cut: {phrase}" for phrase in throttled(trial.gpu))
    tag = "client-bound" if trial.client_bound else "front-end bound" if front_end else ""
    if problems:
        return Verdict(FAIL, tuple(problems), tuple(notes), tag)
    return Verdict(PASS, (), tuple(notes), tag)
