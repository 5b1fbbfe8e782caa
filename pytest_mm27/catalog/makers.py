"""Model makers a topology may name (``[model] make = ...``): what each one generates.

Only the parameters live here, so the catalog can validate a topology
without importing the generator (``engines.tinymodel``), which trains a
tokenizer and writes the files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..errors import Mm27Error

Arch = Literal["llama", "qwen2moe"]
ARCHES: tuple[Arch, ...] = ("llama", "qwen2moe")


#: Bump when the files written change for the same parameters.
GENERATOR_VERSION = 1

# Special tokens take the first ids, in this order.
BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, IM_START, IM_END)
BOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2

class TinyModelError(Mm27Error):
    """The tiny model could not be made (bad parameters, missing ``tokenizers``)."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Every parameter that changes the files written."""

    arch: Arch = "llama"
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 4096
    # qwen2moe only
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 128

    def validate(self) -> None:
        if self.arch not in ARCHES:
            raise TinyModelError(f"arch must be one of {', '.join(ARCHES)}, not {self.arch!r}")
        ints = {k: v for k, v in asdict(self).items() if k != "arch"}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TinyModelError(f"{name} must be a positive int, not {value!r}")
        # 256 byte symbols plus the special tokens must fit.
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TinyModelError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}"
                f" (256 byte symbols + {len(SPECIAL_TOKENS)} special tokens), not {self.vocab_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise TinyModelError(
                f"hidden_size {self.hidden_size} is not a multiple of"
                f" num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise TinyModelError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of"
                f" num_key_value_heads {self.num_key_value_heads}"
            )
        if self.arch == "qwen2moe" and self.num_experts_per_tok > self.num_experts:
            raise TinyModelError(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_experts {self.num_experts}"
            )

    def stamp(self) -> dict[str, Any]:
        return {"generator_version": GENERATOR_VERSION, "spec": asdict(self)}


#: Names a topology may give as ``[model] make = ...``, and what each makes.
MAKERS: dict[str, TinyModelSpec] = {
    # CPU tests: boots in seconds on vLLM's CPU build.
    "tiny-llama": TinyModelSpec(arch="llama"),
    "tiny-qwen2moe": TinyModelSpec(arch="qwen2moe"),
    # GPU checks: 0.75 B parameters (16 x hidden 2048, 16 query / 8 KV heads,
    # SwiGLU 5632), big enough to load the GPU, small enough to boot in a minute.
    "small-llama": TinyModelSpec(arch="llama", hidden_size=2048, num_hidden_layers=16,
                                 num_attention_heads=16, num_key_value_heads=8, intermediate_size=5632),
    # GPU-bound checks: Llama-3.1-8B's shape (32 x hidden 4096, 32 query / 8 KV
    # heads, SwiGLU 14336; 7 B parameters, 14 GB in BF16) so the GPU, not the
    # API server, sets the pace; the small vocabulary keeps the tokenizer local.
    "llama-8b-shape": TinyModelSpec(arch="llama", vocab_size=2048, hidden_size=4096, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                    max_position_embeddings=8192),
}
