"""PNG plots of a sweep: output tok/s vs concurrency, TTFT p99 vs throughput.

matplotlib is optional: nothing else in the harness needs it, and
``plot_record`` raises ``PlotsUnavailable`` with the install hint when it is
missing. The figures are drawn with ``matplotlib.figure.Figure`` and the Agg
canvas directly, so no pyplot global state and no display are involved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..records.model import IMPROVED, REGRESSED, RecordComparison, RunRecord, Trial, as_record
from ..errors import Mm27Error
from .terminal import record_title

INSTALL_HINT = "pip install matplotlib (or pip install 'pytest-mm27[plots]')"


class PlotsUnavailable(Mm27Error):
    """matplotlib is not installed."""


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotsUnavailable(f"--plots-dir needs matplotlib, which is not installed ({exc}); "
                               f"{INSTALL_HINT}. Everything else works without it.") from None
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(record: RunRecord, get: Any) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per measured level: concurrency, mean value, min and max over trials."""
    cs, mean, lo, hi = [], [], [], []
    for level in record.levels:
        values = [v for v in (get(t) for t in level.trials) if isinstance(v, (int, float)) and v > 0]
        if not values:
            continue
        cs.append(level.concurrency)
        mean.append(sum(values) / len(values))
        lo.append(min(values))
        hi.append(max(values))
    return cs, mean, lo, hi


def _tok_s(t: Trial) -> Any:
    return t.output_tok_s


def _ttft_p99(t: Trial) -> Any:
    return t.ttft_ms.p99


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _wrap(title: str, width: int = 95) -> str:
    parts, line = [], ""
    for word in title.split(" "):
        if line and len(line) + 1 + len(word) > width:
            parts.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*parts, line])


def plot_record(record: RunRecord | Mapping[str, Any], out_dir: Path | str, *,
                baseline: RunRecord | Mapping[str, Any] | None = None,
                comparison: RecordComparison | None = None) -> list[Path]:
    """Write ``<topology>-throughput.png`` and ``<topology>-ttft-vs-throughput.png``; returns the paths."""
    record = as_record(record)
    baseline = as_record(baseline) if baseline is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topo = _safe(record.topology_name or "topology")
    title = _wrap(record_title(record))
    cs, tp, tp_lo, tp_hi = _series(record, _tok_s)
    paths = []

    # 1. output tok/s vs concurrency, with floors and the baseline curve
    fig = _figure(9, 5.5)
    ax = fig.add_subplot()
    if baseline is not None:
        bcs, btp, _, _ = _series(baseline, _tok_s)
        ax.plot(bcs, btp, linestyle="--", color="0.45", marker="o", markersize=4, label="baseline")
    if cs:
        yerr = [[m - lo for m, lo in zip(tp, tp_lo)], [hi - m for m, hi in zip(tp, tp_hi)]]
        ax.errorbar(cs, tp, yerr=yerr, color="tab:blue", marker="o", markersize=5, capsize=3, linewidth=2,
                    label="this run (mean; bars: min-max of trials)")
    floors = [(lv.concurrency, lv.floor.tok_s) for lv in record.levels if lv.floor]
    if floors:
        ax.scatter([c for c, _ in floors], [f for _, f in floors], marker="_", s=400, linewidths=2.5,
                   color="tab:red", zorder=5, label="floor")
    if comparison is not None:
        for status, color, label in ((REGRESSED, "tab:red", "regressed"), (IMPROVED, "tab:green", "improved")):
            pts = [(lv.concurrency, m.now) for lv in comparison.levels
                   for m in [lv.get("throughput")] if m is not None and m.status == status and m.now]
            if pts:
                ax.scatter([c for c, _ in pts], [v for _, v in pts], s=150, facecolors="none", edgecolors=color,
                           linewidths=2, zorder=6, label=f"{label} vs baseline")
    ax.set_xscale("log", base=2)
    if cs:
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.xaxis.set_minor_locator(_no_ticks())
        if len(cs) > 8:   # high levels crowd together on a log axis
            ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(_thousands())
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.suptitle("Output throughput vs concurrency", fontsize=12, fontweight="bold")
    path = out / f"{topo}-throughput.png"
    fig.savefig(path)
    paths.append(path)

    # 2. TTFT p99 vs throughput: the latency price of each step up in load
    fig = _figure(9, 5.5)
    ax = fig.add_subplot()
    for rec, style, label in ((baseline, dict(linestyle="--", color="0.45", markersize=4), "baseline"),
                              (record, dict(color="tab:orange", linewidth=2, markersize=5), "this run")):
        if rec is None:
            continue
        by_c_tp = dict(zip(*_series(rec, _tok_s)[:2]))
        rc, ttft, _, _ = _series(rec, _ttft_p99)
        pts = [(by_c_tp[c], v, c) for c, v in zip(rc, ttft) if c in by_c_tp]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
        if rec is record:
            for x, y, c in pts:
                ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_thousands())
    ax.set_xlabel("output tokens / s")
    ax.set_ylabel("TTFT p99 (ms, log scale)")
    ax.xaxis.set_major_formatter(_thousands())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.suptitle("Time to first token (p99) vs throughput", fontsize=12, fontweight="bold")
    path = out / f"{topo}-ttft-vs-throughput.png"
    fig.savefig(path)
    paths.append(path)
    return paths


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _pos: f"{v:,.0f}")


def _no_ticks() -> Any:
    from matplotlib.ticker import NullLocator
    return NullLocator()


def plot_records(records: Sequence[RunRecord | Mapping[str, Any]], out_dir: Path | str, *,
                 baselines: Mapping[str, Mapping[str, Any]] | None = None,
                 comparisons: Mapping[str, RecordComparison] | None = None) -> list[Path]:
    """``plot_record`` for each record; baselines and comparisons by topology name."""
    paths: list[Path] = []
    for rec in records:
        topo = as_record(rec).topology_name
        paths += plot_record(rec, out_dir, baseline=(baselines or {}).get(topo),
                             comparison=(comparisons or {}).get(topo))
    return paths


__all__ = ["INSTALL_HINT", "PlotsUnavailable", "plot_record", "plot_records", "plots_available"]
