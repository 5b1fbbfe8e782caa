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
from .terminal import keyed, record_title

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


def _cases(record: RunRecord) -> list[str]:
    """The record's level groups: "" (the sweep) first, then each user test's case, in order."""
    return list(dict.fromkeys(["", *(lv.case or "" for lv in record.levels)]))


def _case_label(case: str) -> str:
    return case if len(case) <= 48 else "…" + case[-47:]


def _series(record: RunRecord, get: Any, case: str = "") -> tuple[list[int], list[float], list[float], list[float]]:
    """Per measured level of one case ("" for the sweep): concurrency, mean value, min and max over trials."""
    cs, mean, lo, hi = [], [], [], []
    for level in record.levels:
        if (level.case or "") != case:
            continue
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
                comparison: RecordComparison | None = None, stem: str | None = None) -> list[Path]:
    """Write ``<stem>-throughput.png`` and ``<stem>-ttft-vs-throughput.png`` (``stem``: the record file's,
    default the topology's name); returns the paths."""
    record = as_record(record)
    baseline = as_record(baseline) if baseline is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topo = _safe(stem or record.topology_name or "topology")
    title = _wrap(record_title(record))
    cs, tp, tp_lo, tp_hi = _series(record, _tok_s)
    # A user test's levels (its case) are a series of their own beside the sweep's.
    case_series = [(case, *_series(record, _tok_s, case)[:2]) for case in _cases(record)[1:]]
    all_cs = sorted({*cs, *(c for _, ccs, _ in case_series for c in ccs)})
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
    for case, ccs, ctp in case_series:
        if ccs:
            ax.plot(ccs, ctp, marker="D", markersize=6, linewidth=1, label=_case_label(case))
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
    if all_cs:
        ax.set_xticks(all_cs, [str(c) for c in all_cs])
        ax.xaxis.set_minor_locator(_no_ticks())
        if len(all_cs) > 8:   # high levels crowd together on a log axis
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
    curves: list[tuple[RunRecord | None, str, dict[str, Any], str]] = [
        (baseline, "", dict(linestyle="--", color="0.45", markersize=4), "baseline"),
        (record, "", dict(color="tab:orange", linewidth=2, markersize=5), "this run"),
        *((record, case, dict(marker="D", linewidth=1, markersize=6), _case_label(case)) for case in _cases(record)[1:]),
    ]
    for rec, case, style, label in curves:
        if rec is None:
            continue
        by_c_tp = dict(zip(*_series(rec, _tok_s, case)[:2]))
        rc, ttft, _, _ = _series(rec, _ttft_p99, case)
        pts = [(by_c_tp[c], v, c) for c, v in zip(rc, ttft) if c in by_c_tp]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **{"marker": "o", **style}, label=label)
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
                 baselines: Mapping[Any, RunRecord | Mapping[str, Any]] | None = None,
                 comparisons: Mapping[Any, RecordComparison] | None = None,
                 stems: Sequence[str] | None = None) -> list[Path]:
    """``plot_record`` for each record; baselines and comparisons by record key (topology, workload)
    or by topology name; ``stems`` (aligned with ``records``) name the files, default the topologies."""
    paths: list[Path] = []
    for i, rec in enumerate(records):
        record = as_record(rec)
        paths += plot_record(record, out_dir, baseline=keyed(baselines or {}, record),
                             comparison=keyed(comparisons or {}, record), stem=stems[i] if stems else None)
    return paths


__all__ = ["INSTALL_HINT", "PlotsUnavailable", "plot_record", "plot_records", "plots_available"]
