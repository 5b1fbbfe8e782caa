"""Streaming OpenAI-API load generator (no pytest here).

Public API::

    run_level(endpoints, model, workload, concurrency, *, api_key=None,
              workers=None, level_timeout_s=None) -> LevelMetrics

``LevelMetrics`` holds throughput, latency ``Percentiles`` (ms), errors by
reason, and the client's measurement of itself. A level is marked
``client_bound`` (with ``client_bound_reason``) when any of these holds over
the measured window:

- event-loop lag p99 > 10 ms (``metrics.LOOP_LAG_P99_LIMIT_MS``): a 10 ms
  ticker task woke up that late, so chunk timestamps are blurred;
- dispatch lag p99 > 10 ms (``metrics.DISPATCH_LAG_P99_LIMIT_MS``): requests
  were sent that long after their slot freed, so the offered concurrency
  was lower than asked;
- a worker process used > 90 % of one core (``metrics.CPU_UTIL_LIMIT``).

Transport: plain-http endpoints use ``fast`` (asyncio.Protocol, keep-alive
connection per in-flight stream, HTTP/1.1 chunked + SSE decoded inside
``data_received``); https endpoints, /metrics and unusual responses use
aiohttp (``MM27_LOADGEN_AIOHTTP=1`` forces aiohttp everywhere). uvloop is used
when importable.

Command line: ``python -m pytest_mm27.loadgen --help``; client benchmark:
``python -m pytest_mm27.benchmarks.bench_client``.
"""

from .metrics import LevelMetrics
from .samples import Percentiles, RequestRecord
from .runner import run_level

__all__ = ["run_level", "LevelMetrics", "RequestRecord", "Percentiles"]
