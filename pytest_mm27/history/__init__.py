"""Every finished run kept: a history database, change points over it, trends and a gate.

``append_run`` is what the session's finish calls; ``history_gate`` judges
the stored series; ``history_reports`` draws the Markdown table and the PNG
trends. ``python -m pytest_mm27.history import|show`` works on the same
store. No pytest imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..records.model import RunRecord
from .dialect import HistoryError, redact_url
from .gate import SeriesVerdict, history_gate
from .store import Appended, HistoryStore

DEFAULT_HISTORY = "history.sqlite"      # under the results folder


@dataclass
class AppendOutcome:
    appended: list[Appended] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def lines(self, where: str) -> list[str]:
        new = [a for a in self.appended if a.new]
        old = len(self.appended) - len(new)
        text = f"history: {len(new)} run record(s) appended to {where}"
        return [text + (f" ({old} already there)" if old else "")] if self.appended else []


def append_run(location: str | Path, records: Sequence[RunRecord], sources: Sequence[str | Path]) -> AppendOutcome:
    """Append each record; a failure is reported, never raised: the JSON records are already on disk."""
    outcome = AppendOutcome()
    try:
        with HistoryStore(location) as store:
            for record, source in zip(records, sources):
                try:
                    outcome.appended.append(store.append(record, source))
                except HistoryError as exc:
                    outcome.failures.append(f"{exc}; the run record {source} is kept")
                    break       # the same database would refuse the next record for the same reason
    except HistoryError as exc:
        outcome.failures.append(f"{exc}; the run records are kept")
    return outcome


def history_reports(location: str | Path, records: Sequence[RunRecord], plots_dir: Path | None = None,
                    *, last: int = 10) -> tuple[str, list[Path]]:
    """Markdown (the last ``last`` runs of each of these records' series) and PNG trends in ``plots_dir``."""
    from .report import markdown_history, plot_history
    from .series import hardware_of

    groups = {(hardware_of(r), r.topology_name, r.workload_name) for r in records}
    with HistoryStore(location) as store:
        series = store.series()
    text = markdown_history(series, groups, last=last)
    plots = plot_history(series, groups, plots_dir) if plots_dir is not None else []
    return text, plots


__all__ = ["DEFAULT_HISTORY", "AppendOutcome", "HistoryError", "HistoryStore", "SeriesVerdict", "append_run",
           "history_gate", "history_reports", "redact_url"]
