"""Reading TOML data files with errors that name the file and the field.

Every catalog file (topologies, workloads, floors, hardware, models) goes
through :class:`Table`, so a wrong type, a missing key or an unknown key is
reported the same way everywhere: ``path: field 'parallel.tensor': ...``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

_MISSING = object()


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(path)) from None


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)


class Table:
    """A TOML table being validated; remembers which keys were read."""

    def __init__(self, data: Mapping[str, Any], source: Path | str, prefix: str = ""):
        self._data = data
        self.source = str(source)
        self._prefix = prefix
        self._read: set[str] = set()

    def _field(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=self._field(key))

    def has(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, default: object) -> object:
        self._read.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise self.error(key, "is required")
        return default

    def raw(self, key: str, default: object = _MISSING) -> Any:
        """The value as parsed, for shapes the typed getters do not cover."""
        return self._get(key, default)

    def string(self, key: str, default: object = _MISSING, *, choices: Iterable[str] | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {_type_name(value)} {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(sorted(choices))}; got {value!r}")
        return value

    def integer(self, key: str, default: object = _MISSING, *, minimum: int | None = 1) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: object = _MISSING, *, minimum: float | None = None,
              maximum: float | None = None, exclusive_min: bool = False) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
            raise self.error(key, f"must be {'greater than' if exclusive_min else 'at least'} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def boolean(self, key: str, default: object = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_type_name(value)} {value!r}")
        return value

    def str_list(self, key: str, default: object = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be an array of strings, got {value!r}")
        return tuple(value)

    def int_list(self, key: str, default: object = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not value:
            raise self.error(key, f"must be a non-empty array of positive integers, got {value!r}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise self.error(key, f"must hold positive integers only, got {item!r}")
        if len(set(value)) != len(value):
            raise self.error(key, f"has duplicate values: {value!r}")
        return tuple(sorted(value))

    def str_map(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table of strings, got {_type_name(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                raise self.error(f"{key}.{k}", f"must be a string, got {_type_name(v)} {v!r}")
            out[k] = v
        return out

    def table(self, key: str, *, required: bool = True) -> "Table":
        value = self._get(key, _MISSING if required else {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {_type_name(value)}")
        return Table(value, self.source, prefix=f"{self._field(key)}.")

    def finish(self) -> None:
        """Reject keys nobody read: a typo must not be silently ignored."""
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise self.error(unknown[0], f"unknown key (known keys: {', '.join(sorted(self._read))})")
