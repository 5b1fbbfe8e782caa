"""Terminal tables built from run records, so the plugin, xdist workers and offline tools
all print the same thing from the same data: a record's sweep, and its comparison with a baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..gate.specs import METRICS
from ..records.model import (
    IMPROVED, INVALID, REGRESSED, SWEEP, LevelResult, MetricComparison, RecordComparison, RunRecord, Trial,
    as_level, as_record,
)


def keyed(table: Mapping[Any, Any], record: RunRecord) -> Any:
    """The entry for ``record``: by its key (topology, workload), else by its topology's name."""
    return table.get(record.key, table.get(record.topology_name))


def fmt_number(value: Any, spec: str = ",.0f", suffix: str = "", missing: str = "-") -> str:
    if value is None:
        return missing
    try:
        return f"{float(value):{spec}}{suffix}"
    except (TypeError, ValueError):
        return str(value)


def percentile_of(trial: Trial | None, block: str, pct: str) -> float | None:
    """``percentile_of(trial, "ttft_ms", "p99")``; None when the level was not measured."""
    if trial is None:
        return None
    value = getattr(getattr(trial, block, None), pct, None)
    return float(value) if isinstance(value, (int, float)) else None


def verdict_label(level: LevelResult | Mapping[str, Any], empty: str = "-") -> str:
    """A level's verdict for tables: the status and, when there is one, why ("pass (client-bound)")."""
    verdict = as_level(level).verdict
    status = verdict.status or empty
    return f"{status} ({verdict.tag})" if verdict.tag else status


COLUMNS = ("conc", "output tok/s", "stream tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "errors", "floor", "verdict")
GPU_COLUMNS = ("power W", "J/tok")
PREFIX_COLUMNS = ("prefix hits",)


def _has_prefix_hits(levels: Sequence[LevelResult]) -> bool:
    # Shown only when the servers found shared prefixes: a fixed-shape workload's 0 % says nothing.
    return any(lv.metrics is not None and (lv.metrics.prefix_cache_hits or 0) > 0 for lv in levels)


def _has_gpu(levels: Sequence[LevelResult]) -> bool:
    return any(lv.metrics is not None and (lv.metrics.gpu or {}).get("energy_j") is not None for lv in levels)


def level_rows(levels: Sequence[LevelResult | Mapping[str, Any]]) -> list[tuple[str, ...]]:
    levels = [as_level(lv) for lv in levels]
    peak = max((lv.metrics.output_tok_s or 0.0 for lv in levels if lv.metrics), default=None)
    gpu = _has_gpu(levels)
    prefix = _has_prefix_hits(levels)
    rows = []
    for lv in levels:
        m = lv.metrics
        mark = " *" if m and peak and m.output_tok_s == peak else "  "
        row = (
            str(lv.concurrency),
            fmt_number(m.output_tok_s if m else None) + mark,
            fmt_number(m.stream_output_tok_s if m else None),
            fmt_number(percentile_of(m, "ttft_ms", "p50"), ",.0f", " ms"),
            fmt_number(percentile_of(m, "ttft_ms", "p99"), ",.0f", " ms"),
            fmt_number(percentile_of(m, "tpot_ms", "p50"), ",.1f", " ms"),
            f"{m.failed}/{m.requests}" if m else "-",
            fmt_number(lv.floor.tok_s if lv.floor else None),
        )
        if gpu:
            telemetry = (m.gpu if m else None) or {}
            row += (fmt_number(telemetry.get("power_w_mean")), fmt_number(telemetry.get("j_per_output_token"), ".3f"))
        if prefix:
            rate = m.prefix_cache_hit_rate if m else None
            row += (fmt_number(100 * rate if rate is not None else None, ".1f", " %"),)
        rows.append((*row, verdict_label(lv)))
    return rows


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    # Numbers right-aligned; the last column (verdicts) and a "case" column (test names) left-aligned.
    left = {len(header) - 1} | {i for i, h in enumerate(header) if h == "case"}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def record_title(record: RunRecord | Mapping[str, Any]) -> str:
    record = as_record(record)
    topo = record.topology
    par = f"TP={topo.get('tensor_parallel')} x DP={topo.get('data_parallel')} {topo.get('dp_mode')}"
    return (f"{topo.get('name')} ({par}) · engine {record.engine.name} {record.engine.version or ''}".rstrip()
            + f" · workload {record.workload_name} · hardware {record.hardware.profile}")


def _with_cases(columns: Sequence[str], rows: list[tuple[str, ...]],
                levels: Sequence[Any]) -> tuple[Sequence[str], list[tuple[str, ...]]]:
    """A first column naming each level's test case, when a user test measured any."""
    if not any(lv.case for lv in levels):
        return columns, rows
    return ("case", *columns), [(lv.case or "-", *row) for lv, row in zip(levels, rows)]


def record_table(record: RunRecord | Mapping[str, Any]) -> list[str]:
    record = as_record(record)
    lines = [record_title(record)]
    columns = (*COLUMNS[:-1], *GPU_COLUMNS, COLUMNS[-1]) if _has_gpu(record.levels) else COLUMNS
    if _has_prefix_hits([as_level(lv) for lv in record.levels]):
        columns = (*columns[:-1], *PREFIX_COLUMNS, columns[-1])
    columns, rows = _with_cases(columns, level_rows(record.levels), record.levels)
    lines += ["  " + ln for ln in render_table(columns, rows)]
    if record.levels:
        lines.append("  (* peak output tok/s)")
    for err in record.errors:
        where = f" at c={err.concurrency}" if err.concurrency else ""
        lines.append(f"  error{where}: {err.message.splitlines()[0]}")
    return lines


# ---- a comparison with a baseline ----------------------------------------------------------------

def _delta(m: MetricComparison | None) -> str:
    if m is None or m.change is None:
        return "-" if m is None or m.status != INVALID else "invalid"
    mark = {REGRESSED: " !", IMPROVED: " +", INVALID: " ?"}.get(m.status, "")
    if m.name == "error_rate":
        return f"{m.change * 100:+.2f}pt{mark}"
    return f"{m.change:+.1%}{mark}"


def _val(m: MetricComparison | None, which: str) -> str:
    if m is None:
        return "-"
    return METRICS[m.name].fmt(getattr(m, which))


COMPARISON_COLUMNS = ("conc", "output tok/s", "baseline", "Δ", "TTFT p99", "baseline", "Δ",
                      "TPOT p50", "baseline", "Δ", "errors Δ", "noise", "floor", "verdict", "gate")


def comparison_rows(comparison: RecordComparison,
                    record: RunRecord | Mapping[str, Any] | None = None) -> list[tuple[str, ...]]:
    """One row per level; ``record`` adds its floor and floor verdict columns."""
    by_key = {lv.key: lv for lv in as_record(record).levels} if record is not None else {}
    rows = []
    for lv in comparison.levels:
        tp, ttft, tpot, err = (lv.get(n) for n in ("throughput", "ttft_p99", "tpot_p50", "error_rate"))
        noise = f"±{tp.noise:.1%}" if tp is not None and tp.noise is not None else "-"
        entry = by_key.get((lv.concurrency, lv.case or ""))
        floor = fmt_number(entry.floor.tok_s) if entry is not None and entry.floor else "-"
        rows.append((str(lv.concurrency), _val(tp, "now"), _val(tp, "baseline"), _delta(tp),
                     _val(ttft, "now"), _val(ttft, "baseline"), _delta(ttft),
                     _val(tpot, "now"), _val(tpot, "baseline"), _delta(tpot),
                     _delta(err), noise, floor, verdict_label(entry) if entry is not None else "-", lv.status))
    return rows


def tolerance_text(tolerances: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" if k != "error_rate" else f"{k} +{v * 100:.2f}pt" for k, v in tolerances.items())


def comparison_lines(comparison: RecordComparison, record: RunRecord | Mapping[str, Any] | None = None, *,
                     verbose: bool = False) -> list[str]:
    """Terminal lines: a table with baseline columns and deltas, then one-line messages.

    Call once per topology (from ``pytest_terminal_summary``). Values are
    geometric means over trials. Regressions and improvements always get
    their message, invalid and missing levels their reason; ``verbose``
    adds every metric's message.
    """
    info = comparison.baseline_info
    engine = f"{info.get('engine') or '?'} {info.get('engine_version') or ''}".rstrip()
    status = comparison.status.upper() if comparison.status == REGRESSED else comparison.status
    lines = [record_title(record) if record is not None else comparison.topology,
             f"  vs baseline {comparison.baseline_path or '-'} (engine {engine}, saved "
             f"{info.get('saved_at') or info.get('created_at') or '?'}): {status}"]
    if comparison.baseline_note:
        lines.append(f"  baseline note: {comparison.baseline_note}")
    if comparison.host_differences:
        lines.append("  measured on another host: " + "; ".join(comparison.host_differences))
    if comparison.definition_differences:
        lines.append("  defined differently: " + "; ".join(comparison.definition_differences))
    columns, rows = _with_cases(COMPARISON_COLUMNS, comparison_rows(comparison, record), comparison.levels)
    lines += ["  " + ln for ln in render_table(columns, rows)]
    lines.append("  (Δ: change vs baseline; ! regressed, + improved, ? not compared; noise: "
                 f"{comparison.confidence:.0%} interval of the throughput ratio; tolerances "
                 f"{tolerance_text(comparison.tolerances)})")
    lines.append(f"  {comparison.noise_source}")
    for lv in comparison.levels:
        for m in lv.metrics:
            if verbose or m.status in (REGRESSED, IMPROVED):
                lines.append(f"  {m.message}")
        if lv.note:
            lines.append(f"  c={lv.concurrency}{f' [{lv.case}]' if lv.case else ''} {lv.status}: {lv.note}")
    for m in comparison.sweep:
        if verbose or m.status in (REGRESSED, IMPROVED):
            lines.append(f"  {m.message}")
    lines += ["  " + ln for ln in sensitivity_lines(comparison)]
    return lines


def sensitivity_lines(comparison: RecordComparison) -> list[str]:
    """Where the gate was blind: metrics whose noise band is wider than their tolerance."""
    blind: dict[str, list[MetricComparison]] = {}
    for m in [*(m for lv in comparison.levels for m in lv.metrics), *comparison.sweep]:
        if m.blind and m.status == "ok":
            blind.setdefault(m.metric, []).append(m)
    out = []
    for metric, ms in blind.items():
        where = ", ".join(f"{'the sweep' if m.concurrency == SWEEP else f'c={m.concurrency}'} ±{m.noise:.1%}"
                          for m in ms)
        out.append(f"gate sensitivity: {metric} could not have caught a change smaller than its noise band "
                   f"({where}; tolerance {ms[0].tolerance:.0%}); more trials (--trials) or longer windows "
                   "(--precision) narrow it")
    return out
