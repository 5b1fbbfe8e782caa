"""``python -m pytest_mm27.history``: load run records into the history, show it, judge it.

    python -m pytest_mm27.history import results/runs/            # every record under these paths
    python -m pytest_mm27.history show --last 10 [--topology dp3]
    python -m pytest_mm27.history gate [--tolerance throughput=5%]    # exit 1 on a regression

``--history PATH|URL`` picks the database (default results/history.sqlite).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import Mm27Error
from ..gate.specs import parse_tolerances
from ..records.store import load_record
from . import append_run
from .dialect import redact_url
from .gate import history_gate
from .report import terminal_history
from .store import HistoryStore

DEFAULT = str(Path("results") / "history.sqlite")


def _record_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # run folders hold <topology>.json; logs/ and samples beside them are not records
            files += sorted(p for p in path.rglob("*.json") if "logs" not in p.parts
                            and not p.name.endswith(".samples.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise Mm27Error(f"import: {path}: no such file or folder")
    return files


def cmd_import(args: argparse.Namespace) -> int:
    records, sources, problems = [], [], []
    for path in _record_files(args.paths):
        try:
            records.append(load_record(path))
            sources.append(str(path))
        except Mm27Error as exc:
            problems.append(f"skipped {exc}")
    outcome = append_run(args.history, records, sources)
    for line in problems:
        print(line, file=sys.stderr)
    new = sum(1 for a in outcome.appended if a.new)
    print(f"imported {new} run record(s) into {redact_url(args.history)}"
          f" ({len(outcome.appended) - new} already there, {len(problems)} skipped)")
    for failure in outcome.failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if outcome.failures else 0


def _groups(store: HistoryStore, topology: str | None) -> set[tuple[str, str, str]] | None:
    if not topology:
        return None
    return {r.group for r in store.runs() if r.topology == topology}


def cmd_show(args: argparse.Namespace) -> int:
    with HistoryStore(args.history) as store:
        series = store.series()
        groups = _groups(store, args.topology)
    for line in terminal_history(series, groups, last=args.last):
        print(line)
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    with HistoryStore(args.history) as store:
        series = store.series()
        groups = _groups(store, args.topology)
    verdicts = history_gate(series, args.tolerance, groups)
    failed = [v for v in verdicts if v.failed]
    for v in failed:
        print(v.message())
    print(f"history gate: {len(failed)} of {len(verdicts)} series regressed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.history", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", default=DEFAULT, help=f"SQLite file or postgresql:// URL (default {DEFAULT})")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="append run records (files or folders) to the history")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("show", help="the last runs of each series, with change points")
    p.add_argument("--last", type=int, default=10)
    p.add_argument("--topology")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("gate", help="exit 1 when a series' newest change point is a regression past tolerance")
    p.add_argument("--tolerance", type=parse_tolerances, default=None, metavar="SPEC")
    p.add_argument("--topology")
    p.set_defaults(func=cmd_gate)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except Mm27Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
