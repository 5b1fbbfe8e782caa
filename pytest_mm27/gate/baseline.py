"""Baselines: run records promoted on purpose, found again by what they measured.

A baseline is a run record (same schema, see ``record.py``) copied under
``results/baselines/<profile>/<topology>--<workload>.json`` with a
``baseline`` block saying when and from where it was promoted. The key is
hardware profile + topology + workload; a simulator run's profile is
prefixed ``sim-`` so simulated numbers never stand in for real hardware.
Engine and engine version are recorded in the file but are not part of the
key: a vLLM upgrade is exactly what a baseline should catch.

Nothing is overwritten implicitly (``force=True`` or another name), and the
write goes through ``write_json_atomic``: a crash mid-write leaves the old
baseline as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Mm27Error
from .compare import record_noise
from ..records.migrate import normalise
from ..records.model import SCHEMA, SCHEMA_VERSION, RunRecord
from ..records.store import now_iso, write_json_atomic

SIM_PREFIX = "sim-"
AUTO = "auto"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class BaselineError(ConfigError):
    """A baseline file is missing, unreadable, corrupt, or of another schema version."""


class BaselineExistsError(BaselineError):
    """Saving would replace an existing baseline without ``force``."""


class BaselineMismatchError(BaselineError):
    """The baseline measured another hardware profile, topology or workload than the run."""


@dataclass(frozen=True)
class BaselineKey:
    profile: str      # hardware profile, "sim-" prefixed for simulator runs
    topology: str
    workload: str

    def describe(self) -> str:
        return f"hardware profile {self.profile!r}, topology {self.topology!r}, workload {self.workload!r}"

    def differences(self, other: BaselineKey) -> list[str]:
        """What differs, as 'field: mine vs theirs' phrases (empty when equal)."""
        out = []
        for label, attr in (("hardware profile", "profile"), ("topology", "topology"), ("workload", "workload")):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                out.append(f"{label} {a!r} vs {b!r}")
        return out


def _get(record: Mapping[str, Any], dotted: str, source: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise BaselineError("missing", source=source, field=dotted)
        node = node[part]
    return node


def _get_str(record: Mapping[str, Any], dotted: str, source: str) -> str:
    value = _get(record, dotted, source)
    if not isinstance(value, str) or not value:
        raise BaselineError(f"must be a non-empty string, got {value!r}", source=source, field=dotted)
    return value


def baseline_key(record: RunRecord | Mapping[str, Any], source: str = "run record") -> BaselineKey:
    """The key a record is filed under. ``source`` names the record in errors."""
    if isinstance(record, RunRecord):
        record = record.to_dict()
    profile = _get_str(record, "hardware.profile", source)
    simulated = bool((record.get("hardware") or {}).get("simulated"))
    if simulated and not profile.startswith(SIM_PREFIX):
        profile = SIM_PREFIX + profile
    return BaselineKey(profile, _get_str(record, "topology.name", source), _get_str(record, "workload.name", source))


def _safe(part: str) -> str:
    """A key part as a file-name component (topology names are already tame; be safe anyway)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", part)


def check_name(name: str) -> str:
    """Validate a user-given baseline name (``--save-baseline NAME``); a trailing .json is dropped."""
    stem = name.removesuffix(".json")
    if not _NAME_RE.match(stem):
        raise BaselineError(f"baseline name {name!r} must be letters, digits, '.', '_', '+' or '-' "
                          "(no path separators)", field="--save-baseline")
    return stem


def baseline_path(root: Path, key: BaselineKey, name: str | None = None) -> Path:
    """``root/<profile>/<topology>--<workload>.json``, or ``root/<profile>/<name>.json``."""
    stem = check_name(name) if name else f"{_safe(key.topology)}--{_safe(key.workload)}"
    return Path(root) / _safe(key.profile) / f"{stem}.json"


def _measured_levels(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [lv for lv in record.get("levels") or [] if isinstance(lv, Mapping) and lv.get("metrics")]


def save_baseline(record: RunRecord | Mapping[str, Any], root: Path, *, name: str | None = None,
                  force: bool = False, source_path: Path | None = None) -> Path:
    """Promote ``record`` to a baseline; returns the file written.

    Raises ``BaselineExistsError`` when the file exists and ``force`` is false,
    and ``BaselineError`` for a record with no measured level (nothing to
    compare against later).
    """
    if isinstance(record, RunRecord):
        record = record.to_dict()
    source = str(source_path) if source_path else "run record"
    key = baseline_key(record, source)
    if not _measured_levels(record):
        raise BaselineError("has no measured level; refusing to save it as a baseline", source=source,
                            field="levels")
    path = baseline_path(root, key, name)
    if path.exists() and not force:
        old = _describe_existing(path)
        raise BaselineExistsError(
            f"baseline {path} already exists{old}; not overwriting it. Pass --force (force=True) to replace it, "
            f"or --save-baseline NAME to save under another name")
    data = dict(record)
    # The noise it measured travels with it (see compare.record_noise).
    data["noise"] = record_noise(record, (record.get("options") or {}).get("max_error_rate") or 0.0)
    data["baseline"] = {
        "saved_at": now_iso(),
        "source": str(source_path) if source_path else None,
        "name": name and check_name(name),
        "key": {"profile": key.profile, "topology": key.topology, "workload": key.workload},
        "replaced": path.exists(),
    }
    try:
        write_json_atomic(path, data)
    except OSError as exc:
        raise BaselineError(f"cannot write baseline: {exc.strerror or exc}", source=str(path)) from exc
    return path


def _describe_existing(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        saved = (data.get("baseline") or {}).get("saved_at") or data.get("created_at")
        engine = data.get("engine") or {}
        return f" (saved {saved}, engine {engine.get('name')} {engine.get('version') or ''}".rstrip() + ")"
    except (OSError, ValueError, AttributeError):
        return " (unreadable)"


# ---- loading ---------------------------------------------------------------------------------

def load_baseline(path: Path) -> dict[str, Any]:
    """Read and check a baseline file. Errors name the file and the field at fault."""
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineError("no such baseline file", source=src) from None
    except OSError as exc:
        raise BaselineError(f"cannot read baseline: {exc.strerror or exc}", source=src) from exc
    except UnicodeDecodeError as exc:
        raise BaselineError(f"not UTF-8 text (corrupt baseline?): {exc}", source=src) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "truncated" if exc.pos >= len(text.rstrip()) else "corrupt"
        raise BaselineError(f"not valid JSON ({what} baseline?) at line {exc.lineno} column {exc.colno}: "
                            f"{exc.msg}", source=src) from exc
    if not isinstance(data, dict):
        raise BaselineError(f"top level must be a JSON object, got {type(data).__name__}", source=src)
    if data.get("schema") != SCHEMA:
        raise BaselineError(f"is {data.get('schema')!r}, expected {SCHEMA!r} (not a pytest-mm27 run record)",
                            source=src, field="schema")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(f"is {data.get('schema_version')!r}; this harness reads version {SCHEMA_VERSION} "
                            "(re-save the baseline with this version)", source=src, field="schema_version")
    baseline_key(data, src)  # hardware.profile, topology.name, workload.name present
    levels = data.get("levels")
    if not isinstance(levels, list):
        raise BaselineError("must be a list", source=src, field="levels")
    for i, level in enumerate(levels):
        where = f"levels[{i}]"
        if not isinstance(level, Mapping):
            raise BaselineError("must be an object", source=src, field=where)
        conc = level.get("concurrency")
        if not isinstance(conc, int) or isinstance(conc, bool) or conc < 1:
            raise BaselineError(f"must be a positive integer, got {conc!r}", source=src, field=f"{where}.concurrency")
        metrics = level.get("metrics")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise BaselineError("must be an object or null", source=src, field=f"{where}.metrics")
        trials = level.get("trials", [])
        if not isinstance(trials, list) or not all(isinstance(t, Mapping) for t in trials):
            raise BaselineError("must be a list of metrics objects", source=src, field=f"{where}.trials")
        for j, trial in enumerate(trials or ([metrics] if metrics else [])):
            tok_s = trial.get("output_tok_s")
            if not isinstance(tok_s, (int, float)) or isinstance(tok_s, bool):
                field = f"{where}.trials[{j}].output_tok_s" if trials else f"{where}.metrics.output_tok_s"
                raise BaselineError(f"must be a number, got {tok_s!r}", source=src, field=field)
    if not _measured_levels(data):
        raise BaselineError("no level was measured in this baseline", source=src, field="levels")
    return normalise(data)


def check_match(baseline: Mapping[str, Any], record: Mapping[str, Any], baseline_source: str = "baseline") -> None:
    """Raise ``BaselineMismatchError`` unless both measured the same profile, topology and workload."""
    mine = baseline_key(record)
    theirs = baseline_key(baseline, baseline_source)
    diffs = mine.differences(theirs)
    if diffs:
        raise BaselineMismatchError(
            "does not match this run: " + "; ".join(diffs) + " (this run vs baseline). "
            "Comparing different hardware, topologies or workloads would be meaningless; "
            "pick the matching baseline or use --baseline auto", source=baseline_source)


def find_baseline(root: Path, record: Mapping[str, Any], name: str | None = None) -> Path | None:
    """The baseline file for ``record`` under ``root`` (``--baseline auto``), or None if there is none."""
    path = baseline_path(root, baseline_key(record), name)
    return path if path.is_file() else None


@dataclass
class BaselineMatch:
    """A run record and the baseline it is compared with (``baseline`` None: no baseline found).

    ``baseline`` is the file's JSON as loaded; ``reference`` the typed record of it.
    """

    record: Mapping[str, Any]
    baseline: dict[str, Any] | None
    path: Path | None
    note: str = ""

    @property
    def reference(self) -> RunRecord | None:
        return RunRecord.from_dict(self.baseline) if self.baseline is not None else None


def resolve_baselines(spec: str | Path, root: Path, records: Sequence[Mapping[str, Any]]) -> list[BaselineMatch]:
    """Pair each run record with its baseline for ``--baseline SPEC``.

    - ``auto``: look each record up under ``root``; none found is a note, not an error.
    - a directory: the same lookup under that directory.
    - a file: used for the record(s) of its topology; it is an error if its
      hardware profile or workload differs from theirs, or if no record of
      the run has its topology. Records of other topologies get no baseline.
    """
    if isinstance(spec, str) and spec == AUTO:
        return [_auto(root, rec) for rec in records]
    path = Path(spec)
    if path.is_dir():
        return [_auto(path, rec) for rec in records]
    baseline = load_baseline(path)
    theirs = baseline_key(baseline, str(path))
    matches: list[BaselineMatch] = []
    used = False
    for rec in records:
        if baseline_key(rec).topology == theirs.topology:
            check_match(baseline, rec, str(path))
            matches.append(BaselineMatch(rec, baseline, path))
            used = True
        else:
            matches.append(BaselineMatch(rec, None, None, f"baseline {path} is for topology {theirs.topology!r}"))
    if not used:
        if len(records) == 1:
            check_match(baseline, records[0], str(path))
        ran = ", ".join(sorted({baseline_key(r).topology for r in records})) or "none"
        raise BaselineMismatchError(f"is for {theirs.describe()}, but this run measured topologies: {ran}",
                                    source=str(path))
    return matches


def resolve_one(spec: str | Path, root: Path, record: Mapping[str, Any]) -> BaselineMatch:
    """The baseline of one record (a deployment a test declared): as ``resolve_baselines``
    for ``auto`` and folders; a file is used only when it is for this record's key."""
    if isinstance(spec, str) and spec == AUTO:
        return _auto(root, record)
    path = Path(spec)
    if path.is_dir():
        return _auto(path, record)
    baseline = load_baseline(path)
    theirs, mine = baseline_key(baseline, str(path)), baseline_key(record)
    if theirs != mine:
        return BaselineMatch(record, None, None, f"baseline {path} is for {theirs.describe()}")
    return BaselineMatch(record, baseline, path)


def _auto(root: Path, record: Mapping[str, Any]) -> BaselineMatch:
    key = baseline_key(record)
    path = find_baseline(root, record)
    if path is None:
        return BaselineMatch(record, None, None,
                             f"no baseline for {key.describe()} (looked for {baseline_path(root, key)}); "
                             "save one with --save-baseline")
    return BaselineMatch(record, load_baseline(path), path)


__all__ = [
    "AUTO", "SIM_PREFIX", "BaselineError", "BaselineExistsError", "BaselineKey", "BaselineMatch",
    "BaselineMismatchError", "Mm27Error", "baseline_key", "baseline_path", "check_match", "check_name",
    "find_baseline", "load_baseline", "resolve_baselines", "resolve_one", "save_baseline",
]
