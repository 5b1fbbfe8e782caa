"""The one gate step: a measured level, its floor and its baseline in, a verdict out.

The harness calls :func:`gate_level` as each level is measured (the level's
test passes or fails on it); ``finish_run`` compares the whole records at
the end with the same :class:`~pytest_mm27.gate.compare.Judge`, so a level's
test and the session summary cannot disagree: a level's comparison depends
on the baseline and on that level alone (see ``gate.noise``: the noise is
the baseline's trial-to-trial scatter pooled over its levels, or the level's
own when it stands apart), never on what the run measured elsewhere. The
sweep-wide throughput check, which needs every level, is the session's and
fails the session at its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..catalog.floors import Floor
from ..records.model import ERROR, FAIL, LevelComparison, LevelResult, Verdict
from .compare import Judge
from .slo import Slo
from .verdict import judge_level


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    comparison: LevelComparison | None


def gate_level(level: LevelResult, floor: Floor | None, baseline_level: LevelResult | None, judge: Judge | None,
               *, max_error_rate: float, model_error: float | None = None, engine: str | None = None,
               ceilings: Sequence[Slo] = ()) -> GateResult:
    """The level's verdict: errors, floor and ceilings (``judge_level``), then, with a baseline, its regressions.

    A level that could not be measured keeps the error verdict it was made
    with; a regression past the tolerance and outside the noise fails the
    level, with the comparison's message for each regressed metric.
    """
    median = level.metrics
    if median is None:
        return GateResult(level.verdict if level.verdict.status else Verdict(ERROR, ("not measured",)), None)
    verdict = judge_level(median, floor, max_error_rate, model_error=model_error, engine=engine, ceilings=ceilings)
    if verdict.status == ERROR or judge is None:
        return GateResult(verdict, None)
    comparison = judge.level(level.concurrency, baseline_level, level, case=level.case)
    regressions = tuple(m.message for m in comparison.regressions)
    if regressions:
        verdict = Verdict(FAIL, verdict.problems + regressions, verdict.notes, verdict.tag)
    return GateResult(verdict, comparison)
