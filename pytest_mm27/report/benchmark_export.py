"""Export run records in pytest-benchmark's saved-JSON format.

For teams that keep ``.benchmarks/`` and read it with ``pytest-benchmark
compare``. What is exported, and why it is honest:

- One pytest-benchmark "benchmark" per measured level, named
  ``mm27[<topology>-c<concurrency>]`` (a user test's level adds its case:
  ``mm27[<topology>-c<concurrency>-<case>]``), grouped per topology + workload +
  hardware profile. Its unit is pytest-benchmark's own: **seconds** — here
  seconds per output token, ``1 / output_tok_s`` of each trial (the wall
  time of the measured window divided by the tokens generated in it).
  Lower is better, as for any pytest-benchmark timing, and the "OPS" column
  pytest-benchmark derives (1 / mean) reads as output tokens per second.
- One *round* per trial (``--trials N``), ``iterations`` 1. The statistics
  (min, max, mean, stddev, median, quartiles, outliers) are computed the way
  ``pytest_benchmark.stats.Stats`` computes them, over those rounds. With
  ``--trials 1`` the stddev is 0: pytest-benchmark shows no noise because
  none was measured, not because there is none.
- Levels that were not measured, were client-bound or had failed requests
  are left out (listed under the extra top-level key ``mm27.skipped``):
  pytest-benchmark has no notion of an invalid measurement, and a number in
  its table would be read as a valid one.
- ``machine_info`` describes the host that ran the *client* (which is what
  pytest-benchmark means by it) plus ``mm27_hardware`` (profile, simulated,
  GPUs) so a simulated run is never mistaken for hardware numbers.

What it is not: latency percentiles (TTFT, TPOT) are not timings of one
operation repeated, so they are not exported as benchmarks; they stay in
the run record. ``pytest-benchmark compare`` does no noise-aware gating;
``compare.compare_records`` does.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..gate.compare import invalid_reason
from ..records.model import RunRecord, as_record
from ..records.store import write_json_atomic

# The pytest-benchmark version whose file format this writes (its files carry a "version" key).
FORMAT_VERSION = "5.2.3"


def _quartiles(data: Sequence[float]) -> tuple[float, float]:
    """q1, q3 exactly as pytest_benchmark.stats.Stats (Wikipedia methods 3 and 2)."""
    n = len(data)
    if n == 1:
        return data[0], data[0]
    if n % 2:
        k, q = n // 4, n % 4
        if q == 1:
            return 0.25 * data[k - 1] + 0.75 * data[k], 0.75 * data[3 * k] + 0.25 * data[3 * k + 1]
        return 0.75 * data[k] + 0.25 * data[k + 1], 0.25 * data[3 * k + 1] + 0.75 * data[3 * k + 2]
    return statistics.median(data[: n // 2]), statistics.median(data[n // 2:])


def benchmark_stats(values: Sequence[float]) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` block for rounds ``values`` (seconds)."""
    data = list(values)
    s = sorted(data)
    n = len(s)
    mean = statistics.mean(s)
    stddev = statistics.stdev(s) if n > 1 else 0
    q1, q3 = _quartiles(s)
    iqr = q3 - q1
    iqr_out = sum(1 for v in s if v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr)
    sd_out = sum(1 for v in s if v < mean - stddev or v > mean + stddev)
    if n == 1:
        ld15, hd15 = s[0], s[0]
    else:
        # Tukey's fences: the lowest and highest data within 1.5 IQR of the quartiles
        # (pytest-benchmark before 5.3 returned the first datum above the upper fence).
        ld15 = s[bisect_left(s, q1 - 1.5 * iqr)]
        hd15 = s[bisect_right(s, q3 + 1.5 * iqr) - 1]
    return {
        "min": s[0], "max": s[-1], "mean": mean, "stddev": stddev, "rounds": n, "median": statistics.median(s),
        "iqr": iqr, "q1": q1, "q3": q3, "iqr_outliers": iqr_out, "stddev_outliers": sd_out,
        "outliers": f"{sd_out};{iqr_out}", "ld15iqr": ld15, "hd15iqr": hd15, "ops": 1 / mean,
        "total": math.fsum(s), "data": data, "iterations": 1,
    }


def _machine_info(record: RunRecord) -> dict[str, Any]:
    host = record.host
    return {
        "node": host.get("hostname") or platform.node(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python_compiler": platform.python_compiler(),
        "python_implementation": platform.python_implementation(),
        "python_implementation_version": platform.python_version(),
        "python_version": host.get("python") or platform.python_version(),
        "python_build": list(platform.python_build()),
        "release": platform.release(),
        "system": platform.system(),
        "cpu": {"count": host.get("cpus") or os.cpu_count()},
        "mm27_hardware": {"profile": record.hardware.profile, "simulated": record.hardware.simulated,
                          "gpus": record.hardware.gpus},
    }


def _commit_info(record: RunRecord) -> dict[str, Any]:
    return {"id": record.git_commit or "unversioned", "time": record.created_at,
            "author_time": record.created_at, "dirty": False, "project": "pytest-mm27",
            "branch": "(unknown)"}


def to_pytest_benchmark(records: Sequence[RunRecord | Mapping[str, Any]]) -> dict[str, Any]:
    """The pytest-benchmark JSON document for ``records`` (see the module docstring)."""
    if not records:
        raise ValueError("no run records to export")
    records = [as_record(r) for r in records]
    benchmarks: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for rec in records:
        topo = rec.topology_name or "?"
        workload = rec.workload_name or "?"
        profile = ("sim-" if rec.hardware.simulated else "") + str(rec.hardware.profile)
        for level in rec.levels:
            c = level.concurrency
            param = f"{topo}-c{c}" + (f"-{level.case}" if level.case else "")
            reason = invalid_reason(level, float(rec.options.get("max_error_rate") or 0.0))
            tok_s = [t.output_tok_s for t in level.trials]
            if reason is None and not all(isinstance(v, (int, float)) and v > 0 for v in tok_s):
                reason = "no output tokens"
            if reason is not None:
                skipped.append({"topology": topo, "concurrency": c, "reason": reason,
                                **({"case": level.case} if level.case else {})})
                continue
            benchmarks.append({
                "group": f"mm27 {topo} · {workload} · {profile} (seconds per output token)",
                "name": f"mm27[{param}]",
                "fullname": f"pytest_mm27/{profile}/{workload}::{topo}[c{c}" + (f"-{level.case}" if level.case else "")
                            + "]",
                "params": {"topology": topo, "concurrency": c, "workload": workload, "hardware": profile,
                           **({"case": level.case} if level.case else {})},
                "param": param,
                "extra_info": {
                    "unit": "seconds per output token = 1 / output tok/s of one trial",
                    "output_tok_s": tok_s, "engine": rec.engine.name, "engine_version": rec.engine.version,
                    "run_id": rec.run_id, "floor_output_tok_s": level.floor.tok_s if level.floor else None,
                },
                "options": {"disable_gc": False, "timer": "pytest-mm27 load generator (monotonic clock)",
                            "min_rounds": len(tok_s), "max_time": None, "min_time": None, "warmup": False},
                "stats": benchmark_stats([1.0 / v for v in tok_s]),  # type: ignore[operator]
            })
    first = records[0]
    return {
        "machine_info": _machine_info(first),
        "commit_info": _commit_info(first),
        "benchmarks": benchmarks,
        "datetime": first.finished_at or first.created_at,
        "version": FORMAT_VERSION,
        "mm27": {"exported_by": "pytest_mm27.report.benchmark_export", "skipped": skipped,
                 "run_ids": sorted({str(r.run_id) for r in records})},
    }


def export_pytest_benchmark(records: Sequence[RunRecord | Mapping[str, Any]], path: Path | str) -> Path:
    """Write ``records`` as one pytest-benchmark JSON file at ``path`` (atomically); returns it."""
    target = Path(path)
    write_json_atomic(target, to_pytest_benchmark(records))
    return target


def machine_id() -> str:
    """The folder name pytest-benchmark uses under ``.benchmarks/`` for this interpreter."""
    return "{}-{}-{}-{}".format(platform.system(), platform.python_implementation(),
                                ".".join(platform.python_version_tuple()[:2]), platform.architecture()[0])


def next_storage_path(storage: Path | str = ".benchmarks", name: str = "mm27") -> Path:
    """``<storage>/<machine id>/NNNN_<name>.json`` with the next free NNNN, as ``--benchmark-save`` names files."""
    folder = Path(storage) / machine_id()
    numbers = [int(m.group(1)) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")
               if (m := re.match(r"(\d{4})_", p.name))]
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    return folder / f"{max(numbers, default=0) + 1:04d}_{safe}.json"


__all__ = ["FORMAT_VERSION", "benchmark_stats", "export_pytest_benchmark", "machine_id", "next_storage_path",
           "to_pytest_benchmark"]

if __name__ == "__main__":  # pragma: no cover - convenience: python -m pytest_mm27.report.benchmark_export RECORD...
    import sys

    from ..records.store import load_record

    recs = [load_record(Path(p)) for p in sys.argv[1:]]
    out = next_storage_path()
    export_pytest_benchmark(recs, out)
    print(f"wrote {out} ({len(json.loads(out.read_text())['benchmarks'])} benchmarks)")
