"""The history database: every finished run's points, appended, never rewritten.

One schema for SQLite and PostgreSQL (``dialect`` holds what differs). The
schema is versioned in ``mm27_meta``: a database written by a newer harness,
one that belongs to something else, or a file that is no database at all is
refused with a message naming it, before anything is written. Writers take
the database's write lock for the whole append (SQLite ``BEGIN IMMEDIATE``
with a busy timeout, in WAL mode; a PostgreSQL transaction), so two nightly
jobs finishing together both land; a run already there (by run id, hardware,
topology and workload) is skipped, so an import can be repeated.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..records.model import RunRecord
from .dialect import Dialect, HistoryError, SqliteDialect, dialect_for
from .series import Point, RunInfo, SeriesKey, record_points, run_info

SCHEMA = "pytest-mm27/history"
SCHEMA_VERSION = 1
TABLES = ("mm27_meta", "mm27_runs", "mm27_points")

_RUN_COLUMNS = ("run_id", "hardware", "topology", "workload", "simulated", "git_commit", "harness_version",
                "engine", "engine_version", "created_at", "status", "source")


def _ddl(d: Dialect) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS mm27_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS mm27_runs (
            {d.id_column},
            run_id TEXT NOT NULL, hardware TEXT NOT NULL, topology TEXT NOT NULL, workload TEXT NOT NULL,
            simulated INTEGER NOT NULL, git_commit TEXT, harness_version TEXT, engine TEXT, engine_version TEXT,
            created_at TEXT, status TEXT, source TEXT, appended_at TEXT NOT NULL,
            UNIQUE (run_id, hardware, topology, workload))""",
        """CREATE TABLE IF NOT EXISTS mm27_points (
            run_ref BIGINT NOT NULL REFERENCES mm27_runs (id),
            concurrency INTEGER NOT NULL, case_id TEXT NOT NULL, metric TEXT NOT NULL,
            value DOUBLE PRECISION NOT NULL, low DOUBLE PRECISION, high DOUBLE PRECISION,
            trials INTEGER NOT NULL, valid INTEGER NOT NULL,
            PRIMARY KEY (run_ref, concurrency, case_id, metric))""",
        "CREATE INDEX IF NOT EXISTS mm27_runs_group ON mm27_runs (hardware, topology, workload)",
    ]


@dataclass(frozen=True)
class Appended:
    run: RunInfo
    points: int
    new: bool                   # False: the run was already in the history (skipped)


class HistoryStore:
    """``with HistoryStore(location) as store: store.append(record)``; location: a path or a URL."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.dialect = dialect_for(location)
        self._conn: Any = None

    @property
    def where(self) -> str:
        return self.dialect.where

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # ---- plumbing ----------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.dialect.connect()
        return self._conn

    def _exec(self, cur: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cur.execute(self.dialect.sql(sql), params)
        return cur

    @contextmanager
    def _transaction(self, *, read: bool = False) -> Iterator[Any]:
        """One transaction (``read``: a reader's, which takes no write lock); a driver error
        becomes a HistoryError naming the database."""
        conn = self._connection()
        cur = conn.cursor()
        try:
            cur.execute("BEGIN") if read else self.dialect.begin_write(cur)
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            try:
                cur.execute("ROLLBACK")
            except Exception:       # the connection may be gone; the original error is the one to show
                pass
            if self.dialect.is_driver_error(exc):
                raise HistoryError(self.dialect.explain(exc)) from exc
            raise
        finally:
            cur.close()

    def _check_schema(self, cur: Any, *, create: bool) -> bool:
        """True when our tables are there (made now when ``create``); raise when the database is not ours."""
        tables = self.dialect.table_names(cur)
        if "mm27_meta" in tables:
            meta = dict(self._exec(cur, "SELECT key, value FROM mm27_meta").fetchall())
            if meta.get("schema") != SCHEMA:
                raise HistoryError(f"history database {self.where}: not a pytest-mm27 history (its mm27_meta "
                                   f"says schema {meta.get('schema')!r}); give another --history")
            try:
                version = int(meta.get("schema_version", ""))
            except ValueError:
                raise HistoryError(f"history database {self.where}: mm27_meta field 'schema_version' is "
                                   f"{meta.get('schema_version')!r}, not a number") from None
            if version > SCHEMA_VERSION:
                raise HistoryError(f"history database {self.where}: written by a newer pytest-mm27 (schema "
                                   f"version {version}; this one reads up to {SCHEMA_VERSION}); upgrade "
                                   f"pytest-mm27 or give another --history")
            if version < 1:
                raise HistoryError(f"history database {self.where}: schema version {version} is unknown")
            missing = [t for t in TABLES if t not in tables]
            if missing:
                raise HistoryError(f"history database {self.where}: damaged, table(s) {', '.join(missing)} "
                                   f"missing")
            return True
        ours = sorted(t for t in tables if t in TABLES)
        if ours:
            raise HistoryError(f"history database {self.where}: has table(s) {', '.join(ours)} but no "
                               f"mm27_meta; not a history this harness wrote (or a damaged one)")
        if isinstance(self.dialect, SqliteDialect) and tables:
            # A PostgreSQL database is often shared, but an SQLite file with other tables is someone else's.
            raise HistoryError(f"history database {self.where}: an SQLite database of something else (tables "
                               f"{', '.join(sorted(tables)[:5])}); give another --history")
        if not create:
            return False
        for statement in _ddl(self.dialect):
            cur.execute(statement)
        for key, value in (("schema", SCHEMA), ("schema_version", str(SCHEMA_VERSION))):
            self._exec(cur, "INSERT INTO mm27_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                       (key, value))
        return True

    # ---- writing -----------------------------------------------------------------------------

    def append(self, record: RunRecord, source: str | Path = "") -> Appended:
        info = run_info(record, str(source))
        points = record_points(record)
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        with self._transaction() as cur:
            self.dialect.lock_schema(cur)
            self._check_schema(cur, create=True)
            values = tuple(getattr(info, c) if c != "simulated" else int(info.simulated) for c in _RUN_COLUMNS)
            row = self._exec(cur, f"INSERT INTO mm27_runs ({', '.join(_RUN_COLUMNS)}, appended_at) "
                                  f"VALUES ({', '.join('?' * (len(_RUN_COLUMNS) + 1))}) "
                                  f"ON CONFLICT (run_id, hardware, topology, workload) DO NOTHING RETURNING id",
                             (*values, now)).fetchone()
            if row is None:
                return Appended(info, 0, new=False)
            for p in points:
                self._exec(cur, "INSERT INTO mm27_points (run_ref, concurrency, case_id, metric, value, low, high, "
                                "trials, valid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (row[0], p.concurrency, p.case, p.metric, p.value, p.low, p.high, p.trials, int(p.valid)))
        return Appended(RunInfo(**{**info.__dict__, "seq": int(row[0])}), len(points), new=True)

    # ---- reading -----------------------------------------------------------------------------

    def _readable(self) -> bool:
        """False when there is no history yet (reading never creates the SQLite file)."""
        if isinstance(self.dialect, SqliteDialect) and not self.dialect.path.exists():
            return False
        with self._transaction(read=True) as cur:     # in a transaction: a consistent view beside writers
            return self._check_schema(cur, create=False)

    def runs(self) -> list[RunInfo]:
        """Every run, oldest first (by the run's own time, then by when it was appended)."""
        if not self._readable():
            return []
        with self._transaction(read=True) as cur:
            rows = self._exec(cur, f"SELECT id, {', '.join(_RUN_COLUMNS)} FROM mm27_runs "
                                   f"ORDER BY COALESCE(created_at, ''), id").fetchall()
        return [_run_from_row(row) for row in rows]

    def series(self) -> dict[SeriesKey, list[tuple[RunInfo, Point]]]:
        """Every series' points, oldest run first."""
        if not self._readable():
            return {}
        with self._transaction(read=True) as cur:
            rows = self._exec(cur, f"SELECT r.id, {', '.join('r.' + c for c in _RUN_COLUMNS)}, p.concurrency, "
                                   f"p.case_id, p.metric, p.value, p.low, p.high, p.trials, p.valid "
                                   f"FROM mm27_points p JOIN mm27_runs r ON r.id = p.run_ref "
                                   f"ORDER BY COALESCE(r.created_at, ''), r.id").fetchall()
        out: dict[SeriesKey, list[tuple[RunInfo, Point]]] = {}
        runs: dict[int, RunInfo] = {}
        width = len(_RUN_COLUMNS) + 1
        for row in rows:
            info = runs.get(row[0]) or runs.setdefault(row[0], _run_from_row(row[:width]))
            c, case, metric, value, low, high, trials, valid = row[width:]
            key = SeriesKey(info.hardware, info.topology, info.workload, int(c), case, metric)
            out.setdefault(key, []).append((info, Point(int(c), case, metric, float(value),
                                                        float(low if low is not None else value),
                                                        float(high if high is not None else value),
                                                        int(trials), bool(valid))))
        return out


def _run_from_row(row: Any) -> RunInfo:
    data = dict(zip(("seq", *_RUN_COLUMNS), row))
    data["simulated"] = bool(data["simulated"])
    data["seq"] = int(data["seq"])
    for key in ("harness_version", "engine", "status", "source"):
        data[key] = data[key] or ""
    return RunInfo(**data)
