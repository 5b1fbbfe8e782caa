"""Markdown report from run records and their comparisons (CI job summaries, PR comments).

One section and table per topology: now, baseline and change for output
tok/s, TTFT p99 and TPOT p50, errors, floor and verdicts, then the
regression messages. ``write_markdown`` writes it to a file and, when
``$GITHUB_STEP_SUMMARY`` is set, appends it there too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..gate.specs import METRICS
from ..records.model import (
    IMPROVED, INVALID, MISSING, REGRESSED, MetricComparison, RecordComparison, RunRecord, as_record,
)
from .terminal import fmt_number, keyed, percentile_of, record_title, sensitivity_lines, tolerance_text, verdict_label

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
_ICON = {REGRESSED: "❌ regressed", IMPROVED: "✅ improved", INVALID: "⚠️ invalid", MISSING: "➖ missing",
         "ok": "ok"}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    return fmt_number(value, spec, suffix, missing="–")


def _change(m: MetricComparison | None) -> str:
    if m is None or m.change is None:
        return "–"
    text = f"{m.change * 100:+.2f} pt" if m.name == "error_rate" else f"{m.change:+.1%}"
    if m.status == REGRESSED:
        return f"**{text}** ❌"
    if m.status == IMPROVED:
        return f"{text} ✅"
    if m.status == INVALID:
        return f"{text} (not compared)"
    return text


def _fmt(name: str, value: float | None) -> str:
    return METRICS[name].fmt(value) if value is not None else "–"


HEADER = ("Concurrency", "Output tok/s", "Baseline", "Δ", "TTFT p99", "Baseline", "Δ", "TPOT p50", "Baseline",
          "Δ", "Errors", "Floor", "Verdict", "Gate")


def record_section(record: RunRecord | Mapping[str, Any], comparison: RecordComparison | None = None, *,
                   note: str | None = None, level: int = 2) -> list[str]:
    """Markdown lines for one topology: heading, baseline line, table, messages."""
    record = as_record(record)
    lines = [f"{'#' * level} {_cell(record.topology_name or '?')}", "", record_title(record), ""]
    if record.status and record.status != "complete":
        lines += [f"Run status: **{record.status}**", ""]
    if comparison is not None:
        info = comparison.baseline_info
        engine = f"{info.get('engine') or '?'} {info.get('engine_version') or ''}".rstrip()
        lines += [f"Baseline `{comparison.baseline_path or '-'}` (engine {engine}, saved "
                  f"{info.get('saved_at') or info.get('created_at') or '?'}): **{_ICON.get(comparison.status)}**",
                  ""]
        if comparison.baseline_note:
            lines += [f"Baseline note: {_cell(comparison.baseline_note)}", ""]
        if comparison.host_differences:
            lines += ["Measured on another host: " + "; ".join(_cell(x) for x in comparison.host_differences), ""]
        if comparison.definition_differences:
            lines += ["Defined differently: " + "; ".join(_cell(x) for x in comparison.definition_differences), ""]
    elif note:
        lines += [f"No comparison: {note}", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" if i < 10 else "---" for i in
                                                               range(len(HEADER))) + "|"]
    by_key = {(lv.concurrency, lv.case or ""): lv for lv in comparison.levels} if comparison else {}
    for entry in record.levels:
        m = entry.metrics
        lvc = by_key.get(entry.key)
        tp, ttft, tpot, err = ((lvc.get(n) if lvc else None) for n in ("throughput", "ttft_p99", "tpot_p50",
                                                                        "error_rate"))
        # With a comparison the values are geometric means over trials (the numbers that were judged).
        now_tp = tp.now if tp and tp.now is not None else (m.output_tok_s if m else None)
        now_ttft = ttft.now if ttft and ttft.now is not None else percentile_of(m, "ttft_ms", "p99")
        now_tpot = tpot.now if tpot and tpot.now is not None else percentile_of(m, "tpot_ms", "p50")
        errors = f"{m.failed}/{m.requests}" if m else "–"
        if len(entry.trials) > 1:
            errors = f"{sum(t.failed for t in entry.trials)}/{sum(t.requests for t in entry.trials)}"
        if err is not None and err.change:
            errors += f" ({_change(err)})"
        gate = _ICON.get(lvc.status, lvc.status) if lvc else "–"
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"{entry.concurrency} ({entry.case})" if entry.case else entry.concurrency, _fmt("throughput", now_tp), _fmt("throughput", tp.baseline if tp else None),
            _change(tp), _fmt("ttft_p99", now_ttft), _fmt("ttft_p99", ttft.baseline if ttft else None),
            _change(ttft), _fmt("tpot_p50", now_tpot), _fmt("tpot_p50", tpot.baseline if tpot else None),
            _change(tpot), errors, _num(entry.floor.tok_s if entry.floor else None),
            verdict_label(entry, empty="–"), gate)) + " |")
    if comparison is not None:
        measured = {e.key for e in record.levels}
        for lv in comparison.levels:
            if (lv.concurrency, lv.case or "") not in measured:
                lines.append(f"| {lv.concurrency} | – | {_fmt('throughput', (lv.get('throughput') or _Nil).baseline)}"
                             f" | – | – | – | – | – | – | – | – | – | – | {_ICON[lv.status]} |")
    lines.append("")
    if comparison is not None:
        messages = [m.message for lv in comparison.levels for m in lv.metrics if m.status in (REGRESSED, IMPROVED)]
        messages += [m.message for m in comparison.sweep if m.status in (REGRESSED, IMPROVED)]
        notes = [f"c={lv.concurrency} {lv.status}: {lv.note}" for lv in comparison.levels if lv.note]
        notes += sensitivity_lines(comparison)
        if messages or notes:
            lines += [f"- {_cell(x)}" for x in [*messages, *notes]] + [""]
        n_trials = max((len(e.trials) for e in record.levels), default=0)
        lines += [f"<sub>Δ vs baseline; values are geometric means of {n_trials} trial(s). A change is a regression "
                  f"only past its tolerance and outside the {comparison.confidence:.0%} noise interval. "
                  f"Tolerances: {tolerance_text(comparison.tolerances)}. {comparison.noise_source}.</sub>", ""]
    for error in record.errors:
        where = f" at c={error.concurrency}" if error.concurrency else ""
        lines.append(f"- error{where}: {_cell(error.message.splitlines()[0] if error.message else '')}")
    return lines


class _Nil:
    baseline = None


def markdown_report(records: Sequence[RunRecord | Mapping[str, Any]],
                    comparisons: Mapping[Any, RecordComparison] | Sequence[RecordComparison | None] | None = None,
                    *, title: str = "pytest-mm27 results", notes: Mapping[Any, str] | None = None) -> str:
    """The whole report. ``comparisons`` by record key (topology, workload) or topology name,
    or a list aligned with ``records``.

    ``notes`` (keyed the same way) explain a missing comparison, e.g. "no baseline ...".
    """
    records = [as_record(r) for r in records]
    if comparisons is None:
        by_topo: dict[Any, RecordComparison] = {}
    elif isinstance(comparisons, Mapping):
        by_topo = dict(comparisons)
    else:
        by_topo = {rec.key: c for rec, c in zip(records, comparisons) if c is not None}
    statuses = [c.status for c in by_topo.values()]
    regressed = sum(1 for c in by_topo.values() if c.regressed)
    summary = (f"**{regressed} of {len(by_topo)} compared topologies regressed**" if regressed
               else f"No regression in {len(by_topo)} compared topolog{'y' if len(by_topo) == 1 else 'ies'}"
               if statuses else "No baseline comparison")
    lines = [f"# {title}", "", summary + f"; {len(records)} run record(s).", ""]
    for rec in records:
        lines += record_section(rec, keyed(by_topo, rec), note=keyed(notes or {}, rec))
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(path: Path | str | None, text: str, *, step_summary: bool = True) -> list[Path]:
    """Write ``text`` to ``path`` (atomically; None: skip) and append it to ``$GITHUB_STEP_SUMMARY``.

    Returns the files written. The step summary is appended to, never
    replaced: other steps of the job write there too.
    """
    written: list[Path] = []
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)     # mkstemp makes 0600; a report is for any reader, like the records
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    summary = os.environ.get(STEP_SUMMARY_ENV)
    if step_summary and summary:
        target = Path(summary)
        with target.open("a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        written.append(target)
    return written


__all__ = ["STEP_SUMMARY_ENV", "markdown_report", "record_section", "write_markdown"]
