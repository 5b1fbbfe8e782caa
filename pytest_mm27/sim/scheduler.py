"""One engine's continuous-batching scheduler, clock-agnostic.

The same code runs on the wall clock (``server``) and on a virtual clock
(``virtual``): the caller asks :meth:`EngineCore.schedule` for the next step, waits
(really or virtually) for the step's duration, then calls :meth:`EngineCore.commit`
with the step's end time. It follows vLLM V1's scheduler:

- a token budget per step (``max_num_batched_tokens``) shared by running
  requests first (decodes take one token, unfinished prefills a chunk), then
  new requests from the waiting queue (chunked prefill);
- at most ``max_num_seqs`` running requests;
- KV cache in blocks of ``block_size`` tokens, allocated as tokens are scheduled;
  when a running request needs a block and none is free, the most recently
  admitted request is preempted (recompute: its blocks are freed and it goes
  back to the front of the waiting queue), and no new request is admitted in
  that step;
- automatic prefix caching (``prefix``) for requests that carry their token
  ids: a new request starts from its longest cached run of full blocks.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from .perf import PerfModel
from .prefix import PrefixCache, block_hashes
from .toytok import TOK_ID


class Seq:
    """One request inside an engine."""

    __slots__ = ("rid", "prompt_len", "max_tokens", "arrival", "computed", "generated", "blocks",
                 "first_token_at", "finished_at", "sink", "aborted", "done", "counted_prompt",
                 "tokens", "hashes", "cached")

    def __init__(self, rid: int, prompt_len: int, max_tokens: int, arrival: float, sink: Any = None,
                 tokens: list[int] | None = None):
        self.rid = rid
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.computed = 0           # tokens whose KV is in the cache
        self.generated = 0          # output tokens sampled so far
        self.blocks = 0             # KV blocks held
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.sink = sink            # server side: receives tokens (see server.Stream)
        self.aborted = False
        self.done = False
        self.counted_prompt = False
        self.tokens = tokens        # prompt token ids (prefix caching); None: never cached
        self.hashes: list[int] = []     # chain hashes of the prompt's full blocks
        self.cached: list[int] = []     # cached blocks this request holds (a prefix of its blocks)


class StepPlan:
    __slots__ = ("seqs", "counts", "duration", "tokens", "preempted")

    def __init__(self, seqs: list[Seq], counts: list[int], duration: float, tokens: int, preempted: int):
        self.seqs, self.counts, self.duration = seqs, counts, duration
        self.tokens, self.preempted = tokens, preempted


class EngineCore:
    """Waiting queue + running batch + KV-block pool of one data-parallel rank."""

    def __init__(self, index: int, perf: PerfModel, kv_tokens: int, max_num_seqs: int,
                 max_num_batched_tokens: int, block_size: int, prefix_caching: bool = True):
        self.index = index
        self.perf = perf
        self.block_size = block_size
        self.total_blocks = max(1, kv_tokens // block_size)
        self.free_blocks = self.total_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Seq] = deque()
        self.cache = PrefixCache() if prefix_caching else None
        self.running: list[Seq] = []
        self._aborted = 0
        # vLLM's counters, read by /metrics
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.preemptions = 0
        self.success = 0
        self.on_first_token: Callable[[Seq, float], None] | None = None
        self.on_finish: Callable[[Seq, float], None] | None = None

    # --- queue management ---
    def add(self, seq: Seq) -> None:
        if self.cache is not None and seq.tokens:
            seq.hashes = block_hashes(seq.tokens, self.block_size)
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> None:
        if not seq.aborted and not seq.done:
            seq.aborted = True
            self._aborted += 1

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks

    def _drop_aborted(self) -> None:
        for s in self.running:
            if s.aborted:
                self._free(s)
        self.running = [s for s in self.running if not s.aborted]
        self.waiting = deque(s for s in self.waiting if not s.aborted)
        self._aborted = 0

    def _free(self, seq: Seq) -> None:
        """Give back a request's blocks: its own ones, and its use of cached ones."""
        self.free_blocks += seq.blocks - len(seq.cached)
        if seq.cached:
            self.free_blocks += self.cache.release(seq.cached)  # type: ignore[union-attr]
            seq.cached = []
        seq.blocks = 0

    def _alloc(self, n: int) -> None:
        # Idle cached blocks count as free; take their room only when no other is left.
        cache = self.cache
        if cache is not None and n > self.free_blocks - len(cache.idle):
            cache.evict(n - (self.free_blocks - len(cache.idle)))
        self.free_blocks -= n

    def _register(self, s: Seq, upto: int) -> None:
        """Cache ``s``'s computed full prompt blocks up to block ``upto`` (held by ``s``)."""
        cache = self.cache
        for h in s.hashes[len(s.cached):upto]:
            if not cache.add(h, in_use=True):  # type: ignore[union-attr]
                break       # computed twice at once; the other copy is the cached one
            s.cached.append(h)

    def _finished(self, s: Seq) -> None:
        self._free(s)
        cache = self.cache
        if cache is None or not s.tokens or not all(h in cache.refs for h in s.hashes):
            return      # no chain to extend (a prompt block was evicted meanwhile)
        # The reply's blocks stay cached too (a chat's next turn starts with them);
        # the last sampled token has no KV yet.
        full = s.tokens + [TOK_ID] * (s.generated - 1)
        for h in block_hashes(full, self.block_size, len(s.hashes), s.hashes[-1] if s.hashes else 0):
            cache.add(h, in_use=False)

    def _preempt(self, seq: Seq) -> None:
        self._free(seq)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # --- one step ---
    def schedule(self) -> StepPlan | None:
        """Pick the next step's work and its duration; None when there is nothing to run."""
        if self._aborted:
            self._drop_aborted()
        budget = self.max_num_batched_tokens
        bs = self.block_size
        running = self.running
        seqs: list[Seq] = []
        counts: list[int] = []
        preempted = 0
        i = 0
        # Running requests first: a decode token each, or the next prefill chunk.
        while i < len(running) and budget > 0:
            s = running[i]
            n = s.prompt_len + s.generated - s.computed
            if n > budget:
                n = budget
            need = -(-(s.computed + n) // bs) - s.blocks      # KV blocks to book
            victim = None
            while need > self.free_blocks and victim is not s:
                victim = running.pop()
                self._preempt(victim)
                preempted += 1
            if victim is s:
                break       # s was the newest left: nothing more fits this step
            self._alloc(need)
            s.blocks += need
            seqs.append(s)
            counts.append(n)
            budget -= n
            i += 1
        # Then new requests, unless this step had to preempt.
        if not preempted:
            waiting = self.waiting
            cache = self.cache
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                s = waiting[0]
                hit = idle = 0
                lookup = cache is not None and s.computed == 0 and s.tokens is not None
                if lookup and s.hashes:
                    hit, idle = cache.match(s.hashes, (s.prompt_len - 1) // bs)
                start = hit * bs if hit else s.computed
                n = s.prompt_len + s.generated - start
                if n > budget:
                    n = budget
                need = -(-(start + n) // bs) - (hit or s.blocks)
                if need + idle > self.free_blocks:
                    break
                waiting.popleft()
                if lookup:
                    cache.queries += s.prompt_len
                    cache.hits += hit * bs
                if hit:
                    cache.acquire(s.hashes[:hit])
                    self.free_blocks -= idle
                    s.cached = list(s.hashes[:hit])
                    s.computed = start
                    s.blocks = hit
                if not s.counted_prompt:
                    s.counted_prompt = True
                    self.prompt_tokens += s.prompt_len
                running.append(s)
                self._alloc(need)
                s.blocks += need
                seqs.append(s)
                counts.append(n)
                budget -= n
        if not seqs:
            return None
        tokens = sampled = kv = 0
        pairs = 0.0
        for s, n in zip(seqs, counts):
            tokens += n
            kv += s.computed + n
            if s.computed + n == s.prompt_len + s.generated:
                sampled += 1
            if n > 1:       # a prefill chunk attends to itself and the context before it
                pairs += n * (s.computed + (n + 1) / 2)
        duration = self.perf.step_time(tokens, len(seqs), sampled, kv, pairs)
        return StepPlan(seqs, counts, duration, tokens, preempted)

    def commit(self, plan: StepPlan, now: float) -> list[Seq]:
        """Apply a finished step at time ``now``; returns the sequences that got a token."""
        emitted: list[Seq] = []
        finished = False
        for s, n in zip(plan.seqs, plan.counts):
            if s.aborted:
                continue
            s.computed += n
            if s.hashes and len(s.cached) < len(s.hashes):
                self._register(s, s.computed // self.block_size)
            if s.computed == s.prompt_len + s.generated:
                s.generated += 1
                self.generation_tokens += 1
                emitted.append(s)
                if s.first_token_at is None:
                    s.first_token_at = now
                    if self.on_first_token is not None:
                        self.on_first_token(s, now)
                if s.generated >= s.max_tokens:
                    s.done = True
                    s.finished_at = now
                    self._finished(s)
                    self.success += 1
                    finished = True
                    if self.on_finish is not None:
                        self.on_finish(s, now)
        if finished:
            self.running = [s for s in self.running if not s.done]
        return emitted
