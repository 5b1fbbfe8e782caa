"""Baselines: save, refuse, force, atomic writes, auto-find, mismatches, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_mm27.gate import baseline as bl
from pytest_mm27.records import store as record_mod
from pytest_mm27.gate.baseline import (
    BaselineError,
    BaselineExistsError,
    BaselineMismatchError,
    baseline_key,
    find_baseline,
    load_baseline,
    resolve_baselines,
    save_baseline,
)
from pytest_mm27.benchmarks.synthetic import make_record


def test_key_and_path_real_hardware(tmp_path: Path) -> None:
    rec = make_record(profile="rtx-pro-6000", topology="dp3", workload="default")
    path = save_baseline(rec, tmp_path)
    assert path == tmp_path / "rtx-pro-6000" / "dp3--default.json"
    saved = load_baseline(path)
    assert saved["engine"] == {"name": "vllm", "version": "0.11.0", "reason": "synthetic"}
    assert saved["baseline"]["key"] == {"profile": "rtx-pro-6000", "topology": "dp3", "workload": "default"}
    assert saved["levels"] == rec["levels"]


def test_simulated_runs_never_mix_with_real_hardware(tmp_path: Path) -> None:
    real = make_record(profile="rtx-pro-6000")
    sim = make_record(profile="rtx-pro-6000", simulated=True, engine="sim")
    assert baseline_key(sim).profile == "sim-rtx-pro-6000"
    p_real, p_sim = save_baseline(real, tmp_path), save_baseline(sim, tmp_path)
    assert p_real != p_sim and p_sim.parent.name == "sim-rtx-pro-6000"
    assert find_baseline(tmp_path, sim) == p_sim
    assert find_baseline(tmp_path, real) == p_real


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = make_record(seed=1)
    path = save_baseline(first, tmp_path)
    with pytest.raises(BaselineExistsError) as exc:
        save_baseline(make_record(seed=2), tmp_path)
    msg = str(exc.value)
    assert str(path) in msg and "--force" in msg and "--save-baseline NAME" in msg
    assert load_baseline(path)["run_id"] == "synthetic-1"   # untouched

    save_baseline(make_record(seed=2), tmp_path, force=True)
    replaced = load_baseline(path)
    assert replaced["run_id"] == "synthetic-2" and replaced["baseline"]["replaced"] is True


def test_new_name_instead_of_force(tmp_path: Path) -> None:
    save_baseline(make_record(seed=1), tmp_path)
    other = save_baseline(make_record(seed=2), tmp_path, name="after-upgrade")
    assert other == tmp_path / "rtx-pro-6000-x3" / "after-upgrade.json"
    assert find_baseline(tmp_path, make_record(), name="after-upgrade") == other
    with pytest.raises(BaselineError, match="no path separators"):
        save_baseline(make_record(), tmp_path, name="../escape")


def test_crash_mid_write_leaves_old_baseline_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_baseline(make_record(seed=1), tmp_path)
    before = path.read_bytes()
    real_dump = json.dump

    def dump_then_crash(obj, fh, **kw):
        real_dump({"schema": obj["schema"], "levels": obj["levels"][:1]}, fh, **kw)  # half a file reaches disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_mod.json, "dump", dump_then_crash)
    with pytest.raises(BaselineError, match="No space left on device"):
        save_baseline(make_record(seed=2), tmp_path, force=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_baseline(path)["run_id"] == "synthetic-1"
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary file left behind


def test_crash_at_rename_leaves_old_baseline_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_baseline(make_record(seed=1), tmp_path)
    before = path.read_bytes()

    def boom(src, dst):
        raise KeyboardInterrupt   # e.g. Ctrl-C between the write and the rename

    monkeypatch.setattr(record_mod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_baseline(make_record(seed=2), tmp_path, force=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_refuses_record_without_measured_levels(tmp_path: Path) -> None:
    rec = make_record()
    for lv in rec["levels"]:
        lv["metrics"], lv["trials"] = None, []
    with pytest.raises(BaselineError, match="no measured level"):
        save_baseline(rec, tmp_path)


def test_find_returns_none_when_absent(tmp_path: Path) -> None:
    assert find_baseline(tmp_path, make_record()) is None
    [match] = resolve_baselines("auto", tmp_path, [make_record()])
    assert match.baseline is None and "--save-baseline" in match.note


def test_resolve_auto_and_directory(tmp_path: Path) -> None:
    a = make_record(topology="dp3")
    b = make_record(topology="tp4")
    path = save_baseline(a, tmp_path)
    for spec in ("auto", tmp_path):
        ma, mb = resolve_baselines(spec, tmp_path if spec == "auto" else Path("/nonexistent"), [a, b])
        assert ma.path == path and ma.baseline is not None
        assert mb.baseline is None


def test_resolve_file_mismatch_says_what_differs(tmp_path: Path) -> None:
    path = save_baseline(make_record(profile="rtx-pro-6000", topology="dp3", workload="default"), tmp_path)
    run = make_record(profile="h100", topology="dp3", workload="long-prompts")
    with pytest.raises(BaselineMismatchError) as exc:
        resolve_baselines(path, tmp_path, [run])
    msg = str(exc.value)
    assert str(path) in msg
    assert "hardware profile 'h100' vs 'rtx-pro-6000'" in msg
    assert "workload 'long-prompts' vs 'default'" in msg
    assert "topology" not in msg.split("does not match")[1].split("(this run")[0]


def test_resolve_file_for_another_topology(tmp_path: Path) -> None:
    path = save_baseline(make_record(topology="dp3"), tmp_path)
    with pytest.raises(BaselineMismatchError, match="topology 'tp4' vs 'dp3'"):
        resolve_baselines(path, tmp_path, [make_record(topology="tp4")])
    with pytest.raises(BaselineMismatchError, match="this run measured topologies: dp2, tp4"):
        resolve_baselines(path, tmp_path, [make_record(topology="tp4"), make_record(topology="dp2")])
    # with a matching record among several, the others simply get no baseline
    m1, m2 = resolve_baselines(path, tmp_path, [make_record(topology="dp3"), make_record(topology="tp4")])
    assert m1.baseline is not None and m2.baseline is None and "dp3" in m2.note


def test_simulated_run_against_real_baseline_is_a_mismatch(tmp_path: Path) -> None:
    path = save_baseline(make_record(profile="rtx-pro-6000"), tmp_path)
    with pytest.raises(BaselineMismatchError, match="'sim-rtx-pro-6000' vs 'rtx-pro-6000'"):
        resolve_baselines(path, tmp_path, [make_record(profile="rtx-pro-6000", simulated=True)])


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_baseline(make_record(), tmp_path)


def test_truncated_json(saved: Path) -> None:
    text = saved.read_text()
    saved.write_text(text[: len(text) // 2])
    with pytest.raises(BaselineError) as exc:
        load_baseline(saved)
    assert str(saved) in str(exc.value) and "truncated" in str(exc.value) and "line" in str(exc.value)


def test_corrupt_json(saved: Path) -> None:
    saved.write_text('{"schema": "pytest-mm27/run-record", oops}')
    with pytest.raises(BaselineError, match=r"not valid JSON \(corrupt baseline\?\) at line 1"):
        load_baseline(saved)


def test_binary_garbage(saved: Path) -> None:
    saved.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BaselineError, match=str(saved)):
        load_baseline(saved)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d.update(schema="something-else"), "schema"),
    (lambda d: d["hardware"].pop("profile"), "hardware.profile"),
    (lambda d: d["topology"].update(name=""), "topology.name"),
    (lambda d: d.pop("workload"), "workload.name"),
    (lambda d: d.update(levels={}), "levels"),
    (lambda d: d["levels"][2].update(concurrency="many"), "levels[2].concurrency"),
    (lambda d: d["levels"][1].update(trials="x"), "levels[1].trials"),
    (lambda d: d["levels"][1]["trials"][2].update(output_tok_s="fast"), "levels[1].trials[2].output_tok_s"),
])
def test_schema_problems_name_file_and_field(saved: Path, mutate, field: str) -> None:
    data = json.loads(saved.read_text())
    mutate(data)
    saved.write_text(json.dumps(data))
    with pytest.raises(BaselineError) as exc:
        load_baseline(saved)
    assert exc.value.source == str(saved)
    assert exc.value.field == field
    assert f"field '{field}'" in str(exc.value)


def test_other_schema_version_message(saved: Path) -> None:
    data = json.loads(saved.read_text())
    data["schema_version"] = 2
    saved.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=r"field 'schema_version': is 2; this harness reads version 1"):
        load_baseline(saved)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="no such baseline file"):
        load_baseline(tmp_path / "nope.json")


def test_library_does_not_import_pytest() -> None:
    for mod in (bl, __import__("pytest_mm27.gate.compare", fromlist=["x"])):
        source = Path(mod.__file__).read_text()
        assert "import pytest\n" not in source and "from pytest " not in source
