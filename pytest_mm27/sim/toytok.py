"""The simulator's tokenizer: one token per whitespace-separated word.

Deterministic and dependency-free, so ``/tokenize`` and ``/detokenize``
answer like vLLM's and the simulator's prompt counts (words) stay what they
were. Words of a small vocabulary and ``t<id>`` spellings round-trip;
any other word maps to a stable id (crc32), which detokenizes to ``t<id>``.
Ids below ``FIRST_ID`` are never produced (vLLM tokenizers keep special
tokens there).
"""

from __future__ import annotations

import re
import zlib

FIRST_ID = 100
VOCAB_SIZE = 32000
# "tok" first: the simulator's generated text is " tok" per token.
_WORDS = ("tok the of and to in is was for on are with as by at from his her they this have an were which be "
          "or had not one but what all when there can more if no out so said who up its about into than them "
          "time could only new some these two may first then do any like my now over such our man me even most "
          "made after also did many before must through back years where much your way well down should because "
          "each just those people how too little state good very make world still own see men work long get here "
          "between both life being").split()
_ID = {w: FIRST_ID + i for i, w in enumerate(dict.fromkeys(_WORDS))}
_WORD = {i: w for w, i in _ID.items()}
_SPELLED = re.compile(r"t(\d+)\Z")
TOK_ID = _ID["tok"]


def token_id(word: str) -> int:
    i = _ID.get(word)
    if i is not None:
        return i
    m = _SPELLED.match(word)
    if m and FIRST_ID <= int(m.group(1)) < VOCAB_SIZE:
        return int(m.group(1))
    return FIRST_ID + len(_ID) + zlib.crc32(word.encode()) % (VOCAB_SIZE - FIRST_ID - len(_ID))


def tokenize(text: str) -> list[int]:
    return [token_id(w) for w in text.split()]


def detokenize(ids: list[int]) -> str:
    return " ".join(_WORD.get(i) or f"t{i}" for i in ids)
