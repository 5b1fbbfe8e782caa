"""After the last level: compare, promote baselines, write reports.

Works from the run records on disk, so it gives the same answer whether the
levels ran in this process or in pytest-xdist workers. No pytest imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Mm27Config
from .errors import Mm27Error
from .gate.baseline import BaselineMatch, load_baseline, resolve_one, save_baseline
from .gate.compare import compare_records
from .gate.noise import noise_text
from .history import HistoryError, append_run, history_gate, history_reports, redact_url
from .history.series import hardware_of
from .history.store import HistoryStore
from .records.model import RecordComparison, RunRecord
from .records.store import load_record
from .report.benchmark_export import export_pytest_benchmark
from .report.markdown import markdown_report, write_markdown
from .report.plots import PlotsUnavailable, plot_records
from .report.terminal import comparison_lines, record_table


@dataclass
class RunSummary:
    records: list[RunRecord] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    comparisons: dict[tuple[str, str], RecordComparison] = field(default_factory=dict)   # by record key
    lines: list[str] = field(default_factory=list)         # terminal summary
    failures: list[str] = field(default_factory=list)      # fail the session (baseline errors, regressions)

    @property
    def failed(self) -> bool:
        return bool(self.failures)


def load_run(run_dir: Path) -> tuple[list[RunRecord], list[Path], list[str]]:
    records, paths, problems = [], [], []
    for path in sorted(run_dir.glob("*.json")) if run_dir.is_dir() else []:
        try:
            records.append(load_record(path))
            paths.append(path)
        except Mm27Error as exc:
            problems.append(str(exc))
    return records, paths, problems


BaselineKey = tuple[str, str]      # (topology, workload) of a record


def finish_run(cfg: Mm27Config, run_dir: Path, baselines: dict[BaselineKey, BaselineMatch]) -> RunSummary:
    summary = RunSummary()
    summary.records, summary.paths, summary.failures = load_run(run_dir)
    notes: dict[tuple[str, str], str] = {}
    for record, path in zip(summary.records, summary.paths):
        name = record.topology_name
        key = (name, record.workload_name)
        match = baselines.get(key)
        if match is None and cfg.baseline:
            # A deployment declared in an xdist worker: this process has not looked for its baseline yet.
            try:
                match = baselines[key] = resolve_one(cfg.baseline, cfg.baselines_dir, record.to_dict())
            except Mm27Error as exc:
                summary.failures.append(str(exc))
        if match is not None and match.reference is not None:
            comparison = compare_records(match.reference, record, cfg.tolerances or None,
                                         max_error_rate=cfg.max_error_rate, baseline_path=match.path)
            summary.comparisons[key] = comparison
            summary.lines += comparison_lines(comparison, record)
            if comparison.regressed:
                summary.failures.append(comparison.summary())
        else:
            summary.lines += record_table(record)
            if match is not None and match.note:
                notes[key] = match.note
                summary.lines.append(f"  {match.note}")
        summary.lines.append(f"  record: {path}")
        summary.lines.append("")

    if cfg.history is not None:
        _history(cfg, summary)

    if cfg.save_baseline:
        for record, path in zip(summary.records, summary.paths):
            if record.status != "complete":
                summary.failures.append(f"not saving {path} as a baseline: run status is {record.status!r}")
                continue
            name = cfg.save_baseline if isinstance(cfg.save_baseline, str) else None
            if name and len(summary.records) > 1:
                name = f"{path.stem}--{name}"
            try:
                saved = save_baseline(record, cfg.baselines_dir, name=name, force=cfg.force, source_path=path)
                summary.lines.append(f"baseline saved: {saved}")
                summary.lines.append(f"  its noise: {noise_text(load_baseline(saved).get('noise'))}")
            except Mm27Error as exc:
                summary.failures.append(str(exc))

    if cfg.report_md is not None or cfg.plots_dir is not None or cfg.pytest_benchmark_json is not None:
        _reports(cfg, summary, notes, baselines)
    return summary


def _history(cfg: Mm27Config, summary: RunSummary) -> None:
    """Append this run's records to the history and, with --gate history, judge the series they belong to.

    The JSON records are on disk already: a history that cannot be written fails the
    session with its reason and loses nothing.
    """
    assert cfg.history is not None
    where = redact_url(cfg.history)
    outcome = append_run(cfg.history, summary.records, [str(p) for p in summary.paths])
    summary.lines += outcome.lines(where)
    summary.failures += outcome.failures
    if cfg.gate != "history" or outcome.failures:
        return
    groups = {(hardware_of(r), r.topology_name, r.workload_name) for r in summary.records}
    try:
        with HistoryStore(cfg.history) as store:
            verdicts = history_gate(store.series(), cfg.tolerances or None, groups)
    except HistoryError as exc:
        summary.failures.append(str(exc))
        return
    failed = [v for v in verdicts if v.failed]
    summary.failures += [v.message() for v in failed]
    runs = max((len(v.runs) for v in verdicts), default=0)
    summary.lines.append(f"history gate: {len(failed)} of {len(verdicts)} series regressed "
                         f"(up to {runs} run(s) each)")


def _reports(cfg: Mm27Config, summary: RunSummary, notes: dict[BaselineKey, str],
             baselines: dict[BaselineKey, BaselineMatch]) -> None:
    try:
        if cfg.report_md is not None or _step_summary_wanted():
            text = markdown_report(summary.records, summary.comparisons, notes=notes)
            if cfg.history is not None:
                text = text.rstrip("\n") + "\n\n" + _history_report(cfg, summary)[0]
            for written in write_markdown(cfg.report_md, text):
                summary.lines.append(f"report: {written}")
        if cfg.plots_dir is not None:
            base = {key: m.reference for key, m in baselines.items() if m.reference is not None}
            for written in plot_records(summary.records, cfg.plots_dir, baselines=base,
                                        comparisons=summary.comparisons, stems=[p.stem for p in summary.paths]):
                summary.lines.append(f"plot: {written}")
            if cfg.history is not None:
                # in a folder of their own: one PNG per metric, beside the sweep's two per record
                for written in _history_report(cfg, summary, cfg.plots_dir / "history")[1]:
                    summary.lines.append(f"plot: {written}")
        if cfg.pytest_benchmark_json is not None:
            written = export_pytest_benchmark(summary.records, cfg.pytest_benchmark_json)
            summary.lines.append(f"pytest-benchmark export: {written}")
    except PlotsUnavailable as exc:
        summary.failures.append(str(exc))
    except OSError as exc:
        summary.failures.append(f"cannot write report: {exc}")


def _history_report(cfg: Mm27Config, summary: RunSummary, plots_dir: Path | None = None) -> tuple[str, list[Path]]:
    """The history's Markdown section (and trend plots); a history that cannot be read says so in it."""
    assert cfg.history is not None
    try:
        return history_reports(cfg.history, summary.records, plots_dir)
    except HistoryError as exc:
        return f"## History\n\nNot available: {exc}\n", []


def _step_summary_wanted() -> bool:
    import os

    return bool(os.environ.get("GITHUB_STEP_SUMMARY"))


__all__ = ["RunSummary", "finish_run", "load_baseline", "load_run"]
