"""Automatic prefix caching for the simulator's engine, after vLLM V1's.

Full KV blocks are named by a chain hash of their tokens (block j's hash
covers blocks 0..j), so two prompts share block j only if they agree on
every token up to its end. A new request looks up its longest run of cached
blocks: those tokens count as computed (their prefill is skipped) and the
blocks are shared, not allocated again. Blocks nobody uses stay cached but
count as free; they are evicted least recently used when an allocation
needs the room. As in vLLM, at most ``prompt_len - 1`` tokens are hits (the
last prompt token is always computed, to sample from), and the counters are
in tokens: ``queries`` are prompt tokens looked up, ``hits`` those found.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], block_size: int, start: int = 0, parent: int = 0) -> list[int]:
    """Chain hashes of the full blocks of ``tokens`` from block ``start`` (``parent``: the hash before it)."""
    out = []
    h = parent
    for j in range(start, len(tokens) // block_size):
        h = hash((h, tuple(tokens[j * block_size:(j + 1) * block_size])))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self) -> None:
        self.refs: dict[int, int] = {}                      # cached block -> requests using it
        self.idle: OrderedDict[int, None] = OrderedDict()   # cached, unused: free, evictable (LRU first)
        self.queries = 0
        self.hits = 0
        self.evicted = 0

    def match(self, hashes: Sequence[int], limit: int) -> tuple[int, int]:
        """(blocks of ``hashes`` cached from the start, at most ``limit``; how many of them are idle)."""
        n = idle = 0
        refs = self.refs
        for h in hashes[:limit]:
            if h not in refs:
                break
            n += 1
            if refs[h] == 0:
                idle += 1
        return n, idle

    def acquire(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            if self.refs[h] == 0:
                del self.idle[h]
            self.refs[h] += 1

    def release(self, hashes: Sequence[int]) -> int:
        """Drop one use of each block; returns how many became idle (free again)."""
        freed = 0
        for h in hashes:
            self.refs[h] -= 1
            if self.refs[h] == 0:
                self.idle[h] = None
                freed += 1
        return freed

    def add(self, h: int, in_use: bool) -> bool:
        """Cache a computed block (held by its request, or idle); False if already cached."""
        if h in self.refs:
            return False
        self.refs[h] = 1 if in_use else 0
        if not in_use:
            self.idle[h] = None
        return True

    def evict(self, n: int) -> None:
        """Forget the ``n`` least recently used idle blocks (their room is being allocated)."""
        for _ in range(min(n, len(self.idle))):
            h, _ = self.idle.popitem(last=False)
            del self.refs[h]
            self.evicted += 1
