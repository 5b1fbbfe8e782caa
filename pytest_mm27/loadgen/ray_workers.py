"""Load workers as Ray actors: one level's slots spread over client hosts of a cluster.

When one client host cannot feed a level, ``run_level_on_ray`` runs its
workers as actors on ``nodes`` distinct cluster nodes (one placement group
with a STRICT_SPREAD bundle of ``cpus_per_worker`` CPUs per worker). Shares
of slots and requests are the local sharding's (:func:`.runner.split`, the
same request indices), so the merged records are exactly the ones one host
would have produced. Warm-up and the /metrics scrapes run in the driver.

Clocks: each worker's wall clock is compared with the driver's by a few
round trips (the reading with the shortest round trip wins; its error is
half that round trip); one global start time, in the driver's wall clock,
is handed to every worker as its own wall time, and each maps its records
onto that start (``wall - mono - start``) as the local workers do. A
worker that is not ready by the start time fails the level instead of
starting late. Each worker measures its own CPU and event-loop lag, so the
client-bound check is per worker, as it is locally.

Count and duration levels only: steady windows are ticked by the driver
from the local workers' pipes, which actors do not have.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..catalog.workload import Workload
from ..errors import LoadError
from .client import Client, LeastOutstanding, closed_loop, run_sync
from .metrics import LevelMetrics, SelfMeasurement, compute_level_metrics
from .prompts import RequestFactory
from .runner import LevelPlan, clock_offset, count_claim, shift_records, split, warmup
from .samples import RequestRecord
from .scrape import scrape_tokens, server_delta

START_LEAD_S = 3.0              # from the go to the start: every worker has its connections open by then
LATE_TOLERANCE_S = 0.05
PING_ROUNDS = 7
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerClock:
    node_id: str
    offset_s: float             # worker wall - driver wall
    error_s: float              # half the best round trip


class LoadWorkerActor:
    """Runs on its node: ``ping`` for the clock, ``run`` for its share of one level."""

    def ping(self) -> tuple[float, str]:
        import ray

        return time.time(), ray.get_runtime_context().get_node_id()

    def run(self, plan: LevelPlan, worker: int, slots: int, n_requests: int | None, base: int,
            start_wall: float) -> tuple[list[RequestRecord], SelfMeasurement, bool, float]:
        return run_sync(lambda: _run(plan, worker, slots, n_requests, base, start_wall))


async def _run(plan: LevelPlan, worker: int, slots: int, n_requests: int | None, base: int,
               start_wall: float) -> tuple[list[RequestRecord], SelfMeasurement, bool, float]:
    factory = RequestFactory(plan.workload, plan.model)
    async with Client(plan.endpoints, plan.api_key, slots) as client:
        await client.prewarm(slots)
        offset = clock_offset()                         # wall - mono, here
        late = time.time() - start_wall
        if late > LATE_TOLERANCE_S:
            return [], SelfMeasurement(worker, 0.0, 0.0, []), False, late
        await asyncio.sleep(max(0.0, start_wall - time.time()))
        start = start_wall - offset
        claim = count_claim(plan, n_requests, base, start + plan.duration_s if plan.duration_s else None)
        picker = LeastOutstanding(len(plan.endpoints))
        picker.rr = worker % len(plan.endpoints)
        result = await closed_loop(client, factory, slots, claim, picker, timeout_s=plan.workload.request_timeout_s,
                                   stall_s=plan.workload.stall_limit_s, worker=worker)
    shift_records(result.records, offset - start_wall)
    return result.records, SelfMeasurement(worker, result.cpu_s, result.wall_s, result.loop_lag_ms), \
        result.timed_out, max(0.0, late)


def measure_clocks(ray: Any, actors: Sequence[Any]) -> list[WorkerClock]:
    """Each worker's wall clock against the driver's, from its tightest of a few round trips."""
    clocks = []
    for actor in actors:
        best = (math.inf, 0.0, "")
        for _ in range(PING_ROUNDS):
            t0 = time.time()
            wall, node = ray.get(actor.ping.remote(), timeout=READY_TIMEOUT_S)
            t1 = time.time()
            if t1 - t0 < best[0]:
                best = (t1 - t0, wall - (t0 + t1) / 2, node)
        clocks.append(WorkerClock(node_id=best[2], offset_s=best[1], error_s=best[0] / 2))
    return clocks


def run_level_on_ray(endpoints: Sequence[str], model: str, workload: Workload, concurrency: int, *,
                     address: str, nodes: int, api_key: str | None = None, cpus_per_worker: float = 1.0,
                     level_timeout_s: float | None = None) -> LevelMetrics:
    """One closed-loop level with its slots over ``nodes`` load-worker actors on distinct nodes."""
    if workload.steady:
        raise LoadError(f"workload {workload.name!r} measures a steady window, which Ray load workers do not "
                        "run yet; use a count or duration workload, or local workers")
    if not 1 <= nodes <= concurrency:
        raise LoadError(f"{nodes} Ray load workers for concurrency {concurrency}: need 1..{concurrency}")
    from ..cluster import connect
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = connect.connect(address)
    eps = [e.rstrip("/") for e in endpoints]
    plan = LevelPlan(endpoints=eps, model=model, workload=workload, concurrency=concurrency, api_key=api_key,
                     total=None if workload.duration_s else workload.requests_for(concurrency),
                     duration_s=workload.duration_s, rule=None)
    pg = placement_group([{"CPU": cpus_per_worker}] * nodes, strategy="STRICT_SPREAD")
    actors: list[Any] = []
    try:
        done, _ = ray.wait([pg.ready()], timeout=READY_TIMEOUT_S)
        if not done:
            raise LoadError(f"{nodes} load workers of {cpus_per_worker:g} CPU each on distinct nodes: the cluster "
                            f"cannot place them (nodes: {len(ray.nodes())}; free: {ray.available_resources()})")
        remote = ray.remote(LoadWorkerActor)
        actors = [remote.options(num_cpus=cpus_per_worker, max_restarts=0, scheduling_strategy=
                                 PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
                  for i in range(nodes)]
        clocks = measure_clocks(ray, actors)
        return run_sync(lambda: _drive(ray, plan, actors, clocks, level_timeout_s))
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)
        connect.disconnect()


async def _drive(ray: Any, plan: LevelPlan, actors: Sequence[Any], clocks: Sequence[WorkerClock],
                 level_timeout_s: float | None) -> LevelMetrics:
    n = len(actors)
    slot_share = split(plan.concurrency, n)
    if plan.total is not None:
        req_share: list[int | None] = [plan.total * s // plan.concurrency for s in slot_share]
        for i in range(plan.total - sum(r or 0 for r in req_share)):
            req_share[i] = (req_share[i] or 0) + 1
        bases = [sum(r or 0 for r in req_share[:i]) for i in range(n)]
    else:
        req_share, bases = [None] * n, [i << 32 for i in range(n)]
    factory = RequestFactory(plan.workload, plan.model)
    async with Client(plan.endpoints, plan.api_key, plan.concurrency) as client:
        await warmup(client, plan, factory, None)
        before = await scrape_tokens(client.session, plan.endpoints)
        start = time.time() + START_LEAD_S
        refs = [actor.run.remote(plan, i, slot_share[i], req_share[i], bases[i], start + clocks[i].offset_s)
                for i, actor in enumerate(actors)]
        timeout = (level_timeout_s or 0) + plan.workload.request_timeout_s + START_LEAD_S + 60.0 \
            if level_timeout_s else None
        loop = asyncio.get_running_loop()
        try:
            payloads = await loop.run_in_executor(None, lambda: ray.get(refs, timeout=timeout))
        except Exception as exc:
            raise LoadError(f"a Ray load worker failed: {type(exc).__name__}: {exc}") from None
        records: list[RequestRecord] = []
        sms: list[SelfMeasurement] = []
        timed_out = False
        for i, (recs, sm, w_timed_out, late) in enumerate(payloads):
            if late > LATE_TOLERANCE_S:
                raise LoadError(f"Ray load worker {i} on node {clocks[i].node_id[:8]} was ready {late:.2f} s after "
                                f"the global start; raise START_LEAD_S or give it more CPU")
            records.extend(recs)
            sms.append(sm)
            timed_out |= w_timed_out
        expect = sum(r.output_tokens for r in records if r.ok)
        server = await server_delta(client.session, plan.endpoints, before, expect)
    return compute_level_metrics(sorted(records, key=lambda r: r.index), plan.concurrency, self_measurements=sms,
                                 endpoints=plan.endpoints, warmup_requests=plan.workload.warmup_requests,
                                 server_output_tokens=server, timed_out=timed_out, window=None)
