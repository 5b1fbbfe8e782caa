"""Command line of the simulator: ``serve`` (like ``vllm serve``), ``predict`` and ``plan``.

    python -m pytest_mm27.sim serve --port 8000 --served-model-name M --hardware rtx-pro-6000 \\
        --model minimax-m2.7-nvfp4 --tensor-parallel-size 2 --data-parallel-size 1 ...
    python -m pytest_mm27.sim predict --topology dp3 [--workload NAME] [--hardware PROFILE] [--concurrency 1,4] [--json]
    python -m pytest_mm27.sim plan --gpus 4 --hardware rtx-pro-6000 --model minimax-m2.7-nvfp4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..parsing import parse_concurrency, parse_fraction, parse_positive_float, parse_positive_int
from ..errors import Mm27Error


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.sim",
                                 description="Simulated vLLM server and serving planner.")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the OpenAI API like `vllm serve`, on the wall clock")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", required=True)
    s.add_argument("--hardware", required=True, help="hardware profile (fixtures/hardware/NAME.toml)")
    s.add_argument("--model", required=True, help="model spec (fixtures/models/NAME.toml)")
    s.add_argument("--tensor-parallel-size", type=parse_positive_int, default=1)
    s.add_argument("--data-parallel-size", type=parse_positive_int, default=1)
    s.add_argument("--api-server-count", type=parse_positive_int, default=None,
                   help="vLLM's API server processes; accepted so a launch plan runs unchanged; the "
                        "served simulator's front end is its own process (`sim predict` models the limit)")
    # vLLM's multi-node DP flags, so a plan spread over cluster nodes runs unchanged: the head
    # simulates every DP rank's engine; a --headless server stands for its node's ranks.
    s.add_argument("--data-parallel-size-local", type=parse_positive_int, default=None)
    s.add_argument("--data-parallel-address", default=None)
    s.add_argument("--data-parallel-rpc-port", type=int, default=None)
    s.add_argument("--data-parallel-start-rank", type=int, default=0)
    s.add_argument("--data-parallel-backend", choices=("mp", "ray"), default="mp")
    s.add_argument("--headless", action="store_true", help="DP ranks without an API server (vLLM's --headless)")
    s.add_argument("--pipeline-parallel-size", type=parse_positive_int, default=1,
                   help="accepted so a launch plan runs unchanged; the step model is TP only (not modelled)")
    s.add_argument("--distributed-executor-backend", choices=("mp", "ray", "uni"), default=None)
    s.add_argument("--max-num-seqs", type=parse_positive_int, default=256)
    s.add_argument("--max-model-len", type=parse_positive_int, default=32768)
    s.add_argument("--gpu-memory-utilization", type=parse_fraction, default=0.9)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--api-key", default=None)
    s.add_argument("--slowdown", type=parse_positive_float, default=1.0, help="every step takes this factor longer")
    s.add_argument("--error-rate", type=parse_fraction, default=0.0, help="fraction of requests answered with HTTP 500")
    s.add_argument("--crash-after", type=parse_positive_int, default=None, help="exit(1) when request N arrives")
    s.add_argument("--hang-after", type=parse_positive_int, default=None,
                   help="from request N on, streams stop mid-stream and never finish")
    s.add_argument("--startup-delay", type=float, default=0.0, help="seconds /health answers 503")
    s.add_argument("--malformed-sse-rate", type=parse_fraction, default=0.0,
                   help="fraction of streams that send a broken SSE event halfway (then [DONE])")
    s.add_argument("--cut-stream-rate", type=parse_fraction, default=0.0,
                   help="fraction of streams whose connection is dropped halfway, without [DONE]")
    s.add_argument("--startup-crash", type=float, default=None,
                   help="exit(3) this many seconds after start, before becoming healthy")
    s.add_argument("--fixtures-dir", type=Path, action="append", default=None,
                   help="extra fixtures/ root searched first (repeatable)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="automatic prefix caching, on by default as in vLLM V1")
    s.add_argument("--block-size", type=parse_positive_int, default=None,
                   help="KV-cache block in tokens, as vLLM's flag (default: the calibration's, 16); "
                        "prefix-cache hits come in whole blocks")

    p = sub.add_parser("predict", help="predict a topology's curve on a virtual clock")
    p.add_argument("--topology", required=True)
    p.add_argument("--workload", default=None, help="request shape (default: the topology's own workload)")
    p.add_argument("--hardware", default=None,
                   help="hardware profile in place of the topology's (fixtures/hardware/NAME.toml), "
                        "as the plugin's --hardware")
    p.add_argument("--model", default=None, help="model spec in place of the topology's (fixtures/models/NAME.toml)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", type=parse_positive_int, default=None)
    p.add_argument("--pipeline-parallel-size", "--pp", dest="pp", type=parse_positive_int, default=None)
    p.add_argument("--data-parallel-size", "--dp", dest="dp", type=parse_positive_int, default=None)
    p.add_argument("--api-server-count", type=parse_positive_int, default=None,
                   help="API server processes per server (default: the topology's, else 1)")
    p.add_argument("--max-num-seqs", type=parse_positive_int, default=None)
    p.add_argument("--concurrency", type=parse_concurrency, default=None, help="e.g. 1,4,16 (default: the topology's levels)")
    p.add_argument("--json", action="store_true", help="print a JSON list of per-level objects")
    p.add_argument("--fixtures-dir", type=Path, action="append", default=None)

    q = sub.add_parser("plan", help="rank the TP x PP x DP splits of N nodes x G GPUs for a model")
    q.add_argument("--gpus", type=parse_positive_int, required=True, help="GPUs per node")
    q.add_argument("--nodes", type=parse_positive_int, default=1,
                   help="nodes, linked by the hardware profile's [network] (default 1)")
    q.add_argument("--api-server-count", type=parse_positive_int, default=1,
                   help="API server processes per replica server")
    q.add_argument("--max-pp", type=parse_positive_int, default=None, help="largest pipeline split to try")
    q.add_argument("--hardware", required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--workload", default="default")
    q.add_argument("--concurrency", type=parse_concurrency, default=None)
    q.add_argument("--max-num-seqs", type=parse_positive_int, default=256)
    q.add_argument("--max-model-len", type=parse_positive_int, default=32768)
    q.add_argument("--gpu-memory-utilization", type=parse_fraction, default=0.9)
    q.add_argument("--json", action="store_true")
    q.add_argument("--fixtures-dir", type=Path, action="append", default=None)
    return ap


def _workload(name: str, extra: list[Path] | None):
    from ..catalog.paths import catalog_dirs
    from ..catalog.workload import load_workloads
    return load_workloads(catalog_dirs("workloads", extra)).get(name)


def _headless(args: argparse.Namespace) -> int:
    """A headless server's ranks are simulated by the head; this one holds its node until told to stop."""
    import signal
    import threading
    local = args.data_parallel_size_local or 1
    first = args.data_parallel_start_rank
    print(f"sim: headless, DP ranks {first}..{first + local - 1} of {args.data_parallel_size}, "
          f"simulated by the head at {args.data_parallel_address}:{args.data_parallel_rpc_port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.headless:
        return _headless(args)
    if args.data_parallel_size_local is not None or args.data_parallel_backend == "ray":
        # Said in the log: one process stands for every rank, the network between nodes is not modelled here.
        print(f"sim: head of DP={args.data_parallel_size} ({args.data_parallel_backend} backend, "
              f"{args.data_parallel_size_local or 'all'} local rank(s)); all ranks simulated in this process",
              flush=True)
    if args.pipeline_parallel_size > 1 or args.distributed_executor_backend == "ray":
        print(f"sim: --pipeline-parallel-size {args.pipeline_parallel_size} "
              f"(executor {args.distributed_executor_backend or 'mp'}) accepted, not modelled: "
              f"each engine is simulated as TP={args.tensor_parallel_size} alone", flush=True)
    from .cluster import setup_for
    from .server import Faults, serve
    setup = setup_for(args.hardware, args.model, args.tensor_parallel_size, args.data_parallel_size,
                      args.max_num_seqs, args.gpu_memory_utilization, args.max_model_len,
                      slowdown=args.slowdown, extra_dirs=args.fixtures_dir)
    if args.block_size is not None:
        setup = setup.with_(calibration=dataclasses.replace(setup.calibration, block_size=args.block_size))
    faults = Faults(slowdown=args.slowdown, error_rate=args.error_rate, crash_after=args.crash_after,
                    hang_after=args.hang_after, startup_delay=args.startup_delay,
                    malformed_sse_rate=args.malformed_sse_rate, cut_stream_rate=args.cut_stream_rate,
                    startup_crash=args.startup_crash)
    if args.api_server_count is not None:
        # Said in the server log, so a reader does not take the figures as modelling it.
        print(f"sim: --api-server-count {args.api_server_count} accepted, not modelled by the served "
              "simulator (sim predict models it)", flush=True)
    serve(setup, args.served_model_name, args.host, args.port, api_key=args.api_key, faults=faults, seed=args.seed,
          prefix_caching=args.enable_prefix_caching)
    return 0


ERROR_LABELS = {"output_tok_s": "tok/s", "tpot_p50_ms": "TPOT", "ttft_p50_ms": "TTFT"}


def cmd_predict(args: argparse.Namespace) -> int:
    from ..catalog.paths import catalog_dirs
    from .specs import error_estimate
    from ..catalog.topology import load_catalog
    from .cluster import setup_for_topology
    from .virtual import predict_curve
    topo = load_catalog(catalog_dirs("topologies", args.fixtures_dir)).get(args.topology)
    if args.hardware:
        topo = dataclasses.replace(topo, hardware=args.hardware)
    workload = _workload(args.workload or topo.workload, args.fixtures_dir)
    setup = setup_for_topology(topo, extra_dirs=args.fixtures_dir)
    if args.model:
        from .specs import load_model
        setup = setup.with_(model=load_model(args.model, args.fixtures_dir))
    overrides = {k: v for k, v in (("tp", args.tp), ("pp", args.pp), ("dp", args.dp),
                                   ("api_server_count", args.api_server_count),
                                   ("max_num_seqs", args.max_num_seqs)) if v is not None}
    setup = setup.with_(**overrides)
    levels = args.concurrency or topo.concurrency_levels
    curve = predict_curve(setup, levels, workload)
    errors = error_estimate(args.fixtures_dir)
    if args.json:
        keys = ("concurrency", "output_tok_s", "stream_output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
                "tpot_p50_ms", "e2el_p50_ms", "requests", "api_busy")
        print(json.dumps([{**{k: getattr(p, k) for k in keys}, "error_estimate": errors} for p in curve],
                         indent=2))
        return 0
    fit = setup.memory()
    split = f"TP={setup.tp}" + (f" x PP={setup.pp}" if setup.pp > 1 else "") + f" x DP={setup.dp}"
    print(f"predict: topology {topo.name} ({setup.model.name} on {setup.hardware.name}, "
          f"{split}, {setup.dp_mode}, {setup.api_processes} API process(es)), workload {workload.name} "
          f"({workload.input_tokens} in / {workload.output_tokens} out{', steady' if workload.steady else ''})")
    print(f"         per engine: {fit.reason}")
    if errors:
        print("         error estimate (cases the fit never saw): "
              + ", ".join(f"{ERROR_LABELS.get(k, k)} +-{v:.0%}" for k, v in errors.items()))
    print(f"{'c':>5} {'reqs':>5} {'out tok/s':>10} {'stream tok/s':>12} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'E2EL p50':>9} {'running':>8} {'preempt':>8} {'API busy':>8}")
    for p in curve:
        print(f"{p.concurrency:>5} {p.requests:>5} {p.output_tok_s:>10,.0f} {p.stream_output_tok_s:>12,.0f} "
              f"{p.ttft_p50_ms:>7,.0f}ms "
              f"{p.ttft_p99_ms:>7,.0f}ms {p.tpot_p50_ms:>7.1f}ms {p.e2el_p50_ms:>7,.0f}ms "
              f"{p.max_running:>8} {p.preemptions:>8} {p.api_busy:>8.0%}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan, render_plan
    from .specs import error_estimate
    workload = _workload(args.workload, args.fixtures_dir)
    cands = plan(args.hardware, args.model, args.gpus, workload, levels=args.concurrency,
                 max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                 max_model_len=args.max_model_len, extra_dirs=args.fixtures_dir, nodes=args.nodes,
                 api_server_count=args.api_server_count, max_pp=args.max_pp)
    errors = error_estimate(args.fixtures_dir)
    if args.json:
        print(json.dumps([{
            "tp": c.tp, "pp": c.pp, "dp": c.dp, "fits": c.problem is None, "problem": c.problem,
            "weights_gib_per_gpu": round(c.fit.weights_gib_per_gpu, 2), "kv_tokens": c.fit.kv_tokens,
            "peak_output_tok_s": c.peak.output_tok_s if c.peak else None,
            "peak_concurrency": c.peak.concurrency if c.peak else None,
            "curve": [{"concurrency": p.concurrency, "output_tok_s": p.output_tok_s} for p in c.curve],
            "error_estimate": errors,
        } for c in cands], indent=2))
        return 0
    labels = {ERROR_LABELS.get(k, k): v for k, v in errors.items()}
    print(render_plan(cands, args.hardware, args.model, args.gpus, workload.name, nodes=args.nodes, errors=labels))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The launcher passes an extra fixtures root through the environment.
    env_dirs = [Path(p) for p in os.environ.get("MM27_FIXTURES_DIR", "").split(os.pathsep) if p]
    if env_dirs:
        args.fixtures_dir = [*(args.fixtures_dir or []), *env_dirs]
    try:
        return {"serve": cmd_serve, "predict": cmd_predict, "plan": cmd_plan}[args.command](args)
    except Mm27Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
