"""Prefix caching: the simulator's hit rate vs vLLM's, on the same shared-prefix workload.

Boots vLLM's CPU build serving the tiny generated model (topology
``tiny-tp1``, prefix caching on, as it is by default) and the simulator,
runs the same workload on each - K shared prefixes of P tokens, then each
request's own 16-64 tokens, 4 output tokens, completions API (token ids,
so both servers see exactly the same prompts) - and prints the prefix-cache
hit rate each reports in its ``/metrics`` (``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries``), as the level result carries it::

    python -m pytest_mm27.benchmarks.prefix_hitrate [--vllm CMD] [--prefix-tokens 256,200]
        [--prefixes 4] [--requests 48] [--concurrency 1,4]

Hits come in whole KV blocks. vLLM's CPU backend uses 128-token blocks
(the GPU default is 16), the simulator 16 unless ``--block-size`` says
otherwise, so the simulator runs twice: at its default block and at the
CPU build's. With P a multiple of both, the two agree by construction of
the workload; with P = 200 a 16-token block caches 192 tokens of each
prefix and a 128-token block 128, which is the gap the table shows.
The "expected" column is the one-at-a-time figure for a block size: each
prefix misses once, then floor(P / block) blocks hit per request.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from ..catalog.lengths import Lengths
from ..catalog.paths import catalog_dirs
from ..catalog.topology import load_catalog
from ..catalog.traffic import PrefixSpec
from ..catalog.workload import load_workloads
from ..engines import EngineOptions, VllmEngine
from ..engines.base import split_devices
from ..engines.vllm import provision_model
from ..errors import Mm27Error
from ..host.exits import install_signal_handlers
from ..host.launcher import Launcher
from ..host.leases import lease_devices
from ..loadgen import run_level
from ..parsing import parse_concurrency
from .vllm_crosscheck import default_vllm

VLLM_BLOCK = 128        # vLLM's CPU backend default (vllm/platforms/cpu.py)
SIM_MODEL = ("--hardware", "rtx-pro-6000", "--model", "small-llama-0.75b", "--max-model-len", "1024")


class SimServer:
    """The simulator as a child process in its own session (killed as a group)."""

    def __init__(self, log: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_mm27.sim", "serve", "--port", str(self.port), "--served-model-name",
                 "sim", *SIM_MODEL, *extra], stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Mm27Error(f"the simulator exited ({self.proc.returncode}): {log.read_text()[-500:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise Mm27Error("the simulator did not become healthy in 30 s")

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def expected(w, n: int, block: int) -> float:
    """One-at-a-time hit rate: each prefix's first request misses, the rest hit floor(P/block) blocks."""
    p = w.prefix.tokens
    queries = sum(p + w.input_for(i) for i in range(n))
    used = {w.prefix.which(w.seed, i) for i in range(n)}
    return (n - len(used)) * (p // block) * block / queries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.prefix_hitrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default=default_vllm())
    ap.add_argument("--prefix-tokens", type=parse_concurrency, default=(256, 200), help="P values, e.g. 256,200")
    ap.add_argument("--prefixes", type=int, default=4, help="K distinct prefixes")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=parse_concurrency, default=(1, 4))
    args = ap.parse_args(argv)
    install_signal_handlers()
    vllm = shlex.split(args.vllm)
    try:
        topology = load_catalog(catalog_dirs("topologies")).get("tiny-tp1")
        base = load_workloads(catalog_dirs("workloads")).get("tiny")
        engine, options = VllmEngine(), EngineOptions(vllm_command=tuple(vllm))
        ok, why = engine.available(options, topology)
        if not ok:
            print(f"cannot run: {why}", file=sys.stderr)
            return 2
        topology = provision_model(topology, vllm)
        topology = replace(topology, vllm_args=(*topology.vllm_args, "--enable-prefix-caching"))
        with tempfile.TemporaryDirectory(prefix="mm27-prefix-") as tmp:
            return _run(args, topology, engine, options, base, Path(tmp))
    except Mm27Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args, topology, engine, options, base, work: Path) -> int:
    rows = []
    workloads = {p: replace(base, name=f"prefix-{p}", input_tokens=40, output_tokens=4,
                            input_lengths=Lengths("uniform", 40, 0, 16, 64), min_requests=args.requests,
                            requests_per_concurrency=1.0, warmup_requests=0,
                            prefix=PrefixSpec(count=args.prefixes, tokens=p))
                 for p in args.prefix_tokens}
    rates: dict[tuple[str, int, int], float | None] = {}
    # Every level needs fresh caches: the same prompts again would all hit. Each
    # (P, c) gets its own seed, so prefixes differ between levels on one server.
    def seeded(p: int, c: int):
        return replace(workloads[p], seed=1000 * p + c)

    for label, extra in (("sim b16", ()), (f"sim b{VLLM_BLOCK}", ("--block-size", str(VLLM_BLOCK)))):
        with SimServer(work / f"{label.replace(' ', '-')}.log", *extra) as sim:
            for p in args.prefix_tokens:
                for c in args.concurrency:
                    rates[(label, p, c)] = run_level([sim.url], "sim", seeded(p, c), c).prefix_cache_hit_rate
    kind = engine.device_kind(topology)
    with lease_devices(engine.devices_needed(topology), kind=kind, owner="prefix_hitrate") as lease:
        plan = engine.plan(topology, options, (), split_devices(topology, lease.devices))
        t0 = time.monotonic()
        with Launcher(plan, work / "logs") as launcher:
            boot = time.monotonic() - t0
            [url] = launcher.endpoints
            for p in args.prefix_tokens:
                for c in args.concurrency:
                    rates[("vllm", p, c)] = run_level([url], plan.model, seeded(p, c), c).prefix_cache_hit_rate
    version = engine.version(options)
    print(f"vLLM {version} CPU build, tiny-tp1 (booted in {boot:.0f} s), prefix caching on, block {VLLM_BLOCK}; "
          f"simulator at block 16 and {VLLM_BLOCK}")
    print(f"workload: {args.prefixes} prefixes of P tokens + 16..64 own tokens, 4 output tokens, "
          f"{args.requests} requests per level, completions (token ids)")
    print(f"{'P':>4} {'c':>3}  {'vLLM':>7}  {'sim b16':>8} {'diff':>7}  {'sim b128':>8} {'diff':>7}  "
          f"{'expected b16':>12} {'b128':>6}")
    for p in args.prefix_tokens:
        for c in args.concurrency:
            v = rates[("vllm", p, c)]
            s16, s128 = rates[("sim b16", p, c)], rates[(f"sim b{VLLM_BLOCK}", p, c)]

            def pct(x):
                return f"{100 * x:6.1f}%" if x is not None else "    n/a"

            def diff(x):
                return f"{100 * (x - v):+6.1f}" if x is not None and v is not None else "    n/a"
            w = seeded(p, c)
            rows.append((p, c, v, s16, s128))
            print(f"{p:>4} {c:>3}  {pct(v)}  {pct(s16):>8} {diff(s16)}  {pct(s128):>8} {diff(s128)}  "
                  f"{pct(expected(w, args.requests, 16)):>12} {pct(expected(w, args.requests, VLLM_BLOCK))}")
    print("diff: simulator minus vLLM, in percentage points")
    print(f"teardown: {launcher.teardown.summary() if launcher.teardown else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
