"""Open-loop cross-check: our rate levels vs ``vllm bench serve --request-rate R`` on one real server.

    python -m pytest_mm27.benchmarks.vllm_rate_crosscheck [--vllm CMD] [--topology tiny-tp1]
        [--rates 2,4] [--prompts 40] [--input-len 64] [--output-len 32] [--rounds 1] [--seed 0]

Boots one vLLM server (default ``tiny-tp1``, the CPU build) through our
launcher and, at each rate, runs three clients on it in turn with the same
request count, lengths and seed:

- ``vllm bench``: ``vllm bench serve --request-rate R`` (random dataset,
  ignore_eos, Poisson arrivals, its seed);
- ``ours replay``: our open loop replaying vllm bench's own send times (its
  saved ``start_times``, as a trace): the same schedule, so any difference
  is the clients' and the server's drift, not the arrivals';
- ``ours poisson``: our open loop on our own seeded Poisson draw at R. A draw
  of a few dozen requests sends noticeably faster or slower than R, so its
  output tok/s is also shown per request/s actually sent (``tok/s / sent``).

Output tok/s is output tokens over first request sent -> last finished, for
all three (vllm bench's from its per-request times, ``vllm_bench_result``);
TTFT and TPOT are per request, p50 and mean. Each row's ``diff`` is against
vllm bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..catalog.arrivals import Arrival
from ..catalog.paths import catalog_dirs
from ..catalog.topology import load_catalog
from ..catalog.workload import Workload, load_workloads
from ..engines import EngineOptions, VllmEngine
from ..engines.base import split_devices
from ..engines.vllm import provision_model
from ..errors import Mm27Error
from ..host.exits import install_signal_handlers
from ..host.launcher import Launcher
from ..host.leases import lease_devices
from ..loadgen import Percentiles, run_level
from ..parsing import parse_rates
from .vllm_bench_result import read_bench_result
from .vllm_crosscheck import BENCH_TIMEOUT_S, default_vllm

METRICS = (("output tok/s", "tok_s", "{:,.2f}"), ("tok/s / sent", "tok_per_req", "{:,.2f}"),
           ("sent req/s", "sent", "{:.3f}"), ("TTFT p50 ms", "ttft_p50", "{:.1f}"),
           ("TTFT mean ms", "ttft_mean", "{:.1f}"), ("TPOT p50 ms", "tpot_p50", "{:.2f}"),
           ("TPOT mean ms", "tpot_mean", "{:.2f}"), ("E2EL p50 ms", "e2el_p50", "{:.1f}"),
           ("E2EL mean ms", "e2el_mean", "{:.1f}"), ("failed", "failed", "{:.0f}"))


def theirs(vllm: list[str], url: str, model_dir: str, served: str, args: argparse.Namespace, rate: float,
           work: Path) -> tuple[dict[str, float], Path]:
    """One ``vllm bench serve`` run; its figures and a trace of its send times and lengths."""
    name = f"bench-r{rate:g}-{time.monotonic_ns()}.json"
    argv = [*vllm, "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", model_dir,
            "--served-model-name", served, "--tokenizer", model_dir, "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.prompts), "--request-rate", f"{rate:g}", "--ignore-eos",
            "--seed", str(args.seed), "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(work), "--result-filename", name]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "no_proxy": "*"})
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-20:])
        raise SystemExit(f"vllm bench serve failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    r = read_bench_result(work / name)
    raw = json.loads((work / name).read_text())
    starts = sorted(zip(raw["start_times"], raw["input_lens"], raw["output_lens"]))
    trace = work / f"{name}.trace.jsonl"
    t0 = starts[0][0]
    trace.write_text("".join(json.dumps({"timestamp": s - t0, "input_tokens": max(1, i),
                                         "output_tokens": max(1, o)}) + "\n" for s, i, o in starts))
    sent = (len(starts) - 1) / (starts[-1][0] - t0) if starts[-1][0] > t0 else float("nan")
    lat = raw.get("latencies") or [t + sum(g) for t, g in zip(raw["ttfts"], raw["itls"])]
    e2el = Percentiles.of(v * 1000.0 for v, err, t in zip(lat, raw["errors"], raw["ttfts"]) if not err and t > 0)
    return {"tok_s": r.span_tok_s, "sent": sent, "tok_per_req": r.span_tok_s / sent, "ttft_p50": r.ttft_ms.p50,
            "ttft_mean": r.ttft_ms.mean, "tpot_p50": r.tpot_ms.p50, "tpot_mean": r.tpot_ms.mean,
            "e2el_p50": e2el.p50, "e2el_mean": e2el.mean, "failed": r.failed}, trace


def ours(url: str, model: str, workload: Workload) -> dict[str, float]:
    m = run_level([url], model, workload, workload.arrival.cap)
    sent = m.send_rate or float("nan")
    return {"tok_s": m.output_tok_s, "sent": sent, "tok_per_req": m.output_tok_s / sent,
            "ttft_p50": m.ttft_ms.p50, "ttft_mean": m.ttft_ms.mean, "tpot_p50": m.tpot_ms.p50,
            "tpot_mean": m.tpot_ms.mean, "e2el_p50": m.e2el_ms.p50, "e2el_mean": m.e2el_ms.mean, "failed": m.failed}


def table(results: dict[float, dict[str, list[dict[str, float]]]]) -> str:
    lines = [f"{'rate':>5}  {'metric':<13} {'vllm bench':>11} {'ours replay':>12} {'diff':>7} "
             f"{'ours poisson':>13} {'diff':>7}"]
    for rate, by_client in results.items():
        med = {k: {key: statistics.median(r[key] for r in rows) for _, key, _ in METRICS}
               for k, rows in by_client.items()}
        for label, key, fmt in METRICS:
            b = med["theirs"][key]
            cells = []
            for client in ("replay", "poisson"):
                a = med[client][key]
                diff = f"{(a - b) / b * 100:+.1f}%" if b and key != "failed" else "-"
                cells.append((fmt.format(a), diff))
            lines.append(f"{rate:>5g}  {label:<13} {fmt.format(b):>11} {cells[0][0]:>12} {cells[0][1]:>7} "
                         f"{cells[1][0]:>13} {cells[1][1]:>7}")
        if len(by_client["theirs"]) > 1:        # each round, so the spread of each client shows
            for label, key in (("TTFT p50", "ttft_p50"), ("TPOT mean", "tpot_mean"), ("output tok/s", "tok_s")):
                rounds = "; ".join(f"{c} " + "/".join(f"{r[key]:.1f}" for r in by_client[c])
                                   for c in ("theirs", "replay", "poisson"))
                lines.append(f"{'':>5}  rounds {label}: {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.vllm_rate_crosscheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default=default_vllm())
    ap.add_argument("--topology", default="tiny-tp1")
    ap.add_argument("--rates", type=parse_rates, default=(2.0, 4.0))
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="run the three clients this many times per rate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    install_signal_handlers()
    vllm = shlex.split(args.vllm)
    try:
        topology = load_catalog(catalog_dirs("topologies")).get(args.topology)
        base = load_workloads(catalog_dirs("workloads")).get(topology.workload)
        options = EngineOptions(vllm_command=tuple(vllm))
        engine = VllmEngine()
        ok, why = engine.available(options, topology)
        if not ok or topology.replicas != 1:
            print(f"cannot run: {why if not ok else 'the cross-check drives one server'}", file=sys.stderr)
            return 2
        topology = provision_model(topology, vllm)
        with tempfile.TemporaryDirectory(prefix="mm27-rate-crosscheck-") as tmp:
            work = Path(tmp)
            kind = engine.device_kind(topology)
            with lease_devices(engine.devices_needed(topology), kind=kind, owner="vllm_rate_crosscheck") as lease:
                plan = engine.plan(topology, options, (), split_devices(topology, lease.devices))
                with Launcher(plan, work / "logs") as launcher:
                    [url] = launcher.endpoints
                    shape = dict(input_tokens=args.input_len, output_tokens=args.output_len, ignore_eos=True,
                                 warmup_requests=1, seed=args.seed, measure="count")
                    results: dict[float, dict[str, list[dict[str, float]]]] = {}
                    for rate in args.rates:
                        rows: dict[str, list[dict[str, float]]] = {"theirs": [], "replay": [], "poisson": []}
                        for _ in range(args.rounds):
                            figures, trace = theirs(vllm, url, topology.model.name, plan.model, args, rate, work)
                            rows["theirs"].append(figures)
                            replay = dataclasses.replace(base, **shape, arrival=Arrival(kind="trace", trace=trace))
                            rows["replay"].append(ours(url, plan.model, replay))
                            poisson = dataclasses.replace(base, **shape, arrival=Arrival(
                                kind="poisson", rate=rate, requests=args.prompts))
                            rows["poisson"].append(ours(url, plan.model, poisson))
                        results[rate] = rows
                report = launcher.teardown
    except Mm27Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"vLLM {engine.version(options)} ({topology.name}); {args.prompts} requests per client per rate, "
          f"{args.input_len} prompt / {args.output_len} output tokens, ignore_eos, seed {args.seed}, "
          f"{args.rounds} round(s), medians shown; diff: against vllm bench")
    print(table(results))
    print(f"teardown: {report.summary() if report else '?'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
