"""How well one level knows its own numbers: within-level noise, for the gate's single-trial case.

Throughput's comes from the steady window's batch means (``steady``); a
latency percentile's from the order statistics of its sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .samples import RequestRecord
from .steady import Precision, batch_means, binned


def window_precision(records: Sequence[RequestRecord], start: float, end: float) -> Precision | None:
    """Batch-means precision of the output tok/s inside ``[start, end)`` (server token counts)."""
    times: list[float] = []
    weights: list[float] = []
    for r in records:
        if r.ok and r.chunk_times and r.output_tokens > 0:
            share = r.output_tokens / len(r.chunk_times)
            times.extend(r.chunk_times)
            weights.extend([share] * len(r.chunk_times))
    return batch_means(binned(times, weights, start, end))


Z95 = 1.959964


def quantile_se(values: Sequence[float], q: float) -> float | None:
    """Relative standard error of the ``q``-quantile of ``values``, distribution-free.

    The ranks ``n q ± 1.96 sqrt(n q (1 - q))`` bound a 95 % interval of the
    quantile (the binomial count of samples below it); half its width on the
    log scale, over 1.96, is the standard error. None when the interval's
    ranks fall outside the sample (a p99 needs several hundred requests) or
    a value is not positive.
    """
    n = len(values)
    if n < 10 or not 0 < q < 1:
        return None
    data = sorted(values)
    spread = Z95 * math.sqrt(n * q * (1 - q))
    lo, hi = math.floor(n * q - spread), math.ceil(n * q + spread)
    if lo < 0 or hi > n - 1 or data[lo] <= 0:
        return None
    return (math.log(data[hi]) - math.log(data[lo])) / (2 * Z95)


def latency_noise(ok: Sequence[RequestRecord]) -> dict[str, float | None]:
    """The gated latency percentiles' within-level noise (see ``quantile_se``)."""
    ttft = [r.ttft for r in ok if r.chunk_times]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    return {"ttft_p50": quantile_se(ttft, 0.5), "ttft_p99": quantile_se(ttft, 0.99),   # type: ignore[arg-type]
            "tpot_p50": quantile_se(tpots, 0.5), "tpot_p99": quantile_se(tpots, 0.99)}
