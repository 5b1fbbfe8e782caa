"""Datasets from local files, read (and checked) when the workload is loaded.

Two formats:

- ``sharegpt``: ShareGPT-style conversations, a JSON array or JSON Lines of
  ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``
  (``role``/``content`` keys are accepted too). As in vLLM's benchmark, a row
  gives one request: the first human turn is the prompt, and the reply that
  follows sets the output length (its token count, found through the
  server's ``/tokenize`` before the level starts). Rows with fewer than two
  turns are skipped, as vLLM skips them.
- ``jsonl``: one ``{"prompt": "...", "output_tokens": N}`` per line.

A malformed row is a ConfigError naming the file and line, raised while the
catalog loads, so nothing boots with a bad dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from .datafile import Table

Format = Literal["sharegpt", "jsonl"]
FORMATS = ("sharegpt", "jsonl")
_HUMAN = ("human", "user")
_MODEL = ("gpt", "assistant", "chatgpt", "bard", "model")


@dataclass(frozen=True)
class DatasetRow:
    prompt: str
    output_tokens: int | None   # jsonl: given; sharegpt: None until the reply is tokenized
    reply: str | None           # sharegpt: the reply whose length sets output_tokens
    line: int


@dataclass(frozen=True)
class Dataset:
    path: Path
    format: Format
    rows: tuple[DatasetRow, ...]
    skipped: int = 0            # sharegpt rows with fewer than two turns

    def with_output_tokens(self, n: int) -> Dataset:
        rows = tuple(DatasetRow(r.prompt, n, None, r.line) for r in self.rows)
        return Dataset(self.path, self.format, rows, self.skipped)

    def summary(self) -> dict[str, Any]:
        """What a run record keeps of it (never the rows themselves)."""
        return {"path": str(self.path), "format": self.format, "rows": len(self.rows), "skipped": self.skipped}


def _bad(path: Path, line: int, message: str) -> ConfigError:
    return ConfigError(f"line {line}: {message}", source=str(path))


def _json_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line, value) of each element of a JSON array or each JSON Lines line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        decoder = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        out: list[tuple[int, Any]] = []
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise _bad(path, text.count("\n") + 1, "the JSON array is not closed")
            if text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise _bad(path, e.lineno, f"not valid JSON: {e.msg}") from None
            out.append((line, value))
    rows = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((n, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise _bad(path, n, f"not valid JSON: {e.msg}") from None
    return rows


def _turn(path: Path, line: int, turn: Any, k: int) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise _bad(path, line, f"conversations[{k}] must be an object, got {type(turn).__name__}")
    who = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(who, str) or not isinstance(text, str):
        raise _bad(path, line, f"conversations[{k}] needs string 'from' and 'value' (or 'role' and 'content')")
    return who.lower(), text


def _sharegpt(path: Path, rows: list[tuple[int, Any]]) -> tuple[list[DatasetRow], int]:
    out, skipped = [], 0
    for line, value in rows:
        if not isinstance(value, dict) or not isinstance(value.get("conversations"), list):
            raise _bad(path, line, "a ShareGPT row must be an object with a 'conversations' array")
        turns = [_turn(path, line, t, k) for k, t in enumerate(value["conversations"])]
        turns = [t for t in turns if t[0] != "system"]
        if len(turns) < 2:
            skipped += 1
            continue
        (who0, prompt), (who1, reply) = turns[0], turns[1]
        if who0 not in _HUMAN or who1 not in _MODEL:
            raise _bad(path, line, f"expected a human turn then a model reply, got {who0!r} then {who1!r}")
        if not prompt.strip():
            raise _bad(path, line, "the first human turn is empty")
        out.append(DatasetRow(prompt=prompt, output_tokens=None, reply=reply, line=line))
    return out, skipped


def _plain(path: Path, rows: list[tuple[int, Any]]) -> list[DatasetRow]:
    out = []
    for line, value in rows:
        if not isinstance(value, dict):
            raise _bad(path, line, f"a row must be an object {{prompt, output_tokens}}, got {type(value).__name__}")
        unknown = sorted(set(value) - {"prompt", "output_tokens"})
        if unknown:
            raise _bad(path, line, f"unknown key {unknown[0]!r} (known: output_tokens, prompt)")
        prompt, n = value.get("prompt"), value.get("output_tokens")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad(path, line, "'prompt' must be a non-empty string")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _bad(path, line, f"'output_tokens' must be a positive integer, got {n!r}")
        out.append(DatasetRow(prompt=prompt, output_tokens=n, reply=None, line=line))
    return out


def read_dataset(path: Path, fmt: Format) -> Dataset:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read dataset: {getattr(exc, 'strerror', None) or exc}", source=str(path)) from None
    rows = _json_rows(path, text)
    if fmt == "sharegpt":
        parsed, skipped = _sharegpt(path, rows)
    else:
        parsed, skipped = _plain(path, rows), 0
    if not parsed:
        raise ConfigError("the dataset has no usable rows", source=str(path))
    return Dataset(path=path, format=fmt, rows=tuple(parsed), skipped=skipped)


def resolve_dataset_path(workload_file: Path, name: str) -> Path:
    """A dataset path as written in a workload: absolute, else relative to the workload's
    folder, else to the fixtures root above it (``datasets/x.jsonl``)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    for base in (workload_file.parent, workload_file.parent.parent):
        if (base / p).is_file():
            return (base / p).resolve()
    return (workload_file.parent.parent / p).resolve()


def parse_dataset(t: Table, workload_file: Path) -> Dataset | None:
    """The ``[dataset]`` table: ``path``, ``format`` (sharegpt | jsonl), optional ``limit`` rows."""
    if not t.has("dataset"):
        return None
    d = t.table("dataset")
    path = resolve_dataset_path(workload_file, d.string("path"))
    fmt = d.string("format", "jsonl" if path.suffix == ".jsonl" and "sharegpt" not in path.name else "sharegpt",
                   choices=FORMATS)
    limit = d.integer("limit", None)
    d.finish()
    if not path.is_file():
        raise d.error("path", f"no such file: {path}")
    ds = read_dataset(path, fmt)
    if limit is not None:
        ds = Dataset(ds.path, ds.format, ds.rows[:limit], ds.skipped)
    return ds
