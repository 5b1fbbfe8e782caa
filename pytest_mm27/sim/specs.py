"""Hardware profiles, model specs and calibration constants: data files in, frozen objects out.

``fixtures/hardware/<name>.toml``  one GPU model and the link between GPUs;
``fixtures/models/<name>.toml``    the shape and storage format of one checkpoint;
``fixtures/sim/calibration.toml``  the few global efficiency constants that
                                   ``python -m pytest_mm27.benchmarks.calibrate`` fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..catalog.datafile import Table, read_toml
from ..errors import ConfigError
from ..catalog.paths import catalog_dirs

GIB = 1024 ** 3

# Bytes per stored parameter. NVFP4: 4-bit values plus one FP8 scale per 16.
# FP8 block-wise (128x128 FP32 scales) adds 0.02%, ignored.
BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nvfp4": 0.5625}
DTYPES = tuple(BYTES_PER_PARAM)


@dataclass(frozen=True)
class Link:
    """The network between nodes: one message's latency and one node's bandwidth (all its NICs)."""

    kind: str
    latency_us: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    memory_gib: float
    memory_bandwidth_gbs: float
    tflops: dict[str, float]            # dense tensor-core peak per weight format
    interconnect: str                   # "pcie" | "nvlink"
    allreduce_latency_us: float         # one all-reduce call, small message
    allreduce_bandwidth_gbs: float      # effective bus bandwidth of a large all-reduce
    network: Link | None = None         # between nodes of such GPUs ([network]); None: one node only

    def tflops_for(self, dtype: str) -> float:
        # No native FP4 (Hopper): NVFP4 weights are dequantized and run at FP8's rate.
        for key in (dtype, "fp8", "bf16"):
            if key in self.tflops:
                return self.tflops[key]
        raise ConfigError(f"hardware profile {self.name!r} has no tflops entry for {dtype!r}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    quantization: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int                    # 0 = dense model
    experts_per_token: int
    expert_intermediate_size: int
    dense_intermediate_size: int        # dense MLP (or shared expert) per layer
    max_position_embeddings: int
    weights_gb: float                   # checkpoint size: what each GPU must hold, / TP
    expert_dtype: str                   # storage format of the MLP / expert weights
    attention_dtype: str
    kv_cache_dtype: str
    # "trained": a trained checkpoint's router, skewed toward hot experts (the
    # calibration's routing_skew); "random": dummy weights route uniformly.
    router: str = "trained"
    # GPU kernels one decoder layer launches outside the all-reduces; None:
    # derived from the layer type (see layer_kernels).
    kernels_per_layer: int | None = None

    # --- parameter counts (per layer unless named otherwise) ---
    @property
    def attention_params(self) -> int:
        q = self.num_attention_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    @property
    def expert_params(self) -> int:
        """One SwiGLU expert: gate, up and down projections."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_gemm_bytes(self) -> list[float]:
        """Bytes each dense weight GEMM of one layer reads (whole layer, before TP).

        Attention: QKV and O; a dense MLP: gate/up and down. A MoE layer's
        grouped GEMMs read a batch-dependent set of experts and count as plain
        kernels here (their reads are the weights term).
        """
        q = self.num_attention_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        a = BYTES_PER_PARAM[self.attention_dtype]
        out = [self.hidden_size * (q + 2 * kv) * a, q * self.hidden_size * a]
        if self.dense_intermediate_size and not self.is_moe:
            e = BYTES_PER_PARAM[self.expert_dtype]
            out += [2 * self.hidden_size * self.dense_intermediate_size * e,
                    self.hidden_size * self.dense_intermediate_size * e]
        return out

    @property
    def layer_kernels(self) -> int:
        """Kernels per decoder layer, counted from vLLM's Llama and fused-MoE layers.

        Dense: RMSNorm, QKV GEMM, RoPE, KV-cache write, attention, O GEMM,
        fused add+RMSNorm, gate/up GEMM, SiLU-mul, down GEMM = 10. A MoE layer
        swaps the MLP's 3 for router GEMM, top-k softmax, align/sort, two
        activation quantizations, two grouped GEMMs, activation, permute back and
        reduce = 9, so 16 with the attention half.
        """
        if self.kernels_per_layer is not None:
            return self.kernels_per_layer
        return 16 if self.is_moe else 10

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through (lm_head included)."""
        per_layer = self.attention_params + self.dense_mlp_params + self.router_params
        per_layer += self.experts_per_token * self.expert_params
        return self.num_layers * per_layer + self.lm_head_params

    @property
    def total_params(self) -> int:
        per_layer = (self.attention_params + self.dense_mlp_params + self.router_params
                     + self.num_experts * self.expert_params)
        return self.num_layers * per_layer + 2 * self.lm_head_params

    def kv_bytes_per_token(self, tp: int = 1) -> float:
        """K and V of every layer for one token, on one GPU of a TP group.

        KV heads are split over the TP ranks; with fewer KV heads than ranks
        each rank keeps a replica of one head (as vLLM does).
        """
        heads = max(1.0, self.num_kv_heads / tp)
        return self.num_layers * 2 * heads * self.head_dim * BYTES_PER_PARAM[self.kv_cache_dtype]


@dataclass(frozen=True)
class Calibration:
    """Global efficiency constants; the same for every topology and workload."""

    bandwidth_efficiency: float = 0.8        # achieved / spec memory bandwidth, weight and KV streams
    nvfp4_bandwidth_factor: float = 1.0      # extra slowdown of NVFP4 grouped-GEMM reads (kernel quality)
    compute_efficiency: float = 0.5          # achieved / peak tensor FLOPs
    step_overhead_ms: float = 1.5            # per step, host side: scheduling, input prep, sampling, sync
    kernel_graph_us: float = 3.0             # per kernel replayed in a CUDA graph (launch gap + small-kernel floor)
    kernel_eager_us: float = 6.0             # per kernel launched eagerly (steps over cudagraph_max_tokens)
    cudagraph_max_tokens: int = 512          # vLLM's largest captured batch (max_cudagraph_capture_size)
    api_token_us: float = 0.0                # API server CPU per streamed output token (one process)
    api_request_us: float = 0.0              # API server CPU per request: parse, tokenize, finish
    per_seq_overhead_us: float = 10.0        # per scheduled sequence per step: input prep, output handling
    allreduce_bandwidth_efficiency: float = 1.0   # achieved / profile all-reduce bus bandwidth
    allreduce_latency_factor: float = 1.0         # achieved / profile all-reduce call latency
    routing_skew: float = 0.0                # Zipf exponent of expert popularity (0 = uniform routing)
    runtime_reserve_gib: float = 4.0         # per GPU: activations, CUDA graphs, NCCL buffers
    ingest_latency_ms: float = 1.0           # request arrival -> visible to the scheduler
    max_num_batched_tokens: int = 8192       # vLLM V1 default on >=70 GiB GPUs (chunked prefill)
    block_size: int = 16                     # KV-cache block, tokens

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dtype(t: Table, key: str, default: str | None = None) -> str:
    if default is None:
        return t.string(key, choices=DTYPES)
    return t.string(key, default, choices=DTYPES)


def parse_hardware(path: Path) -> HardwareProfile:
    t = Table(read_toml(path), path)
    fl = t.table("tflops")
    tflops = {}
    for dtype in DTYPES:
        if fl.has(dtype):
            tflops[dtype] = fl.number(dtype, minimum=0.0, exclusive_min=True)
    fl.finish()
    ic = t.table("interconnect")
    hw = HardwareProfile(
        name=t.string("name"),
        description=t.string("description", ""),
        memory_gib=t.number("memory_gib", minimum=0.0, exclusive_min=True),
        memory_bandwidth_gbs=t.number("memory_bandwidth_gbs", minimum=0.0, exclusive_min=True),
        tflops=tflops,
        interconnect=ic.string("kind", choices=("pcie", "nvlink")),
        allreduce_latency_us=ic.number("allreduce_latency_us", minimum=0.0),
        allreduce_bandwidth_gbs=ic.number("allreduce_bandwidth_gbs", minimum=0.0, exclusive_min=True),
    )
    ic.finish()
    if t.has("network"):
        net = t.table("network")
        hw = replace(hw, network=Link(
            kind=net.string("kind"),
            latency_us=net.number("latency_us", minimum=0.0),
            bandwidth_gbs=net.number("bandwidth_gbs", minimum=0.0, exclusive_min=True)))
        net.finish()
    t.finish()
    return hw


def parse_model(path: Path) -> ModelSpec:
    t = Table(read_toml(path), path)
    spec = ModelSpec(
        name=t.string("name"),
        hf_id=t.string("hf_id", ""),
        quantization=t.string("quantization", "bf16"),
        num_layers=t.integer("num_layers"),
        hidden_size=t.integer("hidden_size"),
        vocab_size=t.integer("vocab_size"),
        num_attention_heads=t.integer("num_attention_heads"),
        num_kv_heads=t.integer("num_kv_heads"),
        head_dim=t.integer("head_dim"),
        num_experts=t.integer("num_experts", 0, minimum=0),
        experts_per_token=t.integer("experts_per_token", 0, minimum=0),
        expert_intermediate_size=t.integer("expert_intermediate_size", 0, minimum=0),
        dense_intermediate_size=t.integer("dense_intermediate_size", 0, minimum=0),
        max_position_embeddings=t.integer("max_position_embeddings"),
        weights_gb=t.number("weights_gb", minimum=0.0, exclusive_min=True),
        expert_dtype=_dtype(t, "expert_dtype", "bf16"),
        attention_dtype=_dtype(t, "attention_dtype", "bf16"),
        kv_cache_dtype=_dtype(t, "kv_cache_dtype", "bf16"),
        router=t.string("router", "trained", choices=("trained", "random")),
        kernels_per_layer=t.integer("kernels_per_layer", None, minimum=1),
    )
    t.finish()
    if spec.num_experts and not 0 < spec.experts_per_token <= spec.num_experts:
        raise ConfigError("experts_per_token must be between 1 and num_experts", source=str(path),
                          field="experts_per_token")
    return spec


def parse_calibration(path: Path) -> Calibration:
    t = Table(read_toml(path), path)
    for table in ("fit_error", "point_error", "tpot_error", "error_estimate"):
        t.raw(table, {})        # errors written with the fit (fit_errors, error_estimate); not constants
    values: dict[str, Any] = {}
    for f in fields(Calibration):
        if not t.has(f.name):
            continue
        if f.type == "int":
            values[f.name] = t.integer(f.name)
        else:
            values[f.name] = t.number(f.name, minimum=0.0)
    t.finish()
    return Calibration(**values)


def _find(kind: str, name: str, extra: list[Path] | None) -> Path:
    searched = catalog_dirs(kind, extra)
    for folder in searched:
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    known = sorted({p.stem for folder in searched for p in folder.glob("*.toml")})
    raise ConfigError(f"no {kind} file {name}.toml (known: {', '.join(known) or 'none'}; "
                      f"searched {', '.join(map(str, searched)) or 'nothing'})")


def load_hardware(name: str, extra: list[Path] | None = None) -> HardwareProfile:
    return parse_hardware(_find("hardware", name, extra))


def load_model(name: str, extra: list[Path] | None = None) -> ModelSpec:
    return parse_model(_find("models", name, extra))


def fit_errors(extra: list[Path] | None = None) -> dict[tuple[str, int], float]:
    """(topology, concurrency) -> predicted / published - 1 at the published points."""
    for folder in catalog_dirs("sim", extra):
        path = folder / "calibration.toml"
        if path.is_file():
            table = read_toml(path).get("fit_error", {})
            out: dict[tuple[str, int], float] = {}
            for key, err in table.items():
                name, _, c = key.rpartition(".")
                if name and c.isdigit() and isinstance(err, (int, float)):
                    out[(name, int(c))] = float(err)
            return out
    return {}


def error_estimate(extra: list[Path] | None = None) -> dict[str, float]:
    """Metric -> relative error a prediction carries (calibration.toml [error_estimate],
    measured on cases the fit never saw); empty when no validation has been written."""
    for folder in catalog_dirs("sim", extra):
        path = folder / "calibration.toml"
        if path.is_file():
            table = read_toml(path).get("error_estimate", {})
            return {k: float(v) for k, v in table.items() if isinstance(v, (int, float))}
    return {}


def load_calibration(extra: list[Path] | None = None) -> Calibration:
    for folder in catalog_dirs("sim", extra):
        path = folder / "calibration.toml"
        if path.is_file():
            return parse_calibration(path)
    return Calibration()
