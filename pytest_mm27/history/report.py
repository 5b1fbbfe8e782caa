"""The history as people read it: a table of the last N runs, change points, PNG trends.

One table per (hardware, topology, workload): a row per run (time, commit,
engine version) and output tok/s per level, a change point's first run
marked ▼ (a regression) or ▲ (an improvement); under it the newest shift of
each series that has one. The same rows render as Markdown (reports and
$GITHUB_STEP_SUMMARY) and as plain text (``python -m pytest_mm27.history show``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from ..report.plots import _figure, _safe
from .changepoints import ChangePointsUnavailable
from .gate import SeriesVerdict, judge_series
from .series import HISTORY_METRICS, Point, RunInfo, SeriesKey

Series = Mapping[SeriesKey, Sequence[tuple[RunInfo, Point]]]
Group = tuple[str, str, str]


def _verdicts(series: Series, group: Group) -> tuple[dict[SeriesKey, SeriesVerdict], str]:
    """Each series' change points; without ruptures, none, and the reason (the table still shows)."""
    keys = [k for k in series if k.group == group and k.metric in HISTORY_METRICS]
    try:
        return {k: judge_series(k, series[k], HISTORY_METRICS[k.metric].tolerance) for k in keys}, ""
    except ChangePointsUnavailable as exc:
        return {k: SeriesVerdict(k, [r for r, p in series[k] if p.valid], [], None, None, 0.0, False)
                for k in keys}, str(exc)


def _level(key: SeriesKey) -> str:
    return f"c={key.concurrency}" + (f" [{key.case}]" if key.case else "")


def group_table(series: Series, group: Group, last: int = 10) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows newest last, notes) for one group's throughput over its last ``last`` runs."""
    verdicts, unavailable = _verdicts(series, group)
    tp_keys = sorted((k for k in verdicts if k.metric == "throughput"), key=lambda k: (k.case, k.concurrency))
    runs: dict[RunInfo, RunInfo] = {}
    for k in tp_keys:
        for run, _ in series[k]:
            runs[run] = run
    ordered = list(runs.values())[-last:] if last > 0 else list(runs.values())
    marks: dict[tuple[SeriesKey, RunInfo], str] = {}
    for k in tp_keys:
        v = verdicts[k]
        for cp in v.change_points:
            marks[(k, v.runs[cp.index])] = " ▼" if cp.regression else " ▲"
    values = {(k, run): p for k in tp_keys for run, p in series[k]}
    header = ["run", "time", "commit", "engine", *[f"tok/s {_level(k)}" for k in tp_keys]]
    rows = []
    for run in ordered:
        cells = []
        for k in tp_keys:
            p = values.get((k, run))
            cell = "–" if p is None else f"{p.value:,.0f}" + ("" if p.valid else " (invalid)")
            cells.append(cell + marks.get((k, run), ""))
        rows.append([run.run_id, (run.created_at or "?")[:16], (run.git_commit or "?")[:10],
                     f"{run.engine} {run.engine_version or '?'}".strip(), *cells])
    notes = []
    for k, v in sorted(verdicts.items(), key=lambda kv: (kv[0].case, kv[0].concurrency, kv[0].metric)):
        # Throughput's change points, and whatever fails the gate: the rest is in the plots.
        if v.change_points and (k.metric == "throughput" or v.failed):
            cp = v.change_points[-1]
            kind = "regression" if cp.regression else "improvement"
            notes.append(f"{_level(k)} {k.metric}: newest change point a {kind} of {cp.shift.text()} at "
                         f"{v.runs[cp.index].describe()}" + (" — FAILS the history gate" if v.failed else ""))
    n_runs = len(runs)
    if unavailable:
        notes.append(unavailable)
    elif n_runs and not notes:
        notes.append(f"no change point in {n_runs} run(s)" + (" (change points need 6 runs or more)"
                                                              if n_runs < 6 else ""))
    return header, rows, notes


def groups_of(series: Series) -> list[Group]:
    return sorted({k.group for k in series})


def markdown_history(series: Series, groups: Collection[Group] | None = None, *, last: int = 10) -> str:
    lines = ["## History", ""]
    wanted = [g for g in groups_of(series) if groups is None or g in groups]
    if not wanted:
        return "\n".join(lines + ["No runs in the history for these records yet.", ""])
    for group in wanted:
        header, rows, notes = group_table(series, group, last)
        lines += [f"### {' / '.join(group)} — last {len(rows)} run(s)", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 4 else "---:"
                                                               for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += ["", *[f"- {n}" for n in notes], ""]
    lines += [("<sub>▼ first run after a change point that is a regression, ▲ an improvement (PELT on log values "
               "with a Welch t-test per shift; intervals 95 %).</sub>"), ""]
    return "\n".join(lines)


def terminal_history(series: Series, groups: Collection[Group] | None = None, *, last: int = 10) -> list[str]:
    out: list[str] = []
    wanted = [g for g in groups_of(series) if groups is None or g in groups]
    for group in wanted:
        header, rows, notes = group_table(series, group, last)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        out.append(f"{' / '.join(group)}: last {len(rows)} run(s)")
        for row in [header, *rows]:
            out.append("  " + "  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(row, widths))))
        out += [f"  {n}" for n in notes] + [""]
    return out or ["the history is empty"]


def plot_history(series: Series, groups: Collection[Group] | None, out_dir: Path | str) -> list[Path]:
    """One PNG per (group, metric): a line per level over the runs, change points marked."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group in [g for g in groups_of(series) if groups is None or g in groups]:
        verdicts, _ = _verdicts(series, group)
        for metric in HISTORY_METRICS.values():
            keys = sorted((k for k in verdicts if k.metric == metric.name), key=lambda k: (k.case, k.concurrency))
            if not keys:
                continue
            fig = _figure(9, 5)
            ax = fig.add_subplot()
            for k in keys:
                v = verdicts[k]
                pts = [p for _, p in series[k] if p.valid and p.value > 0]
                xs = list(range(len(pts)))
                line, = ax.plot(xs, [p.value for p in pts], marker="o", markersize=3, linewidth=1.2,
                                label=_level(k))
                for cp in v.change_points:
                    ax.axvline(cp.index - 0.5, color="tab:red" if cp.regression else "tab:green",
                               linestyle="--", linewidth=1.2, alpha=0.8)
                    ax.annotate(f"{cp.shift.change:+.1%}", (cp.index - 0.5, pts[cp.index].value), fontsize=8,
                                color="tab:red" if cp.regression else "tab:green", xytext=(3, 6),
                                textcoords="offset points")
                if v.runs:
                    ticks = xs[:: max(1, len(xs) // 8)]
                    ax.set_xticks(ticks, [(v.runs[i].git_commit or v.runs[i].run_id)[:8] for i in ticks],
                                  rotation=30, fontsize=7)
                _ = line
            ax.set_xlabel("run (commit), oldest first; dashed: change points (red regression, green improvement)")
            ax.set_ylabel(f"{metric.label} ({metric.unit})")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize=8)
            fig.suptitle(f"{' / '.join(group)}: {metric.label} over runs", fontsize=11, fontweight="bold")
            path = out / f"history-{_safe('--'.join(group))}-{metric.name}.png"
            fig.savefig(path)
            written.append(path)
    return written
