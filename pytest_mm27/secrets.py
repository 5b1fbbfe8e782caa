"""Secrets: one rule for what is secret, and the masking every written text goes through.

Records, baselines, reports and logs must never hold a secret. Two nets
catch them: values under names that look secret (JSON keys, environment
variables, command-line flags) are masked, and any string holding a known
secret value (the API key given, the value of a secret-looking environment
variable such as HF_TOKEN) has it masked wherever it appears, e.g. inside an
error message that quotes a command line. The servers themselves still get
the real values: only text written for people is masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***"
# A name is secret when one of its words (split on _ - . and case changes) is one of
# these, or ends with one (GITHUBTOKEN, HFKEY), but not a plural count ("tokens").
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential",
                           "credentials", "auth", "authorization"})
_SECRET_ENDINGS = ("token", "apikey", "secret", "password", "passwd")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])")
# Shorter values are too likely to occur by chance ("1", "true") to mask everywhere.
MIN_SECRET_LEN = 6
_known_secrets: set[str] = set()


def is_secret_name(name: str) -> bool:
    """``HF_TOKEN``, ``api_key``, ``--api-key``, ``x-auth-token`` yes; ``output_tokens``, ``keyfile``,
    ``--tokenizer`` and a bare ``key`` (a baseline's lookup key) no."""
    words = [w.lower() for w in _WORD_SPLIT.split(name) if w]
    if words == ["key"]:
        return False
    return any(word in _SECRET_WORDS or word.endswith(_SECRET_ENDINGS) for word in words)


def add_secret(value: str | None) -> None:
    """Remember a secret value (e.g. the --api-key given) so no record ever shows it."""
    if value and len(value) >= MIN_SECRET_LEN:
        _known_secrets.add(value)


def known_secrets() -> list[str]:
    """Registered secrets plus the values of secret-looking environment variables, longest first."""
    found = set(_known_secrets)
    for name, value in os.environ.items():
        if value and len(value) >= MIN_SECRET_LEN and is_secret_name(name):
            found.add(value)
    return sorted(found, key=len, reverse=True)


def redact(data: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``data`` (JSON-like) with secrets masked (see the note above)."""
    secrets = known_secrets() if secrets is None else secrets

    def text(value: str) -> str:
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def walk(value: Any, secret_key: bool) -> Any:
        if isinstance(value, str):
            return REDACTED if secret_key and value else text(value)
        if isinstance(value, Mapping):
            return {k: walk(v, secret_key or (isinstance(k, str) and is_secret_name(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, secret_key) for v in value]
        return value

    return walk(data, False)


def redact_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` with the values of secret flags (``--api-key X``, ``--hf-token=Y``) masked."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _value = arg.partition("=")
        if flag.startswith("--") and is_secret_name(flag):
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return tuple(out)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if is_secret_name(k) else v) for k, v in env.items()}
