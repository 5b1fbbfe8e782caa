"""Arrival accuracy: how closely the open loop sends a Poisson schedule, against the null server.

    python -m pytest_mm27.benchmarks.arrival_accuracy [--rates 200,1000,2000] [--duration 5]
        [--tokens 8] [--step-ms 5] [--server node|python] [--no-pin]

For each rate it sends ``rate x duration`` requests on a seeded Poisson
schedule (``loadgen.arrivals``) to the null SSE server (bench_client's: node
when found, else the Python twin, pinned to CPU 1), with this process pinned
to CPU 0, and prints the send-time lag against the schedule (sent - due:
p50, p99, max), the offered rate (nominal, and as drawn), the rate actually
sent and completed, the client's CPU share and event-loop lag. A first row,
``timer floor``, runs the same sleep-then-yield wait with no request at all:
the lateness the box's scheduler alone gives at that rate. The goal: p99 lag
under 1 ms on one core at 1,000 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

from ..catalog.arrivals import Arrival
from ..catalog.workload import Workload
from ..loadgen import run_level
from ..loadgen.arrivals import SPIN_S, rate_schedule
from ..loadgen.client import run_sync
from ..loadgen.samples import Percentiles
from ..parsing import parse_rates
from .bench_client import DEFAULT_SERVER_JS, NullServer


def workload(rate: float, n: int, tokens: int) -> Workload:
    return Workload(name=f"arrival-{rate:g}", description="", source=Path("arrival_accuracy"), input_tokens=16,
                    output_tokens=tokens, ignore_eos=True, requests_per_concurrency=1.0, min_requests=1,
                    duration_s=None, warmup_requests=0, api="completions", temperature=0.0, request_timeout_s=60.0,
                    seed=1, arrival=Arrival(kind="poisson", rate=rate, requests=n, max_concurrency=4096))


async def _timer_floor(times: list[float]) -> list[float]:
    """The open loop's wait (sleep to SPIN_S before, then yield) with nothing sent: lateness, ms."""
    lags = []
    t0 = time.monotonic()
    for due in times:
        at = t0 + due
        delay = at - time.monotonic()
        if delay > SPIN_S:
            await asyncio.sleep(delay - SPIN_S)
        while time.monotonic() < at:
            await asyncio.sleep(0)
        lags.append((time.monotonic() - at) * 1000.0)
    return lags


def row(label: str, offered: float, drawn: float, lag: Percentiles, sent: float | None, done: float | None,
        cpu: float | None, loop99: float | None) -> str:
    f = lambda v, spec: format("-", spec[0] + spec[1:].split(".")[0].rstrip("%f")) if v is None \
        else format(v, spec)  # noqa: E731
    return (f"{label:>12}  {offered:>7g}  {drawn:>7.1f}  {f(sent, '>7.1f')}  {f(done, '>7.1f')}  "
            f"{lag.p50:>7.3f}  {lag.p99:>7.3f}  {lag.max:>7.2f}  {f(cpu, '>5.0%')}  {f(loop99, '>7.2f')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=parse_rates, default=(200.0, 1000.0, 2000.0))
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of schedule per rate")
    ap.add_argument("--tokens", type=int, default=8, help="output tokens per request")
    ap.add_argument("--step-ms", type=float, default=5.0, help="null server decode step")
    ap.add_argument("--server", choices=("node", "python"), default="node" if DEFAULT_SERVER_JS.exists() else "python")
    ap.add_argument("--no-pin", action="store_true", help="do not pin this process to CPU 0")
    args = ap.parse_args(argv)
    if not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    server = NullServer(DEFAULT_SERVER_JS if args.server == "node" else None, args.step_ms)
    print(f"null server: {args.server}, step {args.step_ms:g} ms, {args.tokens} output tokens; client pinned: "
          f"{not args.no_pin}; Poisson, seed 1, {args.duration:g} s per rate; lag = sent - due")
    print(f"{'':>12}  {'offered':>7}  {'drawn':>7}  {'sent':>7}  {'done':>7}  {'lag p50':>7}  {'lag p99':>7}  "
          f"{'lag max':>7}  {'cpu':>5}  {'loop99':>7}")
    print(f"{'':>12}  {'req/s':>7}  {'req/s':>7}  {'req/s':>7}  {'req/s':>7}  {'ms':>7}  {'ms':>7}  {'ms':>7}  "
          f"{'':>5}  {'ms':>7}")
    try:
        for rate in args.rates:
            n = max(2, round(rate * args.duration))
            times = rate_schedule(Arrival(kind="poisson"), n, rate, seed=1)
            drawn = (n - 1) / times[-1]
            floor = run_sync(lambda: _timer_floor(times))
            print(row("timer floor", rate, drawn, Percentiles.of(floor), None, None, None, None))
            m = run_level([server.url], "null", workload(rate, n, args.tokens), 4096)
            print(row("open loop", rate, drawn, m.schedule_lag_ms, m.send_rate, m.completion_rate,
                      m.client_cpu_util, m.loop_lag_ms.p99)
                  + (f"  {m.failed} failed" if m.failed else "")
                  + (f"  CLIENT-BOUND: {m.client_bound_reason}" if m.client_bound else ""))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
