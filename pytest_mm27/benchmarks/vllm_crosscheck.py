"""Cross-check: our load generator vs ``vllm bench serve`` on one real server.

Boots one tiny TP=1 vLLM server (the CPU build; ``tiny-tp1`` from the
catalog) through our launcher, then on that same running server measures,
at each concurrency, output tok/s and TPOT with pytest-mm27's client and with
vLLM's own benchmark client, using the same request shape (random prompts of
the same length, the same output length, ignore_eos, the same number of
prompts, one untimed warm-up request each), prints the two side by side
with the difference, and tears the server down::

    python -m pytest_mm27.benchmarks.vllm_crosscheck [--vllm CMD] [--concurrency 8,32]

Both sides define output tok/s as output tokens (server usage) over the wall
time from the first request sent to the last one finished, and TPOT per
request as (E2EL - TTFT) / (output tokens - 1); see DESIGN.md. The rounds
alternate (ours, theirs, ours, theirs...) so drift on a busy machine hits
both clients alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..config import parse_concurrency
from ..engines import EngineOptions, VllmEngine
from ..engines.base import split_devices
from ..engines.vllm import provision_model
from ..gpus import lease_devices
from ..launcher import Launcher
from ..loadgen import run_level
from ..paths import catalog_dirs
from ..topology import load_catalog
from ..workload import load_workloads

REPO = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT_S = 900
SAMPLE_S = 0.05


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler:
    """Samples, every 50 ms, the CPU seconds of the vLLM API server (the root
    process), of everything under it (engine core, workers) and of a client
    process, so each can be given as a share of a core over any time window.

    Why: on a 2-core box the engine core is bound to one core and the API
    server shares the other with the benchmark client; whichever client takes
    more CPU leaves the API server less, and the server then streams less.
    """

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.client_pid: int | None = None
        self.samples: list[tuple[float, float, float, float]] = []   # t, api, engine, client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
            api = procs.get(self.server_pid, (0, 0.0))[1]
            engine = sum(cpu for pid, (ppid, cpu) in procs.items() if self._under(pid, procs))
            client = procs.get(self.client_pid, (0, 0.0))[1] if self.client_pid else 0.0
            self.samples.append((time.monotonic(), api, engine, client))
            self._stop.wait(SAMPLE_S)

    def _under(self, pid: int, procs: dict[int, tuple[int, float]]) -> bool:
        seen = 0
        while pid in procs and seen < 64:
            pid = procs[pid][0]
            if pid == self.server_pid:
                return True
            seen += 1
        return False

    def shares(self, t0: float, t1: float) -> tuple[float, float, float]:
        """Cores used by the API server, the engine processes and the client between t0 and t1."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return (math.nan, math.nan, math.nan)
        (a, *first), (b, *last) = inside[0], inside[-1]
        return tuple((y - x) / (b - a) for x, y in zip(first, last))  # type: ignore[return-value]


def default_vllm() -> str:
    if os.environ.get("MM27_VLLM"):
        return os.environ["MM27_VLLM"]
    venv = REPO / ".venv-vllm" / "bin" / "vllm"
    return str(venv) if venv.exists() else "vllm"


def ours(url: str, model: str, workload: Any, concurrency: int, cpu: CpuSampler) -> dict[str, float]:
    cpu.client_pid = os.getpid()
    t_start = time.monotonic()
    m = run_level([url], model, workload, concurrency)
    # The measured window ends when the level returns; it began duration_s before
    # its last request finished (warm-up and drain of the level excluded).
    t_end = time.monotonic()
    api, engine, client = cpu.shares(max(t_start, t_end - m.duration_s), t_end)
    if m.failed:
        print(f"warning: pytest-mm27 client: {m.failed} request(s) failed at c={concurrency}: {m.errors}",
              file=sys.stderr)
    return {"failed": m.failed, "span_s": m.duration_s, "span_tok_s": m.output_tok_s, "output_tok_s": m.output_tok_s, "tpot_p50_ms": m.tpot_ms.p50, "tpot_mean_ms": m.tpot_ms.mean,
            "ttft_p50_ms": m.ttft_ms.p50, "prompt_tokens": m.prompt_tokens / m.ok,
            "output_tokens": m.output_tokens / m.ok, "requests": m.ok, "duration_s": m.duration_s,
            "api_cpu": api, "engine_cpu": engine, "client_cpu": client,
            "client_us_per_tok": m.client_cpu_s / m.output_tokens * 1e6 if m.output_tokens else math.nan}


def theirs(vllm: list[str], url: str, model_dir: str, served: str, input_len: int, output_len: int,
           prompts: int, concurrency: int, seed: int, out_dir: Path, cpu: CpuSampler) -> dict[str, float]:
    name = f"bench-c{concurrency}-{time.monotonic_ns()}.json"
    argv = [*vllm, "bench", "serve", "--backend", "vllm", "--base-url", url,
            "--model", model_dir, "--served-model-name", served, "--tokenizer", model_dir,
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed),
            "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "no_proxy": "*"}
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as proc:
        cpu.client_pid = proc.pid
        try:
            stdout, stderr = proc.communicate(timeout=BENCH_TIMEOUT_S)
        finally:
            cpu.client_pid = None
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        tail = "\n".join((stderr + stdout).strip().splitlines()[-20:])
        raise SystemExit(f"vllm bench serve failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    r = json.loads((out_dir / name).read_text())
    done = r["completed"]
    if done != prompts:
        print(f"warning: vllm bench serve: only {done} of {prompts} requests completed at c={concurrency}",
              file=sys.stderr)
    # Its own per-request times, on our window definition: first send -> last finish.
    # (older vLLM releases save no per-request start times: fall back to their duration)
    latencies = r.get("latencies") or r.get("e2els")
    api = engine = client = math.nan
    if r.get("start_times") and latencies:
        starts, ends = r["start_times"], [t + lat for t, lat in zip(r["start_times"], latencies)]
        span = max(ends) - min(starts)
        # Its start times are time.perf_counter(): CLOCK_MONOTONIC on Linux, the
        # same clock as our samples, so its window can be cut out of them.
        api, engine, client = cpu.shares(min(starts), max(ends))
    else:
        span = r["duration"]
    return {"failed": prompts - done, "span_s": span, "span_tok_s": r["total_output_tokens"] / span,
            "output_tok_s": r["output_throughput"], "tpot_p50_ms": r["median_tpot_ms"],
            "tpot_mean_ms": r["mean_tpot_ms"], "ttft_p50_ms": r["median_ttft_ms"],
            "prompt_tokens": r["total_input_tokens"] / done, "output_tokens": r["total_output_tokens"] / done,
            "requests": done, "duration_s": r["duration"], "api_cpu": api, "engine_cpu": engine,
            "client_cpu": client, "client_us_per_tok": client * span / r["total_output_tokens"] * 1e6}


ROWS = (("output tok/s", "output_tok_s", "{:,.1f}"), ("TPOT p50 ms", "tpot_p50_ms", "{:.2f}"),
        ("TPOT mean ms", "tpot_mean_ms", "{:.2f}"), ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"),
        ("prompt tok/req", "prompt_tokens", "{:.1f}"), ("output tok/req", "output_tokens", "{:.1f}"),
        ("window s", "duration_s", "{:.2f}"), ("req span s", "span_s", "{:.2f}"),
        ("tok/s over span", "span_tok_s", "{:,.1f}"), ("failed requests", "failed", "{:.0f}"),
        ("API server cores", "api_cpu", "{:.2f}"), ("engine cores", "engine_cpu", "{:.2f}"),
        ("client cores", "client_cpu", "{:.2f}"), ("client us/token", "client_us_per_tok", "{:.1f}"))


def paired(label: str, ours_values: list[float], theirs_values: list[float]) -> str:
    """Rounds alternate, so each (ours, theirs) pair saw the same server state: the
    mean of the per-round log ratios and its 95% t interval say whether the clients
    differ by more than the server's own round-to-round drift."""
    from ..compare import t_ppf
    logs = [math.log(a / b) for a, b in zip(ours_values, theirs_values) if a > 0 and b > 0]
    if len(logs) < 3:
        return f"paired {label}: too few rounds"
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t_ppf(0.975, len(logs) - 1) * sd / math.sqrt(len(logs))
    lo, hi = math.expm1(mean - half), math.expm1(mean + half)
    verdict = "no significant difference" if lo <= 0 <= hi else "differ"
    return (f"paired {label} ours/theirs over {len(logs)} rounds: {math.expm1(mean):+.1%} "
            f"(95% CI {lo:+.1%} to {hi:+.1%}): {verdict}")


def table(results: dict[int, tuple[list[dict], list[dict]]]) -> str:
    lines = [f"{'conc':>4}  {'metric':<15} {'pytest-mm27':>12} {'vllm bench':>12} {'diff':>8}",
             f"{'-' * 4}  {'-' * 15} {'-' * 12} {'-' * 12} {'-' * 8}"]
    for c, (mine, bench) in results.items():
        for label, key, fmt in ROWS:
            a = statistics.median(r[key] for r in mine)
            b = statistics.median(r[key] for r in bench)
            diff = f"{(a - b) / b * 100:+.1f}%" if b and key != "failed" else "-"
            lines.append(f"{c:>4}  {label:<15} {fmt.format(a):>12} {fmt.format(b):>12} {diff:>8}")
        if len(mine) > 1:
            spread = ", ".join(f"{r['output_tok_s']:,.0f}/{s['output_tok_s']:,.0f}" for r, s in zip(mine, bench))
            lines.append(f"{'':>4}  {'(rounds ours/theirs tok/s: ' + spread + ')'}")
        if len(mine) > 2:
            for label, key in (("output tok/s", "output_tok_s"), ("TPOT mean", "tpot_mean_ms")):
                lines.append(f"{'':>4}  {paired(label, [r[key] for r in mine], [r[key] for r in bench])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.vllm_crosscheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default=default_vllm(), help="command that runs vLLM's CLI (default: MM27_VLLM, "
                    "else .venv-vllm/bin/vllm, else vllm)")
    ap.add_argument("--topology", default="tiny-tp1")
    ap.add_argument("--concurrency", type=parse_concurrency, default=(8, 32))
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompts-per-slot", type=int, default=4, help="prompts per level = this x concurrency")
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours/theirs this many times per level")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    vllm = shlex.split(args.vllm)
    topology = load_catalog(catalog_dirs("topologies")).get(args.topology)
    options = EngineOptions(vllm_command=tuple(vllm))
    engine = VllmEngine()
    ok, why = engine.available(options, topology)
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    topology = provision_model(topology, vllm)
    base = load_workloads(catalog_dirs("workloads")).get("tiny")
    with tempfile.TemporaryDirectory(prefix="mm27-crosscheck-") as tmp:
        return _run(args, vllm, topology, options, engine, base, Path(tmp))


def _run(args: argparse.Namespace, vllm: list[str], topology: Any, options: EngineOptions, engine: VllmEngine,
         base: Any, work: Path) -> int:
    with lease_devices(engine.devices_needed(topology), kind="cpu", owner="vllm_crosscheck") as lease:
        plan = engine.plan(topology, options, (), split_devices(topology, lease.devices))
        t0 = time.monotonic()
        with Launcher(plan, work / "logs") as launcher:
            boot_s = time.monotonic() - t0
            [url] = launcher.endpoints
            [server_pid] = launcher.pids.values()
            results: dict[int, tuple[list[dict], list[dict]]] = {}
            for c in args.concurrency:
                prompts = args.prompts_per_slot * c
                # One untimed warm-up request, as vllm bench serve's initial test prompt.
                workload = dataclasses.replace(
                    base, input_tokens=args.input_len, output_tokens=args.output_len, ignore_eos=True,
                    requests_per_concurrency=args.prompts_per_slot, min_requests=prompts, warmup_requests=1,
                    seed=args.seed)
                mine, bench = [], []
                with CpuSampler(server_pid) as cpu:
                    for _ in range(args.rounds):
                        mine.append(ours(url, plan.model, workload, c, cpu))
                        bench.append(theirs(vllm, url, topology.model.name, plan.model, args.input_len,
                                            args.output_len, prompts, c, args.seed, work, cpu))
                results[c] = (mine, bench)
        report = launcher.teardown
    print(f"vLLM {engine.version(options)} ({args.topology}: {topology.description}); booted in {boot_s:.0f} s "
          f"on core(s) {list(lease.devices)}")
    print(f"request shape: random prompts of {args.input_len} tokens, {args.output_len} output tokens, "
          f"ignore_eos, {args.prompts_per_slot} x concurrency prompts per level, 1 untimed warm-up; "
          f"{args.rounds} round(s), medians shown")
    print(table(results))
    print("window s: the client's own throughput window (vllm bench: its whole-run duration); req span s: "
          "first request sent -> last finished, from each client's per-request times")
    print("cores: CPU seconds per second over that span (/proc, sampled every 50 ms) of the vLLM API server "
          "process, of the processes under it (engine core), and of the client; client us/token: client CPU per "
          f"output token. This box has {os.cpu_count()} CPUs.")
    print(f"teardown: {report.summary() if report else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
