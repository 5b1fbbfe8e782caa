"""Reports: terminal table, Markdown (+ step summary), PNG plots, pytest-benchmark export."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mm27.report.benchmark_export import (
    benchmark_stats,
    export_pytest_benchmark,
    next_storage_path,
)
from pytest_mm27.benchmarks.synthetic import make_record
from pytest_mm27.gate.compare import compare_records
from pytest_mm27.report.markdown import markdown_report, write_markdown
from pytest_mm27.records.store import write_json_atomic

BASE = make_record(seed=1, noise=0.0)
NOW = make_record(seed=2, noise=0.0, slowdown={64: 1.2}, failed={256: 4}, client_bound=[1], floors={64: 5_000})
OTHER = make_record(seed=3, topology="tp4")


@pytest.fixture
def comparison():
    return compare_records(BASE, NOW, baseline_path="results/baselines/rtx-pro-6000-x3/dp3--default.json")


def test_markdown_table_per_topology(comparison) -> None:
    text = markdown_report([NOW, OTHER], {"dp3": comparison}, notes={"tp4": "no baseline for tp4"})
    assert text.startswith("# pytest-mm27 results\n\n**1 of 1 compared topologies regressed**")
    assert "## dp3" in text and "## tp4" in text
    assert "Baseline `results/baselines/rtx-pro-6000-x3/dp3--default.json` (engine vllm 0.11.0" in text
    assert "| Concurrency | Output tok/s | Baseline | Δ | TTFT p99 | Baseline | Δ |" in text
    row64 = next(ln for ln in text.splitlines() if ln.startswith("| 64 |"))
    cells = [c.strip() for c in row64.strip("|").split("|")]
    assert cells[1] == "5,161" and cells[2] == "6,194" and cells[3] == "**-16.7%** ❌"
    assert cells[11] == "5,000" and cells[13] == "❌ regressed"
    row256 = next(ln for ln in text.splitlines() if ln.startswith("| 256 |"))
    assert "12/1500 (**+0.80 pt** ❌)" in row256 and "(not compared)" in row256
    assert "- output_tok_s regressed at c=64: baseline 6,194, now 5,161 (-16.7%)" in text
    assert "c=1 invalid: this run: client-bound" in text
    assert "No comparison: no baseline for tp4" in text
    tp4 = text.split("## tp4")[1]
    assert "| 8 | 1,426 | – | – |" in tp4


def test_markdown_without_comparisons() -> None:
    text = markdown_report([BASE])
    assert "No baseline comparison" in text and "| 1 | 197 |" in text


def test_markdown_escapes_pipes(comparison) -> None:
    rec = json.loads(json.dumps(NOW))
    rec["errors"] = [{"concurrency": 8, "message": "bad | thing\nmore"}]
    text = markdown_report([rec], {"dp3": comparison})
    assert "- error at c=8: bad \\| thing" in text


def test_write_markdown_and_step_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "reports" / "mm27.md"
    written = write_markdown(out, "# hello\n")
    assert written == [out, summary]
    assert out.read_text() == "# hello\n"
    assert summary.read_text() == "earlier step\n# hello\n"      # appended, never replaced
    write_markdown(out, "# again\n")
    assert out.read_text() == "# again\n" and summary.read_text().count("#") == 2


def test_write_markdown_without_step_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert write_markdown(tmp_path / "r.md", "x") == [tmp_path / "r.md"]
    assert write_markdown(None, "x") == []


def test_markdown_report_is_readable_by_anyone_like_the_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    out = tmp_path / "r.md"
    write_markdown(out, "x")
    record = tmp_path / "r.json"
    write_json_atomic(record, {"x": 1})
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(record.stat().st_mode) == 0o644


# ---- plots ---------------------------------------------------------------------------------

def test_plots(tmp_path: Path, comparison) -> None:
    pytest.importorskip("matplotlib")
    from pytest_mm27.report.plots import plot_records
    paths = plot_records([NOW, OTHER], tmp_path, baselines={"dp3": BASE}, comparisons={"dp3": comparison})
    assert [p.name for p in paths] == ["dp3-throughput.png", "dp3-ttft-vs-throughput.png",
                                       "tp4-throughput.png", "tp4-ttft-vs-throughput.png"]
    for p in paths:
        head = p.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert (width, height) == (990, 605)


def test_plots_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from pytest_mm27.report import plots
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert not plots.plots_available()
    with pytest.raises(plots.PlotsUnavailable, match=r"needs matplotlib.*pip install matplotlib"):
        plots.plot_record(NOW, tmp_path)


# ---- pytest-benchmark export ---------------------------------------------------------------

def test_stats_match_pytest_benchmark() -> None:
    stats_mod = pytest.importorskip("pytest_benchmark.stats")
    for data in ([3.0], [1.0, 2.0], [5.0, 1.0, 2.0], [1.0, 9.0, 2.0, 3.0], [1, 2, 3, 4, 5, 100],
                 [0.5, 0.7, 0.6, 0.9, 0.1, 0.3, 0.2]):
        theirs = stats_mod.Stats()
        for v in data:
            theirs.update(v)
        mine = benchmark_stats(data)
        for field in stats_mod.Stats.fields:
            if field == "hd15iqr" and _old_hd15iqr():
                continue    # fixed in pytest-benchmark 5.3: checked against Tukey's definition below
            assert mine[field] == pytest.approx(getattr(theirs, field)), (data, field)
    assert benchmark_stats([1, 2, 3, 4, 5, 100])["hd15iqr"] == 5      # 100 lies past the upper fence


def _old_hd15iqr() -> bool:
    import pytest_benchmark
    major, minor = (int(x) for x in pytest_benchmark.__version__.split(".")[:2])
    return (major, minor) < (5, 3)


def test_export_loads_and_compares_with_pytest_benchmark(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.storage.file import FileStorage

    storage = tmp_path / ".benchmarks"
    first = export_pytest_benchmark([BASE, OTHER], next_storage_path(storage))
    second = export_pytest_benchmark([NOW], next_storage_path(storage))
    assert first.name == "0001_mm27.json" and second.name == "0002_mm27.json"

    doc = json.loads(second.read_text())
    assert set(doc) >= {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    names = [b["name"] for b in doc["benchmarks"]]
    assert "mm27[dp3-c64]" in names
    assert "mm27[dp3-c1]" not in names and "mm27[dp3-c256]" not in names     # client-bound, errors
    assert {s["concurrency"] for s in doc["mm27"]["skipped"]} == {1, 256}
    bench = doc["benchmarks"][names.index("mm27[dp3-c64]")]
    assert bench["stats"]["rounds"] == 3 and bench["stats"]["iterations"] == 1
    assert bench["stats"]["ops"] == pytest.approx(12_000 * 64 / 124 / 1.2)   # OPS reads as tok/s
    assert doc["machine_info"]["mm27_hardware"]["profile"] == "rtx-pro-6000-x3"

    # pytest-benchmark's own loader accepts the files
    fs = FileStorage(storage, logger=Logger(Logger.QUIET))
    loaded = list(fs.load_benchmarks())
    assert len(loaded) == len(names) + 6 + 6
    assert all("mean" in b and "ops" in b for b in loaded)

    # ... and its command line compares them
    out = subprocess.run([sys.executable, "-m", "pytest_benchmark", "--storage", str(storage), "compare",
                          "--group-by", "group", "--columns", "mean,ops,rounds"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "mm27 dp3 · default · rtx-pro-6000-x3 (seconds per output token)" in out.stdout
    assert "mm27[dp3-c64] (0001_mm27)" in out.stdout and "mm27[dp3-c64] (0002_mm27)" in out.stdout


def test_export_refuses_nothing() -> None:
    from pytest_mm27.report.benchmark_export import to_pytest_benchmark
    with pytest.raises(ValueError, match="no run records"):
        to_pytest_benchmark([])
