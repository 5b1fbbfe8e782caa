"""Per-request samples files: written beside records, read back, percentiles recomputed exactly, trials merged."""

from __future__ import annotations

import gzip

import pytest

from pytest_mm27.catalog.arrivals import Arrival
from pytest_mm27.errors import Mm27Error
from pytest_mm27.loadgen import Percentiles, RequestRecord, run_level
from pytest_mm27.records.samples import GZIP_FROM, latency_percentiles, merge, read_samples, write_samples

from sim_helpers import MODEL, sim  # noqa: F401  (fixture)
from test_loadgen import make_workload


def _rec(i: int, tokens: int = 4) -> RequestRecord:
    sent = 0.1 * i + 1 / 3
    return RequestRecord(i, "http://e", 0, sent, sent, sent + 0.5, ok=True, output_tokens=tokens, prompt_tokens=7,
                         chunk_times=[sent + 0.01 * (k + 1) + 1e-9 * i for k in range(tokens)])


def test_round_trip_is_exact_and_small_files_stay_plain(tmp_path):
    recs = [_rec(i) for i in range(5)]
    failed = RequestRecord(9, "http://e", 1, 2.0, 2.0, 2.5, error="HTTP 500: boom")
    path = write_samples(tmp_path / "c4-t1", [*((r, True) for r in recs), (failed, False)], {"concurrency": 4})
    assert path.name == "c4-t1.jsonl"
    header, samples = read_samples(path)
    assert header["concurrency"] == 4 and header["schema"] == "pytest-mm27-samples"
    assert [s.record for s in samples] == [*recs, failed]
    assert [s.measured for s in samples] == [True] * 5 + [False]


def test_large_files_are_gzipped(tmp_path):
    recs = [(_rec(i, tokens=200), True) for i in range(400)]
    path = write_samples(tmp_path / "c64-t2", recs, {})
    assert path.name == "c64-t2.jsonl.gz" and len(gzip.decompress(path.read_bytes())) >= GZIP_FROM
    assert [s.record for s in read_samples(path)[1]] == [r for r, _ in recs]


def test_a_bad_line_is_named(tmp_path):
    path = write_samples(tmp_path / "x", [(_rec(0), True)], {})
    path.write_text(path.read_text() + '{"index": 1, "bogus": true, "measured": true}\n')
    with pytest.raises(Mm27Error, match=r"x\.jsonl:3: bad sample line"):
        read_samples(path)
    (tmp_path / "y.jsonl").write_text('{"schema": "other"}\n')
    with pytest.raises(Mm27Error, match=r"y\.jsonl:1"):
        read_samples(tmp_path / "y.jsonl")


def _same(metrics, blocks: dict[str, Percentiles]) -> None:
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert blocks[name] == getattr(metrics, name), name     # bit for bit, not approximately


@pytest.mark.parametrize("shape", ["count", "open", "steady"])
def test_percentiles_recomputed_from_the_file_are_the_recorded_ones(sim, tmp_path, shape):  # noqa: F811
    wl = {"count": make_workload(output_tokens=12),
          "open": make_workload(output_tokens=12, arrival=Arrival(kind="gamma", rate=30.0, burstiness=0.5,
                                                                  requests=20)),
          "steady": make_workload(output_tokens=12, measure="steady", window_s=1.0, min_window_s=0.5)}[shape]
    samples: list = []
    m = run_level([sim.url], MODEL, wl, 4, samples=samples)
    path = write_samples(tmp_path / shape, samples, {"wall_epoch": m.wall_epoch})
    _, back = read_samples(path)
    measured = [s.record for s in back if s.measured]
    assert len(measured) == m.requests
    _same(m, latency_percentiles(measured))
    if shape == "steady":
        assert any(not s.measured for s in back)      # the warm-up and tail are kept, marked


def test_trials_merge_into_one_sample(sim, tmp_path):  # noqa: F811
    wl = make_workload(output_tokens=8)
    files, everything = [], []
    for k in (1, 2):
        samples: list = []
        run_level([sim.url], MODEL, wl, 2, samples=samples)
        everything.extend(r for r, _ in samples)
        files.append(write_samples(tmp_path / f"c2-t{k}", samples, {"trial": k}))
    merged = merge(files)
    assert len(merged) == len(everything)
    assert latency_percentiles(merged) == latency_percentiles(everything)


def test_a_replayed_trace_keeps_its_ids_with_each_sample(tmp_path):
    recs = [(_rec(i), True) for i in range(3)]
    extras = {0: {"prefix_id": "sys-0", "session_id": "u1"}, 1: {"prefix_id": None, "session_id": None},
              2: {"session_id": "u2"}}
    _, back = read_samples(write_samples(tmp_path / "t", recs, {}, extras))
    assert [s.extra for s in back] == [{"prefix_id": "sys-0", "session_id": "u1"}, {}, {"session_id": "u2"}]
    assert [s.record for s in back] == [r for r, _ in recs]
