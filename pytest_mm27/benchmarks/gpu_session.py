"""The GPU checks of the gate, run as one batch on a lent GPU machine.

    python -m pytest_mm27.benchmarks.gpu_session --work DIR --out OUT --vllm CMD [--budget S] STEP [STEP ...]

Each step is what a user would run (a ``pytest suites/`` session, or the
cross-check against ``vllm bench serve``), with its run records kept under
``DIR/results*`` and its output under ``DIR/logs``; ``DIR`` persists between
calls on one machine, so a later call's nightly runs find the baseline an
earlier one saved. After every step ``DIR`` is packed into
``OUT/gpu-runs.tgz`` and a digest of what the step measured is appended to
``OUT/summary.txt`` (and printed), so a run cut short by its time limit still
returns what it finished.

Steps (see ``STEPS``): ``8b-baseline`` saves a 3-trial baseline of the
GPU-bound topology; ``8b-nightly`` is an unchanged nightly run judged
against it (give it twice for two); ``8b-slow-nightly`` is a nightly run
with one serve option changed (``SLOW_OPTION``, a known slowdown);
``8b-slow-long`` measures that option's cost with long windows;
``tp1-baseline`` re-measures the small model's baseline; ``tp1-prefill`` a
prefill-heavy length mix on it (``8b-prefill`` on the GPU-bound one); ``tp1-256``
the small model where its API server limits it; ``8b-api1`` / ``8b-api2`` and
``tp1-api1`` / ``tp1-api2`` measure c=64 and c=256 with one and with two API
server processes (``--api-server-count``, the front end's ceiling);
``crosscheck`` our client against ``vllm bench serve`` on the GPU-bound
topology at c=16 and c=64.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GPU_BOUND = "gpu-8b-tp1"
# A serve option whose cost is a plausible nightly regression: vLLM 0.23 schedules
# the next step while the GPU runs this one; turning that off adds the CPU's
# scheduling time to every step.
SLOW_OPTION = "--no-async-scheduling"

# name -> (pytest args or None for the cross-check, results folder, rough seconds)
STEPS: dict[str, tuple[list[str] | None, str, int]] = {
    "8b-baseline": (["--topology", GPU_BOUND, "--save-baseline", "--force"], "results", 280),
    # The GPU-bound levels only (c=256 is front-end bound on one API server): fits one device call.
    "8b-baseline-gpu": (["--topology", GPU_BOUND, "--concurrency", "1,16,64", "--save-baseline", "--force"],
                        "results", 300),
    "8b-nightly": (["--topology", GPU_BOUND, "--baseline", "auto"], "results", 120),
    "8b-nightly-gpu": (["--topology", GPU_BOUND, "--concurrency", "1,16,64", "--baseline", "auto"], "results", 170),
    "8b-slow-nightly": (["--topology", GPU_BOUND, "--topology-dir", "{slow}", "--baseline", "auto"], "results", 120),
    "8b-slow-long": (["--topology", GPU_BOUND, "--topology-dir", "{slow}", "--trials", "3",
                      "--concurrency", "16,64", "--precision", "0.5%", "--max-window", "40"], "results-long", 220),
    "8b-long": (["--topology", GPU_BOUND, "--trials", "3", "--concurrency", "16,64", "--precision", "0.5%",
                 "--max-window", "40"], "results-long", 260),
    "tp1-baseline": (["--topology", "gpu-tp1", "--save-baseline", "--force"], "results", 180),
    "tp1-prefill": (["--topology", "gpu-tp1", "--workload", "prefill-heavy"], "results-prefill", 100),
    "8b-prefill": (["--topology", GPU_BOUND, "--workload", "prefill-heavy", "--concurrency", "1,16,64"],
                   "results-prefill", 130),
    "tp1-256": (["--topology", "gpu-tp1", "--concurrency", "16,256"], "results-tp1", 130),
    # The same topologies with one and with two API server processes: how much of c=256 is the front end.
    "8b-api1": (["--topology", GPU_BOUND, "--concurrency", "64,256"], "results-api", 140),
    "8b-api2": (["--topology", GPU_BOUND, "--topology-dir", "{api2}", "--concurrency", "64,256"], "results-api", 150),
    "tp1-api1": (["--topology", "gpu-tp1", "--concurrency", "64,256"], "results-api", 120),
    "tp1-api2": (["--topology", "gpu-tp1", "--topology-dir", "{api2}", "--concurrency", "64,256"], "results-api", 130),
    "crosscheck": (None, "crosscheck", 220),
}


def variant_topologies(folder: Path, names: Sequence[str], marker: str, replacement: str) -> Path:
    """A catalog folder holding built-in topologies with one line edited (same names, so they shadow
    the built-in ones and are judged against the same baselines, as a changed config would be)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = (REPO / "fixtures" / "topologies" / f"{name}.toml").read_text()
        if marker not in text:
            raise SystemExit(f"cannot edit {name}.toml: it has no line starting {marker!r}")
        (folder / f"{name}.toml").write_text(text.replace(marker, replacement, 1))
    return folder


def slow_topology(folder: Path) -> Path:
    """The GPU-bound topology with ``SLOW_OPTION`` added."""
    marker = 'args = ["--load-format", "dummy"'
    return variant_topologies(folder, [GPU_BOUND], marker, f'args = ["{SLOW_OPTION}", "--load-format", "dummy"')


def api2_topologies(folder: Path) -> Path:
    """The GPU topologies with two API server processes."""
    marker = "max_num_seqs = 256"
    return variant_topologies(folder, [GPU_BOUND, "gpu-tp1"], marker, f"{marker}\napi_server_count = 2")


def _plugin_flag() -> list[str]:
    """``-p pytest_mm27.plugin`` where the package is not installed (a GPU machine's copy of the tree)."""
    from importlib.metadata import entry_points

    installed = any(ep.name == "mm27" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_mm27.plugin"]


def run_step(name: str, out: Path, vllm: str, budget_left: float) -> dict[str, Any]:
    base = name.rstrip("-0123456789") if name not in STEPS else name
    args, results, estimate = STEPS[base]
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if estimate > budget_left:
        return {"step": name, "skipped": f"needs ~{estimate} s, {budget_left:.0f} s left"}
    if args is None:
        cmd = [sys.executable, "-m", "pytest_mm27.benchmarks.vllm_crosscheck", "--vllm", vllm, "--topology", GPU_BOUND,
               "--hardware", "h200", "--concurrency", "16,64", "--input-len", "128", "--output-len", "256",
               "--prompts-per-slot", "4", "--rounds", "2", "--json", str(out / results / "crosscheck.json")]
        (out / results).mkdir(parents=True, exist_ok=True)
    else:
        folders = {"{slow}": slow_topology, "{api2}": api2_topologies}
        given = {key: str(make(out / key.strip("{}"))) for key, make in folders.items() if key in args}
        cmd = [sys.executable, "-m", "pytest", *_plugin_flag(), "suites/", "-p", "no:cacheprovider",
               "--engine", "vllm", f"--vllm={vllm}", "--hardware", "h200", f"--results-dir={out / results}",
               *(given.get(a, a) for a in args)]
    started = time.monotonic()
    with log.open("w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        rc = run_bounded(cmd, fh, max(60.0, budget_left - TEARDOWN_S))
    return {"step": name, "rc": rc, "seconds": round(time.monotonic() - started, 1), "log": str(log),
            "results": str(out / results)}


# What a step is left for its teardown when its time is up: pytest tears the
# servers down on SIGINT; a SIGKILL there would orphan a GPU-holding engine
# (seen once on an H200: the next boot found 120 GB of the GPU taken).
TEARDOWN_S = 45.0


def run_bounded(cmd: list[str], log: Any, seconds: float) -> int | None:
    """Run ``cmd`` for at most ``seconds``, then interrupt it as Ctrl-C would; None when it had to be."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=TEARDOWN_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None


def _records(folder: Path, since: float) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("runs/*/*.json")):
        if path.stat().st_mtime >= since:
            out.append(json.loads(path.read_text()))
    return out


def _cv(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else None


def _join(values: Sequence[Any], fmt: str) -> str:
    return ", ".join("-" if v is None else format(v, fmt) for v in values)


def _level_line(level: dict[str, Any]) -> str:
    """One level: every trial's throughput, precision, window and TPOT; the first trial's CPU shares."""
    trials = level.get("trials") or []
    tok = [t["output_tok_s"] for t in trials]
    cv = _cv(tok)
    cpu = next(iter((trials[0].get("server_cpu") or {}).values()), {}) if trials else {}
    sm = [g["sm_util_mean"] for t in trials for g in (t.get("gpu") or {}).get("gpus") or []
          if g.get("sm_util_mean") is not None]
    throttle = sorted({r for t in trials for g in (t.get("gpu") or {}).get("gpus") or []
                       for r in (g.get("throttle_reasons") or {})})
    verdict = level.get("verdict") or {}
    return (f"  c={level['concurrency']:>4} tok/s {_join(tok, ',.0f')}" + (f" (CV {cv:.2%})" if cv is not None else "")
            + f"; precision {_join([t.get('precision') for t in trials], '.2%')}"
            + f"; window {_join([t.get('duration_s') for t in trials], '.0f')} s"
            + f"; TPOT p50 {_join([t['tpot_ms']['p50'] for t in trials], '.2f')} ms"
            + f"; API {cpu.get('api_max_cores', math.nan):.2f} / engine {cpu.get('engine_cores', math.nan):.2f} cores"
            + f"; SM {statistics.fmean(sm) if sm else math.nan:.0f}%"
            + (f"; throttle {','.join(throttle)}" if throttle else "")
            + f"; verdict {verdict.get('status')} {verdict.get('tag') or ''}".rstrip())


def digest(step: dict[str, Any], since: float) -> list[str]:
    """What a step measured, a few lines per level."""
    lines = [f"== {step['step']}: " + (step.get("skipped") or f"exit {step['rc']} in {step['seconds']} s")]
    if step.get("skipped"):
        return lines
    log = Path(step["log"]).read_text(errors="replace").splitlines()
    if step["step"] == "crosscheck":
        return lines + log[-40:]
    for record in _records(Path(step["results"]), since):
        host = record.get("host") or {}
        gpu = (host.get("gpus") or [{}])[0]
        lines.append(f"  {record['topology']['name']} / {record['workload']['name']}: status {record['status']}, "
                     f"startup {record.get('startup_s')} s, {host.get('cpu_model')}, {host.get('cpus')} CPUs, "
                     f"GPU {gpu.get('name')} {gpu.get('power_limit_w')} W, driver {host.get('driver')}, "
                     f"torch {(host.get('engine_env') or {}).get('torch')}")
        for level in record.get("levels") or []:
            lines.append(_level_line(level))
            comp = level.get("comparison")
            if comp:
                worst = [m for m in comp["metrics"] if m["status"] not in ("ok",)]
                lines.append(f"         gate {comp['status']}" + "".join(f"\n           {m['message']}" for m in worst))
    tail = [ln for ln in log if ln.startswith(("FAILED", "baseline saved", "  its noise", "  measured on another",
                                               "  output_tok_s", "  gate sensitivity", "=")) or "passed" in ln]
    return lines + ["  " + ln for ln in tail[-14:]]


def pack(work: Path, out: Path) -> None:
    """Everything measured so far, in one archive (the device returns a few files, not a tree)."""
    archive = out / "gpu-runs.tgz"
    tmp = out / ".gpu-runs.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for sub in sorted(work.iterdir()):
            if sub.is_dir():
                tar.add(sub, arcname=sub.name)
    tmp.replace(archive)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.gpu_session", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="records and logs (kept between calls)")
    ap.add_argument("--out", type=Path, required=True, help="where the archive and summary go")
    ap.add_argument("--vllm", required=True, help="command that runs vLLM's CLI")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for all steps (default 570)")
    ap.add_argument("steps", nargs="+", help=f"steps, in order: {', '.join(STEPS)} (a -N suffix repeats one)")
    args = ap.parse_args(argv)
    for name in args.steps:
        if name.rstrip("-0123456789") not in STEPS and name not in STEPS:
            ap.error(f"unknown step {name!r}; known: {', '.join(STEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    for name in args.steps:
        since = time.time()
        step = run_step(name, args.work, args.vllm, deadline - time.monotonic())
        text = "\n".join(digest(step, since))
        print(text, flush=True)
        for where in (args.out, args.work):
            with (where / "summary.txt").open("a") as fh:
                fh.write(text + "\n")
        pack(args.work, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
