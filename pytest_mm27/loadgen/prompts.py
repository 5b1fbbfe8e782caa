"""Request bodies: deterministic prompts from the workload's seed.

A plain workload (one fixed shape) takes the pre-encoded fast path below. A
shaped one (length distributions, shared prefixes, a dataset; catalog.lengths,
catalog.traffic, catalog.datasets) builds each body from its parts:

- completions send token ids, so any length is exact with no tokenizer;
  a shared prefix is the same ids at the start of every request that uses it;
- chat sends text of an exact token count (``tokenize.WordPool``, measured on
  the server before the level), a shared prefix as the system message;
- a dataset's prompts are sent as they are, with the row's output length;
  once the rows run out they repeat, each repeat tagged ``(N)`` at its start.

What needs the server (the word pool, a ShareGPT reply's token count) is
found once by :func:`prepare` and travels with the factory to worker processes.

Each level run in this process (each :func:`prepare`) shifts the request
content by ``LEVEL_STRIDE``: level 2 of a sweep, or trial 2, must not send
level 1's prompts again, or the server's prefix cache would serve them and
the level would measure the cache. Lengths do not shift (every level sees
the same sample of the distribution), nor do shared prefixes (a system
prompt stays warm in a real service too). The first level's content is what
it always was; the same run order gives the same prompts.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass

from ..catalog.workload import Workload
from ..errors import LoadError
from .tokenize import ServerTokenizer, WordPool, word_pool
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


LEVEL_STRIDE = 1_000_003     # content index shift per level (a prime: rotations differ too)
_LEVELS = itertools.count()


@dataclass(frozen=True)
class Prepared:
    """What the server told us before a level (picklable), and the level's content shift."""

    pool: WordPool | None = None                    # chat: exact-length text
    dataset_outputs: tuple[int, ...] | None = None  # output length per dataset row
    level: int = 0                                  # levels run before this one in this process


def needs_server(workload: Workload) -> bool:
    """Whether building this workload's requests needs the server's tokenizer first."""
    if workload.dataset is not None:
        return any(r.output_tokens is None for r in workload.dataset.rows)
    return workload.api == "chat" and (workload.shaped or workload.sessions is not None)


def prepare(endpoint: str, model: str, workload: Workload, api_key: str | None = None) -> Prepared:
    """Ask ``endpoint``'s /tokenize what the workload's requests need (nothing for most)."""
    level = next(_LEVELS)
    if not needs_server(workload):
        return Prepared(level=level)
    tok = ServerTokenizer(endpoint, model, api_key)
    if workload.dataset is not None:
        # ShareGPT: a row's output length is its reply's token count, as in vLLM's benchmark.
        outs = tuple(r.output_tokens if r.output_tokens is not None else max(1, tok.count(r.reply or ""))
                     for r in workload.dataset.rows)
        return Prepared(dataset_outputs=outs, level=level)
    lo, hi = workload.input_tokens, workload.input_tokens
    if workload.input_lengths is not None:
        lo, hi = workload.input_lengths.minimum, workload.input_lengths.maximum
    checks = {lo, hi} | ({workload.prefix.tokens} if workload.prefix else set())
    return Prepared(pool=word_pool(tok, chat=True, check_lengths=tuple(sorted(checks))), level=level)


class RequestFactory:
    """Builds (path, JSON body) for request number ``index``.

    Every request gets a different prompt (a rotation of one seeded base
    sequence with a unique first token), so prefix caching cannot turn the
    benchmark into a cache benchmark; the same seed gives the same prompts.
    """

    def __init__(self, workload: Workload, model: str, prepared: Prepared | None = None):
        self.workload = workload
        self.prepared = prepared or Prepared()
        self.shaped = workload.shaped
        self._shift = self.prepared.level * LEVEL_STRIDE
        if needs_server(workload) and self.prepared.pool is None and self.prepared.dataset_outputs is None:
            raise LoadError(f"workload {workload.name!r} needs the server's /tokenize first: "
                            "build its factory with prompts.prepare(...)")
        rng = random.Random(workload.seed)
        n = max(1, workload.input_tokens)
        if workload.input_lengths is not None:
            n = max(1, workload.input_lengths.maximum)
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
        self._prefix_ids: list[list[int]] = []
        self._prefix_text: list[str] = []
        if workload.prefix is not None:
            k, p = workload.prefix.count, workload.prefix.tokens
            if workload.api == "chat":
                pool = self.prepared.pool
                assert pool is not None
                self._prefix_text = [pool.text(p, (1 << 50) + j, workload.seed) for j in range(k)]
            else:
                self._prefix_ids = [[random.Random(f"{workload.seed}:prefix:{j}").randrange(TOKEN_ID_MIN,
                                                                                           TOKEN_ID_MAX + 1)
                                     for _ in range(p)] for j in range(k)]

    def max_tokens_for(self, index: int) -> int:
        """Request ``index``'s output length (before any level's override)."""
        ds = self.workload.dataset
        if ds is None:
            return self.workload.output_for(index)
        i = index % len(ds.rows)
        outs = self.prepared.dataset_outputs
        return outs[i] if outs else ds.rows[i].output_tokens  # type: ignore[return-value]

    def fresh_ids(self, index: int, n: int) -> list[int]:
        """``n`` token ids unique to ``index`` (its first id), a rotation of the seeded base."""
        ids = self.prompt_ids(index)
        return ids[:n]

    def messages(self, index: int) -> list[dict[str, str]]:
        """Chat messages of a shaped request: the shared prefix as system message, then the user turn."""
        w = self.workload
        pool = self.prepared.pool
        assert pool is not None
        out = []
        if w.prefix is not None:
            out.append({"role": "system", "content": self._prefix_text[w.prefix.which(w.seed, index)]})
        out.append({"role": "user", "content": self.user_text(index)})
        return out

    def user_text(self, index: int) -> str:
        """Request ``index``'s own text, exactly ``input_for(index)`` tokens (chat)."""
        pool = self.prepared.pool
        assert pool is not None
        return pool.text(self.workload.input_for(index), index + self._shift, self.workload.seed)

    def chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> bytes:
        """A chat request of these messages (a session's turn, its history included)."""
        payload = {"max_tokens": max_tokens, **self._common, "messages": messages}
        return json.dumps(payload, separators=(",", ":")).encode()

    def shaped_payload(self, index: int, max_tokens: int | None = None) -> dict:
        w = self.workload
        payload: dict = {"max_tokens": max_tokens or self.max_tokens_for(index), **self._common}
        if w.dataset is not None:
            rows = w.dataset.rows
            prompt = rows[index % len(rows)].prompt
            # Past the end (or in a later level) the dataset repeats; a tag makes a
            # repeat no whole-prompt cache hit.
            if index + self._shift >= len(rows):
                prompt = f"({(index + self._shift) // len(rows)}) {prompt}"
            if w.api == "chat":
                payload["messages"] = [{"role": "user", "content": prompt}]
            else:
                payload["prompt"] = prompt
        elif w.api == "chat":
            payload["messages"] = self.messages(index)
        else:
            ids = self.fresh_ids(index, w.input_for(index))
            if w.prefix is not None:
                ids = self._prefix_ids[w.prefix.which(w.seed, index)] + ids
            payload["prompt"] = ids
        return payload

    def prompt_ids(self, index: int) -> list[int]:
        index += self._shift
        base = self._base
        k = index % len(base)
        ids = base[k:] + base[:k]
        ids[0] = TOKEN_ID_MIN + (index * 7919 + self.workload.seed) % _SPAN
        return ids

    def prompt_text(self, index: int) -> str:
        index += self._shift
        base = self._base
        k = index % len(base)
        words = base[k:] + base[:k]
        return f"request {index}: " + " ".join(words[: max(1, len(words) - 2)])

    def body(self, index: int, max_tokens: int | None = None) -> bytes:
        """The request's JSON, byte for byte what ``json.dumps(payload, separators=(",", ":"))``
        gives, assembled from pre-encoded pieces (a few us; it runs in the refill path).

        ``max_tokens`` replaces the workload's output length (steady levels
        stagger their first requests and shorten their tail ones)."""
        if self.shaped:
            return json.dumps(self.shaped_payload(index, max_tokens), separators=(",", ":")).encode()
        if self._head is None:
            common = json.dumps(self._common, separators=(",", ":"))
            self._head = (common[:-1] + ',"messages":[{"role":"user","content":'
                          if self.workload.api == "chat" else common[:-1] + ',"prompt":[').encode()
            self._ids = [str(t) for t in self._base] if self.workload.api != "chat" else []
        head = b'{"max_tokens":%d,' % (max_tokens or self.workload.output_tokens) + self._head[1:]
        if self.workload.api == "chat":
            return head + json.dumps(self.prompt_text(index)).encode() + b"}]}"
        ids = self._ids
        index += self._shift
        k = index % len(ids)
        first = str(TOKEN_ID_MIN + (index * 7919 + self.workload.seed) % _SPAN)
        return head + ",".join([first, *ids[k + 1:], *ids[:k]]).encode() + b"]}"

    def body_json(self, index: int, max_tokens: int | None = None) -> bytes:
        """Reference implementation of ``body`` (tests compare the two)."""
        if self.shaped:
            return json.dumps(self.shaped_payload(index, max_tokens), separators=(",", ":")).encode()
        payload = {"max_tokens": max_tokens or self.workload.output_tokens, **self._common}
        if self.workload.api == "chat":
            payload["messages"] = [{"role": "user", "content": self.prompt_text(index)}]
        else:
            payload["prompt"] = self.prompt_ids(index)
        return json.dumps(payload, separators=(",", ":")).encode()
