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
  that step.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from .perf import PerfModel


class Seq:
    """One request inside an engine."""

    __slots__ = ("rid", "prompt_len", "max_tokens", "arrival", "computed", "generated", "blocks",
                 "first_token_at", "finished_at", "sink", "aborted", "done", "counted_prompt")

    def __init__(self, rid: int, prompt_len: int, max_tokens: int, arrival: float, sink: Any = None):
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


class StepPlan:
    __slots__ = ("seqs", "counts", "duration", "tokens", "preempted")

    def __init__(self, seqs: list[Seq], counts: list[int], duration: float, tokens: int, preempted: int):
        self.seqs, self.counts, self.duration = seqs, counts, duration
        self.tokens, self.preempted = tokens, preempted


class EngineCore:
    """Waiting queue + running batch + KV-block pool of one data-parallel rank."""

    def __init__(self, index: int, perf: PerfModel, kv_tokens: int, max_num_seqs: int,
                 max_num_batched_tokens: int, block_size: int):
        self.index = index
        self.perf = perf
        self.block_size = block_size
        self.total_blocks = max(1, kv_tokens // block_size)
        self.free_blocks = self.total_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Seq] = deque()
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
                self.free_blocks += s.blocks
                s.blocks = 0
        self.running = [s for s in self.running if not s.aborted]
        self.waiting = deque(s for s in self.waiting if not s.aborted)
        self._aborted = 0

    def _preempt(self, seq: Seq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
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
            self.free_blocks -= need
            s.blocks += need
            seqs.append(s)
            counts.append(n)
            budget -= n
            i += 1
        # Then new requests, unless this step had to preempt.
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                s = waiting[0]
                n = s.prompt_len + s.generated - s.computed
                if n > budget:
                    n = budget
                need = -(-(s.computed + n) // bs) - s.blocks
                if need > self.free_blocks:
                    break
                waiting.popleft()
                if not s.counted_prompt:
                    s.counted_prompt = True
                    self.prompt_tokens += s.prompt_len
                running.append(s)
                self.free_blocks -= need
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
                    self.free_blocks += s.blocks
                    s.blocks = 0
                    self.success += 1
                    finished = True
                    if self.on_finish is not None:
                        self.on_finish(s, now)
        if finished:
            self.running = [s for s in self.running if not s.done]
        return emitted
