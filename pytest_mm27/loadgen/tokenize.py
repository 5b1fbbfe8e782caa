"""Prompts of an exact token length, measured by the served model's own ``/tokenize``.

No tokenizer library runs on the harness side. Before a level that sends
text, the harness asks the server once (per endpoint and model, cached in
this process) which words of a pool are exactly one token where they stand
(after a space), and which word is one token at the start of a text. The
pool is common English words where the vocabulary has them whole; a small
vocabulary (the tiny test model's 2,048 ids) has few, so the pool is then
filled up with whole-word tokens read off the vocabulary itself
(``/detokenize`` of single ids). A text
of n such words is then n tokens, because byte-level BPE and SentencePiece
tokenizers split at spaces before merging; each request's text is made
unique by a short "salt" of pool words spelling its index, so no two
requests share a cached prefix by accident. That additivity is checked,
not assumed: texts at a few lengths are tokenized and must come out exact,
else the level stops with a LoadError saying what the server counted.

For chat, the template adds a fixed number of tokens around a message
(``chat_overhead``, measured the same way): a user message of n content
tokens is a prompt of n + overhead tokens.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..errors import LoadError

# Candidate words: short, common English, so most tokenizers keep them whole.
CANDIDATES = (
    "the of and to in is was for on are with as by at from his her they this have an were which be or had not "
    "one but what all when there can more if no out so said who up its about into than them time could only "
    "new some these two may first then do any like my now over such our man me even most made after also did "
    "many before must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being "
    "day way use her find give go come know take see look want call ask feel try leave put mean keep let begin "
    "seem help show hear play run move live hold bring write sit stand lose pay meet set learn lead read grow "
    "open walk win talk turn start end art war car city house name home side head line hand part place case"
).split()
MIN_POOL = 8            # fewer single-token words than this: the tokenizer is too odd to build prompts from
WANT_POOL = 64          # fewer English words than this: add whole-word tokens from the vocabulary
PROBE_IDS = range(100, 4100, 5)     # ids whose text is looked at for whole-word tokens
_WORDLIKE = re.compile(r" [A-Za-z]{2,12}")
SALT_SPACE = 10 ** 7    # distinct salts wanted (requests with no accidental shared prefix)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerTokenizer:
    """``POST /tokenize`` on one endpoint (vLLM's API; the simulator answers it too)."""

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, timeout_s: float = 30.0):
        self.url = endpoint.rstrip("/") + "/tokenize"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.calls = 0

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps({"model": self.model, **body}).encode(),
                                     headers=headers)
        self.calls += 1
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                out = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise LoadError(f"{self.url}: HTTP {e.code} from /tokenize: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LoadError(f"{self.url}: /tokenize failed: {e}") from None
        if not isinstance(out, dict) or not isinstance(out.get("count"), int):
            raise LoadError(f"{self.url}: /tokenize answered without a count: {str(out)[:200]}")
        return out

    def detokenize(self, ids: list[int]) -> str | None:
        """The text of ``ids``; None when the server refuses them (an id past the vocabulary)."""
        req = urllib.request.Request(self.url[: -len("/tokenize")] + "/detokenize",
                                     data=json.dumps({"model": self.model, "tokens": ids}).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        self.calls += 1
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                out = json.loads(resp.read())
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LoadError(f"{self.url}: /detokenize failed: {e}") from None
        prompt = out.get("prompt") if isinstance(out, dict) else None
        return prompt if isinstance(prompt, str) else None

    def count(self, text: str) -> int:
        """Tokens of ``text`` alone (no BOS or other special tokens)."""
        return self._post({"prompt": text, "add_special_tokens": False})["count"]

    def count_chat(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the prompt the chat template makes of ``messages`` (with the generation prompt)."""
        return self._post({"messages": messages, "add_generation_prompt": True})["count"]


@dataclass(frozen=True)
class WordPool:
    """Words that are one token each for one served model; builds exact-length texts."""

    first: str                  # one token at the start of a text (may start with a space)
    words: tuple[str, ...]      # one token each after a space
    chat_overhead: int | None = None    # tokens the chat template adds to one user message

    @property
    def salt_len(self) -> int:
        return max(1, math.ceil(math.log(SALT_SPACE) / math.log(len(self.words))))

    def text(self, n: int, index: int, seed: int = 0) -> str:
        """A text of exactly ``n`` tokens, unique to ``index`` (for n > salt length)."""
        if n < 1:
            raise LoadError(f"a prompt needs at least one token, not {n}")
        words, k = self.words, len(self.words)
        out = [self.first]
        salt = min(self.salt_len, n - 1)
        x = index
        for _ in range(salt):
            x, d = divmod(x, k)
            out.append(words[d])
        start = (seed * 7919 + index * 31) % k
        out.extend(words[(start + j * 5) % k] for j in range(n - 1 - salt))
        return " ".join(out)


_POOLS: dict[tuple[str, str, bool], WordPool] = {}


def word_pool(tok: ServerTokenizer, *, chat: bool, check_lengths: tuple[int, ...] = ()) -> WordPool:
    """The pool for ``tok``'s server and model (cached), its additivity checked at ``check_lengths``."""
    key = (tok.url, tok.model, chat)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _build_pool(tok, chat)
        _POOLS[key] = pool
    for n in check_lengths:
        _check(tok, pool, n, chat)
    return pool


def _build_pool(tok: ServerTokenizer, chat: bool) -> WordPool:
    words = _single_tokens(tok, tuple(dict.fromkeys(CANDIDATES)))
    if len(words) < WANT_POOL:
        words = tuple(dict.fromkeys(words + _single_tokens(tok, _vocabulary_words(tok))))
    if len(words) < MIN_POOL:
        raise LoadError(f"{tok.url}: only {len(words)} whole words are one token each for model {tok.model!r}; "
                        "exact-length text prompts cannot be built")
    first = next((w for w in words if tok.count(w) == 1), None) or next(
        (" " + w for w in words if tok.count(" " + w) == 1), None)
    if first is None:
        raise LoadError(f"{tok.url}: no pool word is one token at the start of a text for model {tok.model!r}")
    overhead = None
    if chat:
        probe = WordPool(first, words)
        a = tok.count_chat([{"role": "user", "content": probe.text(8, 0)}]) - 8
        b = tok.count_chat([{"role": "user", "content": probe.text(40, 1)}]) - 40
        if a != b:
            raise LoadError(f"{tok.url}: the chat template's overhead is not constant ({a} tokens around "
                            f"8 content tokens, {b} around 40) for model {tok.model!r}")
        overhead = a
    return WordPool(first, words, overhead)


def _single_tokens(tok: ServerTokenizer, words: tuple[str, ...]) -> tuple[str, ...]:
    """The ``words`` that are one token each after a space (one call when all are)."""
    if not words:
        return ()
    base = tok.count("the")
    if tok.count("the " + " ".join(words)) - base == len(words):
        return words
    return tuple(w for w in words if tok.count("the " + w) - base == 1)


def _vocabulary_words(tok: ServerTokenizer) -> tuple[str, ...]:
    """Whole-word tokens of the served vocabulary: ids whose text is a space and a short word."""
    out = []
    for i in PROBE_IDS:
        text = tok.detokenize([i])
        if text is None:
            break           # past the vocabulary
        if _WORDLIKE.fullmatch(text):
            out.append(text[1:])
    return tuple(dict.fromkeys(out))


def _check(tok: ServerTokenizer, pool: WordPool, n: int, chat: bool) -> None:
    text = pool.text(n, 12345)
    got = tok.count_chat([{"role": "user", "content": text}]) - (pool.chat_overhead or 0) if chat else tok.count(text)
    if got != n:
        raise LoadError(f"{tok.url}: a text built to be {n} tokens is {got} tokens for model {tok.model!r} "
                        "(its tokenizer merges across spaces); exact-length text prompts cannot be built")
