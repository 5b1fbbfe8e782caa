"""Request bodies: deterministic prompts from the workload's seed."""

from __future__ import annotations

import json
import random

from ..catalog.workload import Workload
from .sse import SSEParser, WholeParser

# Token ids stay inside 100..1999 so tiny test vocabularies (2048) accept them
# and special tokens (usually the lowest ids) are never sent.
TOKEN_ID_MIN = 100
TOKEN_ID_MAX = 1999
_SPAN = TOKEN_ID_MAX - TOKEN_ID_MIN + 1

_WORDS = (
    "the of and to in is was for on are with as by at from his her they this have an were "
    "which be or had not one but what all when there can more if no out so said who up its "
    "about into than them time could only new some these two may first then do any like my "
    "now over such our man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being"
).split()


class RequestFactory:
    """Builds (path, JSON body) for request number ``index``.

    Every request gets a different prompt (a rotation of one seeded base
    sequence with a unique first token), so prefix caching cannot turn the
    benchmark into a cache benchmark; the same seed gives the same prompts.
    """

    def __init__(self, workload: Workload, model: str):
        self.workload = workload
        rng = random.Random(workload.seed)
        n = max(1, workload.input_tokens)
        if workload.api == "chat":
            self.path = "/v1/chat/completions"
            self._base = [rng.choice(_WORDS) for _ in range(n)]
        else:
            self.path = "/v1/completions"
            self._base = [rng.randrange(TOKEN_ID_MIN, TOKEN_ID_MAX + 1) for _ in range(n)]
        self._common = {
            "model": model,
            "ignore_eos": workload.ignore_eos,
            "temperature": workload.temperature,
            "stream": workload.stream,
            **({"stream_options": {"include_usage": True}} if workload.stream else {}),
        }
        # what reads the answers: SSE events, or one JSON body (stream = false)
        self.parser = SSEParser if workload.stream else WholeParser
        self._head: bytes | None = None
        self._ids: list[str] = []

    def prompt_ids(self, index: int) -> list[int]:
        base = self._base
        k = index % len(base)
        ids = base[k:] + base[:k]
        ids[0] = TOKEN_ID_MIN + (index * 7919 + self.workload.seed) % _SPAN
        return ids

    def prompt_text(self, index: int) -> str:
        base = self._base
        k = index % len(base)
        words = base[k:] + base[:k]
        return f"request {index}: " + " ".join(words[: max(1, len(words) - 2)])

    def body(self, index: int, max_tokens: int | None = None) -> bytes:
        """The request's JSON, byte for byte what ``json.dumps(payload, separators=(",", ":"))``
        gives, assembled from pre-encoded pieces (a few us; it runs in the refill path).

        ``max_tokens`` replaces the workload's output length (steady levels
        stagger their first requests and shorten their tail ones)."""
        if self._head is None:
            common = json.dumps(self._common, separators=(",", ":"))
            self._head = (common[:-1] + ',"messages":[{"role":"user","content":'
                          if self.workload.api == "chat" else common[:-1] + ',"prompt":[').encode()
            self._ids = [str(t) for t in self._base] if self.workload.api != "chat" else []
        head = b'{"max_tokens":%d,' % (max_tokens or self.workload.output_tokens) + self._head[1:]
        if self.workload.api == "chat":
            return head + json.dumps(self.prompt_text(index)).encode() + b"}]}"
        ids = self._ids
        k = index % len(ids)
        first = str(TOKEN_ID_MIN + (index * 7919 + self.workload.seed) % _SPAN)
        return head + ",".join([first, *ids[k + 1:], *ids[:k]]).encode() + b"]}"

    def body_json(self, index: int, max_tokens: int | None = None) -> bytes:
        """Reference implementation of ``body`` (tests compare the two)."""
        payload = {"max_tokens": max_tokens or self.workload.output_tokens, **self._common}
        if self.workload.api == "chat":
            payload["messages"] = [{"role": "user", "content": self.prompt_text(index)}]
        else:
            payload["prompt"] = self.prompt_ids(index)
        return json.dumps(payload, separators=(",", ":")).encode()
