"""Bad input is refused before anything boots, with a message naming the file and the field.

A property-based part feeds the catalog parsers generated broken files (valid
topology, workload and floor TOML with a key dropped, a wrong type or value,
an unknown key, or the text cut short); an end-to-end part runs pytest on a
few broken catalogs and options and checks that nothing started.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_mm27.gate.baseline import BaselineError, load_baseline
from pytest_mm27.errors import ConfigError
from pytest_mm27.catalog.floors import parse_floors
from pytest_mm27.catalog.topology import parse_topology
from pytest_mm27.catalog.workload import parse_workload

# --- generated broken files -------------------------------------------------------------------

TOPOLOGY = {
    "name": "t", "hardware": "rtx-pro-6000", "concurrency_levels": [1, 4], "startup_timeout_s": 60,
    "model": {"name": "org/model", "served_name": "m", "spec": "minimax-m2.7-nvfp4"},
    "parallel": {"tensor": 2, "data": 2, "mode": "replicas"},
    "serve": {"max_model_len": 4096, "max_num_seqs": 64, "gpu_memory_utilization": 0.9, "args": ["--x"]},
}
WORKLOAD = {
    "name": "w", "input_tokens": 128, "output_tokens": 32, "requests_per_concurrency": 1, "min_requests": 2,
    "warmup_requests": 0, "api": "completions", "request_timeout_s": 60, "stall_timeout_s": 5, "seed": 0,
}
FLOORS = {"floor": [{"topology": "t", "workload": "w", "concurrency": 4, "tok_s": 100.0, "note": "n"}]}

PARSERS = {"topology": (parse_topology, TOPOLOGY), "workload": (parse_workload, WORKLOAD),
           "floors": (parse_floors, FLOORS)}

Path_ = tuple[Any, ...]      # keys and list indices from the root


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def dumps(doc: dict[str, Any]) -> str:
    """Enough TOML for these documents: root scalars, [tables], [[arrays of tables]]."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += [f"[{k}]", *(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                lines += [f"[[{k}]]", *(f"{kk} = {_toml_value(vv)}" for kk, vv in item.items())]
    return "\n".join(lines) + "\n"


def leaves(doc: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every key path (tables too, not list elements of scalars)."""
    out: list[Path_] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((*prefix, k))
            out += leaves(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            if isinstance(v, dict):
                out += leaves(v, (*prefix, i))
    return out


def tables(doc: Any, prefix: Path_ = ()) -> list[Path_]:
    out: list[Path_] = [prefix] if isinstance(doc, dict) else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += tables(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += tables(v, (*prefix, i))
    return out


def dotted(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def copy_with(doc: Any, path: Path_, op: str, value: Any = None) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    if op == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


WRONG = st.one_of(st.just("x"), st.just(""), st.integers(-3, 0), st.just(7), st.just(1.5), st.booleans(),
                  st.just([]), st.just(["a"]), st.just([0]), st.just({}), st.just({"a": 1}))


def check_names_file_and_field(exc: ConfigError, path: Path) -> None:
    assert exc.source == str(path), f"{exc!r} does not name the file"
    assert str(exc).startswith(str(path)), str(exc)
    if exc.field:
        assert f"field '{exc.field}'" in str(exc)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _parse(kind: str, doc_text: str, scratch: Path) -> tuple[Path, Any]:
    parse, _ = PARSERS[kind]
    path = scratch / f"broken-{kind}.toml"
    path.write_text(doc_text)
    return path, parse


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("kind", list(PARSERS))
def test_valid_samples_parse(kind, scratch):
    path, parse = _parse(kind, dumps(PARSERS[kind][1]), scratch)
    parse(path)


@pytest.mark.parametrize("kind", list(PARSERS))
@SETTINGS
@given(data=st.data())
def test_dropped_key_or_wrong_value_names_that_field(kind, scratch, data):
    valid = PARSERS[kind][1]
    where = data.draw(st.sampled_from(leaves(valid)), label="path")
    if data.draw(st.booleans(), label="drop"):
        doc = copy_with(valid, where, "drop")
    else:
        doc = copy_with(valid, where, "set", data.draw(WRONG, label="value"))
    path, parse = _parse(kind, dumps(doc), scratch)
    try:
        parse(path)
    except ConfigError as exc:
        check_names_file_and_field(exc, path)
        # The field at fault is the one changed, or (a table dropped or replaced) one inside it.
        name = dotted(where)
        assert exc.field is not None and (exc.field == name or exc.field.startswith(name + ".")
                                          or exc.field.startswith(name + "[")
                                          or name.startswith(exc.field + ".")), (name, str(exc))


@pytest.mark.parametrize("kind", list(PARSERS))
@SETTINGS
@given(data=st.data())
def test_unknown_key_is_named(kind, scratch, data):
    valid = PARSERS[kind][1]
    table = data.draw(st.sampled_from([t for t in tables(valid) if not t or t[-1] != "env"]), label="table")
    key = "zz_" + data.draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8), label="key")
    doc = copy_with(valid, (*table, key), "set", data.draw(st.sampled_from([1, "x", True]), label="value"))
    path, parse = _parse(kind, dumps(doc), scratch)
    with pytest.raises(ConfigError) as err:
        parse(path)
    check_names_file_and_field(err.value, path)
    assert err.value.field == dotted((*table, key))
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize("kind", list(PARSERS))
@SETTINGS
@given(data=st.data())
def test_truncated_file_parses_or_names_the_file(kind, scratch, data):
    text = dumps(PARSERS[kind][1])
    cut = data.draw(st.integers(0, len(text) - 1), label="cut")
    path, parse = _parse(kind, text[:cut], scratch)
    try:
        parse(path)
    except ConfigError as exc:
        check_names_file_and_field(exc, path)
        assert exc.field is not None or "not valid TOML" in str(exc)


def test_truncated_and_other_version_baselines_name_file_and_field(tmp_path):
    good = {"schema": "pytest-mm27/run-record", "schema_version": 1,
            "hardware": {"profile": "p"}, "topology": {"name": "t"}, "workload": {"name": "w"},
            "levels": [{"concurrency": 1, "metrics": {"output_tok_s": 1.0}, "trials": []}]}
    text = json.dumps(good)
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(BaselineError, match=r"cut.json: not valid JSON \((truncated|corrupt) baseline\?\) at line 1"):
        load_baseline(cut)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**good, "schema_version": 0}))
    with pytest.raises(BaselineError, match="old.json: field 'schema_version': is 0; this harness reads version 1"):
        load_baseline(old)


# --- end to end: refused before anything boots ------------------------------------------------------

SUITE = "def test_throughput(mm27_level):\n    mm27_level.measure()\n"
TINY = """
name = "tiny"
hardware = "rtx-pro-6000"
concurrency_levels = {levels}
[model]
name = "org/model"
spec = "minimax-m2.7-nvfp4"
[parallel]
tensor = {tp}
data = {dp}
mode = "replicas"
[serve]
max_model_len = 4096
"""


def _catalog(pytester: pytest.Pytester, levels="[1, 4]", tp=1, dp=2) -> None:
    pytester.makepyfile(test_throughput=SUITE)
    for sub in ("topologies", "workloads", "floors"):
        (pytester.path / sub).mkdir(exist_ok=True)
    (pytester.path / "topologies" / "tiny.toml").write_text(TINY.format(levels=levels, tp=tp, dp=dp))


def _bad_workload(p: pytest.Pytester) -> list[str]:
    _catalog(p)
    (p.path / "workloads" / "bad.toml").write_text('input_tokens = 128\noutput_tokens = "many"\n')
    return ["--workload", "bad"]


def _bad_floor(p: pytest.Pytester) -> list[str]:
    _catalog(p)
    (p.path / "floors" / "rtx-pro-6000.toml").write_text(
        '[[floor]]\ntopology = "tiny"\nworkload = "quick"\nconcurrency = 0\ntok_s = 1.0\nnote = "n"\n')
    return []


def _bad_levels(p: pytest.Pytester) -> list[str]:
    _catalog(p, levels="[1, -4]")
    return []


def _too_many_gpus(p: pytest.Pytester) -> list[str]:
    _catalog(p, tp=4, dp=2)
    fake = p.path / "fake-vllm"
    fake.write_text("#!/bin/sh\necho 0.11.0\n")
    fake.chmod(0o755)
    return ["--engine", "vllm", "--vllm", str(fake)]


def _other_schema_baseline(p: pytest.Pytester) -> list[str]:
    _catalog(p)
    (p.path / "old.json").write_text(json.dumps({"schema": "pytest-mm27/run-record", "schema_version": 99}))
    return ["--baseline", "old.json"]


def _unknown_option_value(p: pytest.Pytester) -> list[str]:
    _catalog(p)
    return ["--sim-fault", "meltdown=1"]


E2E = {
    "workload wrong type": (_bad_workload, "*workloads/bad.toml: field 'output_tokens': must be an integer*"),
    "floor not positive": (_bad_floor, "*floors/rtx-pro-6000.toml: field 'floor[[]0].concurrency': must be at least 1*"),
    "levels not positive": (_bad_levels, "*topologies/tiny.toml: field 'concurrency_levels': must hold positive*"),
    "TP x DP > GPUs": (_too_many_gpus, "*cannot run topology 'tiny'*no GPUs are visible; topology 'tiny' needs 8*"),
    "baseline schema": (_other_schema_baseline, "*old.json: field 'schema_version': is 99; this harness reads*"),
    "unknown option value": (_unknown_option_value, "*sim fault must be NAME=VALUE with NAME one of*'meltdown=1'*"),
}


@pytest.mark.parametrize("case", list(E2E))
def test_refused_before_anything_boots(case, no_leftovers):
    pytester = no_leftovers
    make, message = E2E[case]
    args = make(pytester)
    result = pytester.runpytest_subprocess(
        "--topology-dir", "topologies", "--workload-dir", "workloads", "--floors-dir", "floors",
        "--topology", "tiny", "--workload", "quick", "--engine", "sim", "--results-dir", "results", *args,
        timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([message])
    assert not list(pytester.path.glob("results/runs/*")), "a run started"
    assert not list(pytester.path.glob("results/**/*.log"))
