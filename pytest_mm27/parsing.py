"""Command-line value parsers: argparse ``type=`` callbacks that double as ini-value checks.

One place for every validator, so the plugin's options, ``python -m
pytest_mm27.sim`` and ``python -m pytest_mm27.loadgen`` refuse bad values
with the same words, before anything boots.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

# Simulator fault knobs a user may set with --sim-fault NAME=VALUE.
SIM_FAULTS: Mapping[str, Callable[[str], float | int]] = MappingProxyType({
    "slowdown": float, "error-rate": float, "crash-after": int, "hang-after": int, "startup-delay": float,
    "startup-crash": float, "malformed-sse-rate": float, "cut-stream-rate": float,
})


def split_names(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """``--topology a,b --topology c`` and ini lines -> ('a', 'b', 'c')."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        out.extend(part.strip() for part in value.replace("\n", ",").split(",") if part.strip())
    return tuple(dict.fromkeys(out))


def parse_concurrency(text: str) -> tuple[int, ...]:
    levels: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, got {part!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, got {value}")
        levels.append(value)
    if not levels:
        raise argparse.ArgumentTypeError("no concurrency levels given")
    return tuple(sorted(set(levels)))


def parse_rates(text: str) -> tuple[float, ...]:
    """``"2,5,10"`` -> open-loop request rates (requests/s), sorted, each a level."""
    import math
    rates: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"request rates must be positive numbers (requests/s), got {part!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"request rates must be positive numbers (requests/s), got {part}")
        rates.append(value)
    if not rates:
        raise argparse.ArgumentTypeError("no request rates given")
    return tuple(sorted(set(rates)))


def parse_endpoint(text: str) -> str:
    url = text.strip().rstrip("/")
    if not (url.startswith("http://") or url.startswith("https://")):
        raise argparse.ArgumentTypeError(f"endpoint must be an http(s) URL, got {text!r}")
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def share(text: str) -> float:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05; ValueError when it is neither."""
    raw = text.strip()
    return float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)


def parse_fraction(text: str, what: str = "value") -> float:
    """``0.05`` or ``5%``: a share between 0 and 1."""
    try:
        value = share(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number like 0.01 or 1%, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{what} must be between 0 and 1, got {text!r}")
    return value


def parse_error_rate(text: str) -> float:
    return parse_fraction(text, "error rate")


GATE_MODES = ("history",)
HISTORY_OFF = ("off", "none", "false", "0")


def parse_gate(text: str) -> str:
    """--gate MODE: 'history' (change points over the stored history; --baseline is its own option)."""
    mode = text.strip().lower()
    if mode not in GATE_MODES:
        raise argparse.ArgumentTypeError(f"--gate must be one of {', '.join(GATE_MODES)}; got {text!r}")
    return mode


def parse_history(text: str) -> str:
    """--history PATH|URL|off: an SQLite file, a postgresql:// URL, or off."""
    value = text.strip()
    if not value:
        raise argparse.ArgumentTypeError("--history needs a file path, a postgresql:// URL or 'off'")
    if "://" in value and value.split("://", 1)[0].lower() not in ("postgresql", "postgres", "sqlite"):
        raise argparse.ArgumentTypeError(f"--history URL must be postgresql://... (or sqlite://PATH); "
                                         f"got scheme {value.split('://', 1)[0]!r}")
    return value


def parse_ray_address(text: str) -> str:
    """--ray-address: ``auto``, ``ray://host:port`` (Ray Client) or a head's ``host:port``."""
    value = text.strip()
    if value == "auto" or re.fullmatch(r"(ray://)?[A-Za-z0-9._\-\[\]:]+:\d{1,5}", value):
        return value
    raise argparse.ArgumentTypeError(f"--ray-address must be 'auto', ray://HOST:PORT or a head's HOST:PORT; "
                                     f"got {text!r}")


def parse_sim_fault(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip().replace("_", "-")
    if not sep or name not in SIM_FAULTS:
        raise argparse.ArgumentTypeError(
            f"sim fault must be NAME=VALUE with NAME one of {', '.join(SIM_FAULTS)}; got {text!r}")
    try:
        SIM_FAULTS[name](value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sim fault {name} needs a number, got {value!r}") from None
    return name, value.strip()


def parse_precision(text: str) -> float:
    """``1%`` or ``0.01``: the relative half-width of the 95 % interval a steady window aims for."""
    try:
        value = share(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"precision must be a percentage like 1% or a fraction like 0.01, "
                                         f"got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"precision must be above 0 and below 100%, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {value}")
    return value


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value
