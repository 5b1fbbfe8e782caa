"""The history store on SQLite and on a real PostgreSQL server (``$MM27_TEST_POSTGRES``, which
``.ci/postgres.sh`` starts in CI): append, read back, concurrent writers, import, bad databases."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_mm27.benchmarks.synthetic import make_record
from pytest_mm27.history import HistoryError, HistoryStore, append_run
from pytest_mm27.history.__main__ import main as history_main
from pytest_mm27.history.store import SCHEMA_VERSION
from pytest_mm27.records.model import RunRecord, as_record
from pytest_mm27.records.store import write_json_atomic

PG_ENV = "MM27_TEST_POSTGRES"


def nightly(i: int, *, topology: str = "dp3", slowdown: float = 1.0, levels=(1, 16)) -> RunRecord:
    data = make_record(trials=2, seed=i, slowdown=slowdown, levels=levels, topology=topology)
    data["run_id"] = f"night-{i:03d}"
    data["created_at"] = f"2025-03-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00"
    data["git_commit"] = f"{i:040x}"
    return as_record(data)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards (xdist workers never share one)."""
    base = os.environ.get(PG_ENV)
    if not base:
        why = f"${PG_ENV} not set (.ci/postgres.sh starts a server and sets it)"
        if os.environ.get("MM27_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"MM27_REQUIRE_POSTGRES=1 but {why}", pytrace=False)
        pytest.skip(why)
    psycopg = pytest.importorskip("psycopg")
    name = f"mm27_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    head, _, _ = base.rpartition("/")
    yield f"{head}/{name}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "results" / "history.sqlite")
    return request.getfixturevalue("pg_url")


def sql(location: str, statement: str) -> None:
    """Tamper with a database behind the store's back."""
    if "://" in location:
        import psycopg
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(statement)
    else:
        with sqlite3.connect(location) as conn:
            conn.execute(statement)


def test_append_and_read_back(location: str) -> None:
    records = [nightly(i) for i in range(3)]
    outcome = append_run(location, records, [f"runs/{i}/dp3.json" for i in range(3)])
    assert not outcome.failures
    assert [a.new for a in outcome.appended] == [True] * 3
    with HistoryStore(location) as store:
        runs = store.runs()
        series = store.series()
    assert [r.run_id for r in runs] == ["night-000", "night-001", "night-002"]
    assert runs[0].hardware == "rtx-pro-6000-x3" and runs[0].engine_version == "0.11.0"
    assert runs[1].git_commit == f"{1:040x}" and runs[1].source == "runs/1/dp3.json"
    tp = [k for k in series if k.metric == "throughput" and k.concurrency == 16]
    assert len(tp) == 1 and len(series[tp[0]]) == 3
    _, point = series[tp[0]][2]
    trials = [t.output_tok_s for t in records[2].level(16).trials]
    assert point.value == pytest.approx(math.exp(sum(map(math.log, trials)) / 2))
    assert (point.low, point.high, point.trials) == (min(trials), max(trials), 2)
    assert {k.metric for k in series} >= {"throughput", "ttft_p99", "tpot_p50", "itl_p50", "e2el_p50"}


def test_append_is_idempotent_per_run(location: str) -> None:
    append_run(location, [nightly(0)], ["a.json"])
    again = append_run(location, [nightly(0), nightly(1)], ["a.json", "b.json"])
    assert [a.new for a in again.appended] == [False, True]
    assert again.lines("db") == ["history: 1 run record(s) appended to db (1 already there)"]
    with HistoryStore(location) as store:
        assert len(store.runs()) == 2


def test_client_bound_levels_are_kept_but_not_valid(location: str) -> None:
    data = make_record(trials=1, client_bound=[16], levels=(1, 4, 16))    # its verdict still says pass
    data["levels"][1]["verdict"]["status"] = "invalid"
    append_run(location, [as_record(data)], ["x.json"])
    with HistoryStore(location) as store:
        valid = {(k.concurrency, p.valid) for k, pts in store.series().items() for _, p in pts}
    assert valid == {(1, True), (4, False), (16, False)}


def _writer(location: str, worker: int, n: int) -> None:
    for i in range(n):
        outcome = append_run(location, [nightly(100 * worker + i)], [f"w{worker}-{i}.json"])
        assert not outcome.failures, outcome.failures


def test_concurrent_writers_from_processes_lose_nothing(location: str) -> None:
    ctx = multiprocessing.get_context("spawn")      # fresh interpreters: nothing shared but the database
    procs = [ctx.Process(target=_writer, args=(location, w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with HistoryStore(location) as store:
        runs = store.runs()
        series = store.series()
    assert sorted(r.run_id for r in runs) == sorted(f"night-{100 * w + i:03d}" for w in range(4) for i in range(6))
    assert all(len(points) == 24 for key, points in series.items() if key.case == "")


def test_import_command_loads_run_folders_and_skips_bad_files(location: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "results" / "runs"
    for i in range(3):
        write_json_atomic(runs / f"2025-{i}" / "dp3.json", nightly(i).to_dict())
    (runs / "2025-0" / "logs").mkdir()
    (runs / "2025-0" / "logs" / "server.json").write_text("{}")
    (runs / "2025-9").mkdir()
    (runs / "2025-9" / "dp3.json").write_text("{not json")
    assert history_main(["--history", location, "import", str(runs)]) == 0
    out = capsys.readouterr()
    assert "imported 3 run record(s)" in out.out and "1 skipped" in out.out
    assert "2025-9/dp3.json: not valid JSON" in out.err
    assert history_main(["--history", location, "import", str(runs)]) == 0
    assert "imported 0 run record(s)" in capsys.readouterr().out
    assert history_main(["--history", location, "show", "--last", "2"]) == 0
    shown = capsys.readouterr().out
    assert "rtx-pro-6000-x3 / dp3 / default: last 2 run(s)" in shown
    assert "night-002" in shown and "night-000" not in shown
    assert history_main(["--history", location, "import", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_newer_schema_is_refused(location: str) -> None:
    append_run(location, [nightly(0)], ["a.json"])
    sql(location, f"UPDATE mm27_meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    outcome = append_run(location, [nightly(1)], ["runs/1/dp3.json"])
    [failure] = outcome.failures
    assert f"written by a newer pytest-mm27 (schema version {SCHEMA_VERSION + 1}; this one reads up to " \
           f"{SCHEMA_VERSION})" in failure
    assert failure.endswith("the run record runs/1/dp3.json is kept")
    with pytest.raises(HistoryError, match="newer pytest-mm27"):
        HistoryStore(location).runs()


def test_foreign_meta_is_refused(location: str) -> None:
    append_run(location, [nightly(0)], ["a.json"])
    sql(location, "UPDATE mm27_meta SET value = 'someone-else' WHERE key = 'schema'")
    with pytest.raises(HistoryError, match="not a pytest-mm27 history .*'someone-else'"):
        HistoryStore(location).append(nightly(1))


def test_our_tables_without_meta_are_refused(location: str) -> None:
    append_run(location, [nightly(0)], ["a.json"])
    sql(location, "DROP TABLE mm27_meta")
    with pytest.raises(HistoryError, match=r"has table\(s\) mm27_points, mm27_runs but no mm27_meta"):
        HistoryStore(location).append(nightly(1))


def test_postgres_database_shared_with_other_tables_is_fine(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE users (id int)")
    assert not append_run(pg_url, [nightly(0)], ["a.json"]).failures


def test_postgres_unreachable_server_says_where(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    outcome = append_run("postgresql://nobody:secret@127.0.0.1:1/x", [nightly(0)], ["a.json"])
    [failure] = outcome.failures
    assert failure.startswith("history database postgresql://nobody:***@127.0.0.1:1/x: cannot connect")
    assert "secret" not in failure and failure.endswith("the run record a.json is kept")


def test_corrupt_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    [failure] = append_run(db, [nightly(0)], ["runs/0/dp3.json"]).failures
    assert f"history database {db}: not an SQLite database, or a corrupt one" in failure
    assert db.read_bytes().startswith(b"this is not a database")      # left as it was


def test_foreign_sqlite_database(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(HistoryError, match=r"an SQLite database of something else \(tables users\)"):
        HistoryStore(db).append(nightly(0))


def test_unwritable_path_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file where the folder should be")
    [failure] = append_run(blocker / "history.sqlite", [nightly(0)], ["r.json"]).failures
    assert f"history database {blocker / 'history.sqlite'}: cannot create its folder" in failure


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        [failure] = append_run(folder / "history.sqlite", [nightly(0)], ["r.json"]).failures
    finally:
        folder.chmod(0o755)
    assert "cannot write there" in failure


def test_read_only_database_file(tmp_path: Path) -> None:
    """A database opened read-only (as on a read-only mount) refuses the append with a clear error."""
    db = tmp_path / "history.sqlite"
    append_run(db, [nightly(0)], ["a.json"])
    store = HistoryStore(f"sqlite://{db}")
    store.dialect.connect = lambda: sqlite3.connect(f"file:{db}?mode=ro", uri=True,  # type: ignore[method-assign]
                                                    isolation_level=None)
    with pytest.raises(HistoryError, match="cannot write there .*readonly"):
        store.append(nightly(1))
    assert [r.run_id for r in store.runs()] == ["night-000"]      # reading still works


def test_reading_a_missing_history_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "none" / "history.sqlite"
    with HistoryStore(db) as store:
        assert store.runs() == [] and store.series() == {}
    assert not db.exists()


def test_unknown_url_scheme() -> None:
    with pytest.raises(HistoryError, match="unknown scheme 'mysql'"):
        HistoryStore("mysql://x/y")


def test_json_record_round_trip_is_unchanged(tmp_path: Path) -> None:
    """The history reads records; it never rewrites them."""
    path = tmp_path / "runs" / "1" / "dp3.json"
    write_json_atomic(path, nightly(1).to_dict())
    before = path.read_bytes()
    assert history_main(["--history", str(tmp_path / "h.sqlite"), "import", str(path)]) == 0
    assert path.read_bytes() == before
    assert json.loads(before)["run_id"] == "night-001"
