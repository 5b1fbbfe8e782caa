"""Serving topologies: what to boot, on how many GPUs, with which flags.

A topology is a TOML file in a ``topologies/`` catalog folder. Everything a
launch needs lives in the data (model, parallelism, vLLM flags, environment),
so the code stays free of any one model or box.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from .datafile import Table, read_toml
from ..errors import ConfigError
from .makers import MAKERS

DpMode = Literal["native", "replicas"]
Device = Literal["cuda", "cpu"]
DpBackend = Literal["mp", "ray"]
ENGINES = ("vllm", "sim")


@dataclass(frozen=True)
class ModelRef:
    name: str                   # what `vllm serve` loads: a hub id or a local directory
    served_name: str            # the model name clients send
    quantization: str | None    # informational; the flag itself goes in serve.args
    spec: str | None            # simulator model spec (fixtures/models/<spec>.toml)
    dtype: str | None = None
    # Generated, not downloaded: a pytest_mm27.engines.tinymodel maker ("tiny-llama").
    # Before booting vLLM the harness writes it into a cache folder and serves
    # that folder in place of ``name``.
    make: str | None = None


@dataclass(frozen=True)
class Placement:
    """Where a topology's servers go on a Ray cluster (``[placement]``); ignored by the local launcher.

    ``nodes``: how many nodes the servers are spread over (None: as few as
    fit, one replica per node while nodes last). ``gpus_per_node``: what each
    of those nodes must offer; checked against the cluster before boot.
    ``resource``: the Ray resource a server's devices are counted in ("GPU";
    a custom name for clusters that label their accelerators otherwise).
    ``dp_backend``: native DP over several nodes through vLLM's own
    mechanisms: "mp" runs a head (``--data-parallel-size-local`` ranks and
    the API) on the first node and ``--headless`` ranks on the others; "ray"
    runs one command on the head with ``--data-parallel-backend ray``.
    ``executor``: "ray" gives each server vLLM's ``--distributed-executor-backend
    ray``, so its TP x PP workers may span nodes (a model too large for one);
    Ray then places them and the server itself holds no devices.
    """

    nodes: int | None = None
    gpus_per_node: int | None = None
    resource: str = "GPU"
    dp_backend: DpBackend = "mp"
    executor: DpBackend = "mp"


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    source: Path
    hardware: str               # hardware profile: picks floors, baselines and sim specs
    model: ModelRef
    tensor_parallel: int
    data_parallel: int
    dp_mode: DpMode
    gpus: int
    max_num_seqs: int
    gpu_memory_utilization: float
    max_model_len: int
    vllm_args: tuple[str, ...]
    env: Mapping[str, str]
    concurrency_levels: tuple[int, ...]
    startup_timeout_s: float
    engines: tuple[str, ...] = ENGINES
    # What the vllm engine partitions between servers: GPUs (CUDA_VISIBLE_DEVICES)
    # or, for vLLM's CPU build, CPU cores (VLLM_CPU_OMP_THREADS_BIND).
    device: Device = "cuda"
    # Per-engine extras: e.g. [engine.vllm] env for a CPU build.
    engine_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # The workload this topology is sized for, used when the user names none:
    # a small model's floors and baselines only mean something with its own shape.
    workload: str = "default"
    # vLLM's front-end processes (--api-server-count); None leaves vLLM's default.
    # One API server saturates a core before a small model saturates a GPU.
    api_server_count: int | None = None
    # Nodes and GPUs per node on a Ray cluster (--ray-address); None: the defaults.
    placement: Placement | None = None
    # Pipeline stages per server (vLLM's --pipeline-parallel-size); each holds tensor_parallel GPUs.
    pipeline_parallel: int = 1

    @property
    def replicas(self) -> int:
        """Server processes to start: one per DP rank in replica mode, else one."""
        return self.data_parallel if self.dp_mode == "replicas" else 1

    @property
    def gpus_per_server(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * (1 if self.dp_mode == "replicas" else self.data_parallel)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["model"] = asdict(self.model)
        data["source"] = str(self.source)
        data["env"] = dict(self.env)
        data["engine_env"] = {k: dict(v) for k, v in self.engine_env.items()}
        data["vllm_args"] = list(self.vllm_args)
        data["concurrency_levels"] = list(self.concurrency_levels)
        data["engines"] = list(self.engines)
        data["placement"] = asdict(self.placement) if self.placement else None
        return data


def parse_topology(path: Path) -> Topology:
    """Load and validate one topology file."""
    root = Table(read_toml(path), path)
    name = root.string("name", path.stem)
    description = root.string("description", "")
    hardware = root.string("hardware")
    engines = root.str_list("engines", ENGINES)
    for engine in engines:
        if engine not in ENGINES:
            raise root.error("engines", f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    device = root.string("device", "cuda", choices=("cuda", "cpu"))
    levels = root.int_list("concurrency_levels")
    startup_timeout_s = root.number("startup_timeout_s", 600.0, minimum=0.0, exclusive_min=True)
    workload = root.string("workload", "default")

    model_t = root.table("model")
    make = model_t.string("make", None)
    if make is not None and make not in MAKERS:
        raise model_t.error("make", f"unknown model maker {make!r} (known: {', '.join(sorted(MAKERS))})")
    model_name = model_t.string("name", make) if make else model_t.string("name")
    model = ModelRef(
        name=model_name,
        served_name=model_t.string("served_name", None) or model_name,
        quantization=model_t.string("quantization", None),
        spec=model_t.string("spec", None),
        dtype=model_t.string("dtype", None),
        make=make,
    )
    model_t.finish()

    par = root.table("parallel")
    tp = par.integer("tensor")
    dp = par.integer("data", 1)
    mode = par.string("mode", "native", choices=("native", "replicas"))
    pp = par.integer("pipeline", 1)
    gpus = par.integer("gpus", tp * pp * dp, minimum=0)
    par.finish()
    if gpus and gpus != tp * pp * dp:
        what = "tensor x pipeline x data" if pp > 1 else "tensor x data"
        raise ConfigError(f"must equal {what} = {tp * pp * dp}, got {gpus}",
                          source=str(path), field="parallel.gpus")

    serve = root.table("serve")
    max_num_seqs = serve.integer("max_num_seqs", 256)
    gpu_mem = serve.number("gpu_memory_utilization", 0.9, minimum=0.0, maximum=1.0, exclusive_min=True)
    max_model_len = serve.integer("max_model_len")
    args = serve.str_list("args", ())
    env = serve.str_map("env")
    api_server_count = serve.integer("api_server_count", None)
    serve.finish()

    placement = _parse_placement(root.table("placement"), path, tp * pp, dp, mode) if root.has("placement") else None

    engine_env: dict[str, Mapping[str, str]] = {}
    if root.has("engine"):
        engine_t = root.table("engine")
        for engine in ENGINES:
            if engine_t.has(engine):
                sub = engine_t.table(engine)
                engine_env[engine] = MappingProxyType(sub.str_map("env"))
                sub.finish()
        engine_t.finish()
    root.finish()

    if "sim" in engines and not model.spec:
        raise ConfigError("is required when the topology runs on the sim engine",
                          source=str(path), field="model.spec")
    return Topology(
        name=name, description=description, source=path, hardware=hardware, model=model,
        tensor_parallel=tp, data_parallel=dp, dp_mode=mode, gpus=tp * pp * dp, pipeline_parallel=pp,
        max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_mem, max_model_len=max_model_len,
        vllm_args=args, env=MappingProxyType(env), concurrency_levels=levels,
        startup_timeout_s=startup_timeout_s, engines=engines, device=device, engine_env=MappingProxyType(engine_env),
        workload=workload, api_server_count=api_server_count, placement=placement,
    )


def _parse_placement(table: Table, path: Path, tp: int, dp: int, mode: str) -> Placement:
    """``[placement]``, checked against the parallelism (``tp``: a server's TP x PP GPUs per DP rank):
    a replica's GPUs must fit one node unless Ray's executor spreads them."""
    placement = Placement(
        nodes=table.integer("nodes", None),
        gpus_per_node=table.integer("gpus_per_node", None),
        resource=table.string("resource", "GPU"),
        dp_backend=table.string("dp_backend", "mp", choices=("mp", "ray")),
        executor=table.string("executor", "mp", choices=("mp", "ray")),
    )
    table.finish()
    servers = dp if mode == "replicas" else 1
    if placement.nodes is not None and mode == "replicas" and placement.nodes > servers:
        raise ConfigError(f"{placement.nodes} nodes for {servers} replica server(s): a node would stay empty",
                          source=str(path), field="placement.nodes")
    if mode == "native" and placement.nodes and placement.dp_backend == "mp" and dp % placement.nodes:
        raise ConfigError(f"native DP over {placement.nodes} nodes runs dp / nodes ranks on each; "
                          f"{dp} ranks do not divide evenly", source=str(path), field="placement.nodes")
    if placement.gpus_per_node is not None:
        if mode == "replicas" and placement.executor == "mp" and tp > placement.gpus_per_node:
            raise ConfigError(f"a replica's {tp} GPUs must sit on one node (executor = \"ray\" lets them span), "
                              f"which has only {placement.gpus_per_node}", source=str(path),
                              field="placement.gpus_per_node")
        if placement.nodes is not None and placement.nodes * placement.gpus_per_node < tp * dp:
            raise ConfigError(f"{placement.nodes} node(s) x {placement.gpus_per_node} GPU(s) hold fewer than "
                              f"the topology's {tp * dp} GPUs", source=str(path),
                              field="placement")
    return placement


class UnknownName(ConfigError):
    pass


@dataclass(frozen=True)
class Catalog:
    """Named items loaded from catalog folders (topologies or workloads)."""

    kind: str
    items: Mapping[str, Any]

    def names(self) -> list[str]:
        return sorted(self.items)

    def get(self, name: str) -> Any:
        try:
            return self.items[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {known}") from None

    def select(self, names: Iterable[str]) -> list[Any]:
        """Resolve user-given names; ``all`` means every item, in name order."""
        wanted = list(names)
        if "all" in wanted:
            return [self.items[n] for n in self.names()]
        return [self.get(n) for n in dict.fromkeys(wanted)]


def load_catalog_files(kind: str, dirs: Sequence[Path], parse: Any) -> Catalog:
    """Parse every ``*.toml`` in ``dirs``; earlier folders shadow later ones."""
    items: dict[str, Any] = {}
    for folder in dirs:
        if not folder.is_dir():
            raise ConfigError(f"{kind} folder does not exist", source=str(folder))
        in_this_folder: dict[str, Path] = {}
        for path in sorted(folder.glob("*.toml")):
            item = parse(path)
            if item.name in in_this_folder:
                raise ConfigError(f"{kind} name {item.name!r} is also defined in {in_this_folder[item.name]}",
                                  source=str(path), field="name")
            in_this_folder[item.name] = path
            items.setdefault(item.name, item)
    return Catalog(kind, MappingProxyType(items))


def load_catalog(dirs: Sequence[Path]) -> Catalog:
    """The topologies found in ``dirs`` (``topologies/`` folders)."""
    return load_catalog_files("topology", dirs, parse_topology)
