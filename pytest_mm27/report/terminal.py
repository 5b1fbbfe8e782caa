"""Terminal tables built from run records (dicts), so the plugin, xdist workers
and offline tools all print the same thing from the same data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..gate.verdict import verdict_label


def fmt_number(value: Any, spec: str = ",.0f", suffix: str = "", missing: str = "-") -> str:
    if value is None:
        return missing
    try:
        return f"{float(value):{spec}}{suffix}"
    except (TypeError, ValueError):
        return str(value)


def percentile_of(metrics: Mapping[str, Any], key: str, pct: str) -> Any:
    block = metrics.get(key) or {}
    return block.get(pct) if isinstance(block, Mapping) else None


COLUMNS = ("conc", "output tok/s", "stream tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "errors", "floor", "verdict")


GPU_COLUMNS = ("power W", "J/tok")


def _has_gpu(levels: Sequence[Mapping[str, Any]]) -> bool:
    return any((lv.get("metrics") or {}).get("gpu", {}).get("energy_j") is not None for lv in levels)


def level_rows(levels: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    measured = [lv for lv in levels if lv.get("metrics")]
    peak = max((lv["metrics"].get("output_tok_s") or 0.0 for lv in measured), default=None)
    gpu = _has_gpu(levels)
    rows = []
    for lv in levels:
        m = lv.get("metrics") or {}
        tok_s = m.get("output_tok_s")
        mark = " *" if m and peak and tok_s == peak else "  "
        errors = f"{m.get('failed', 0)}/{m.get('requests', 0)}" if m else "-"
        verdict = verdict_label(lv)
        row = (
            str(lv["concurrency"]),
            fmt_number(tok_s) + mark,
            fmt_number(m.get("stream_output_tok_s")),
            fmt_number(percentile_of(m, "ttft_ms", "p50"), ",.0f", " ms"),
            fmt_number(percentile_of(m, "ttft_ms", "p99"), ",.0f", " ms"),
            fmt_number(percentile_of(m, "tpot_ms", "p50"), ",.1f", " ms"),
            errors,
            fmt_number(lv.get("floor")),
        )
        if gpu:
            telemetry = m.get("gpu") or {}
            row += (fmt_number(telemetry.get("power_w_mean")), fmt_number(telemetry.get("j_per_output_token"), ".3f"))
        rows.append((*row, verdict))
    return rows


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i < len(cells) - 1 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def record_title(record: Mapping[str, Any]) -> str:
    topo = record.get("topology", {})
    engine = record.get("engine", {})
    workload = record.get("workload", {})
    par = f"TP={topo.get('tensor_parallel')} x DP={topo.get('data_parallel')} {topo.get('dp_mode')}"
    return (f"{topo.get('name')} ({par}) · engine {engine.get('name')} {engine.get('version') or ''}".rstrip()
            + f" · workload {workload.get('name')} · hardware {record.get('hardware', {}).get('profile')}")


def record_table(record: Mapping[str, Any]) -> list[str]:
    lines = [record_title(record)]
    levels = record.get("levels", [])
    columns = (*COLUMNS[:-1], *GPU_COLUMNS, COLUMNS[-1]) if _has_gpu(levels) else COLUMNS
    lines += ["  " + ln for ln in render_table(columns, level_rows(levels))]
    if record.get("levels"):
        lines.append("  (* peak output tok/s)")
    for err in record.get("errors", []):
        where = f" at c={err['concurrency']}" if err.get("concurrency") else ""
        lines.append(f"  error{where}: {err['message'].splitlines()[0]}")
    return lines
