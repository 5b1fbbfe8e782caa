"""Where the data catalog lives.

An editable install (and a checkout) reads the repository's ``fixtures/``;
a wheel carries the same files as ``pytest_mm27/_fixtures``. A project that
runs the suites may add its own ``fixtures/`` in the current directory, which
is searched first so its files shadow the built-in ones.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]   # pytest_mm27/


def builtin_fixtures_dir() -> Path:
    """The catalog that ships with the harness."""
    in_checkout = _PACKAGE_DIR.parent / "fixtures"
    if in_checkout.is_dir():
        return in_checkout
    return _PACKAGE_DIR / "_fixtures"


def fixture_dirs(extra: list[Path] | None = None) -> list[Path]:
    """Fixture roots to search, highest precedence first, without duplicates."""
    candidates = [*(extra or []), Path.cwd() / "fixtures", builtin_fixtures_dir()]
    seen: set[Path] = set()
    out: list[Path] = []
    for path in candidates:
        resolved = path.resolve()
        if resolved in seen or not resolved.is_dir():
            continue
        seen.add(resolved)
        out.append(resolved)
    return out


def catalog_dirs(kind: str, extra: list[Path] | None = None) -> list[Path]:
    """Sub-folders ``kind`` (``topologies``, ``workloads``, ``floors``...) of each root."""
    return [root / kind for root in fixture_dirs(extra) if (root / kind).is_dir()]
