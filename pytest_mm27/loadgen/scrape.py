"""The servers' own count of generated tokens, from ``/metrics``: a cross-check of the client's.

A level's output tokens are summed from the ``usage`` of each response; the
servers count the same tokens in ``vllm:generation_tokens_total`` (our
simulator exports the same name). A scrape before and after the measured
window gives the servers' figure for it, so a client that lost or
double-counted tokens shows up as a mismatch.

The same two scrapes read the prefix cache's counters (queried and hit
prompt tokens), so a level reports its prefix-cache hit rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["METRIC_NAME", "parse_generation_tokens", "parse_prefix_counters", "prefix_delta", "scrape_prefix",
           "scrape_tokens", "server_delta"]

METRIC_NAME = "vllm:generation_tokens_total"
SCRAPE_TIMEOUT_S = 5.0


def parse_generation_tokens(text: str) -> float | None:
    """Sum of ``vllm:generation_tokens_total`` over all its label sets; None if absent or unreadable."""
    # Only our metric's lines go to the parser: a vLLM page is mostly
    # histograms (a 490 KB page took 110 ms to parse whole, 1.3 ms this way),
    # and a line of another metric that the parser rejects must not cost us the count.
    ours = "\n".join(line for line in text.splitlines() if line.startswith(METRIC_NAME))
    try:
        values = [sample.value for family in text_string_to_metric_families(ours)
                  for sample in family.samples if sample.name == METRIC_NAME]
    except ValueError:
        return None                 # a line of it we cannot read: the count is unknown, not smaller
    return sum(values) if values else None


async def scrape_tokens(session: aiohttp.ClientSession, endpoints: Sequence[str]) -> float | None:
    """Server-side generated tokens summed over endpoints; None if any lacks the metric."""
    total = 0.0
    for ep in dict.fromkeys(endpoints):  # the same server listed twice counts once
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                async with session.get(ep.rstrip("/") + "/metrics") as resp:
                    if resp.status != 200:
                        return None
                    value = parse_generation_tokens(await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError):
            return None
        if value is None:
            return None
        total += value
    return total


async def server_delta(session: aiohttp.ClientSession, endpoints: Sequence[str], before: float | None,
                       expect: int) -> int | None:
    """Tokens the servers counted in the window; re-scrapes briefly while short of
    ``expect``, because servers may bump the counter just after the stream ends."""
    if before is None:
        return None
    delta = None
    for _ in range(6):
        after = await scrape_tokens(session, endpoints)
        if after is None:
            return None
        delta = int(round(after - before))
        if delta >= expect:
            break
        await asyncio.sleep(0.2)
    return delta


# --- prefix caching: vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens) ---

PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"


def _counter_sum(text: str, name: str) -> float | None:
    """A counter's value summed over label sets (``name`` or ``name_total``); None if absent."""
    ours = "\n".join(line for line in text.splitlines() if line.startswith(name))
    try:
        values = [s.value for f in text_string_to_metric_families(ours) for s in f.samples
                  if s.name in (name, name + "_total")]
    except ValueError:
        return None
    return sum(values) if values else None


def parse_prefix_counters(text: str) -> tuple[float, float] | None:
    """(queried tokens, hit tokens) of a /metrics page; None if it lacks either."""
    q, h = _counter_sum(text, PREFIX_QUERIES), _counter_sum(text, PREFIX_HITS)
    return None if q is None or h is None else (q, h)


async def scrape_prefix(session: aiohttp.ClientSession, endpoints: Sequence[str]) -> tuple[float, float] | None:
    """Prefix-cache (queries, hits) summed over endpoints; None if any lacks them."""
    q = h = 0.0
    for ep in dict.fromkeys(endpoints):
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                async with session.get(ep.rstrip("/") + "/metrics") as resp:
                    if resp.status != 200:
                        return None
                    pair = parse_prefix_counters(await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError):
            return None
        if pair is None:
            return None
        q, h = q + pair[0], h + pair[1]
    return q, h


def prefix_delta(before: tuple[float, float] | None,
                 after: tuple[float, float] | None) -> tuple[int, int] | None:
    """(queries, hits) counted between two scrapes."""
    if before is None or after is None:
        return None
    return int(round(after[0] - before[0])), int(round(after[1] - before[1]))
