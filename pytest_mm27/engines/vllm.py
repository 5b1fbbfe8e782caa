"""The real engine: ``vllm serve`` per server.

Native DP is one server started with ``--data-parallel-size N`` on all
TP x DP GPUs; replica mode is N servers on disjoint GPU sets. Which GPUs a
server sees is set with ``CUDA_VISIBLE_DEVICES`` (physical indices, with
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so they match ``nvidia-smi``); vLLM's CPU
build gets its cores through ``VLLM_CPU_OMP_THREADS_BIND`` instead.
Box-specific flags and variables (NCCL_P2P_DISABLE, custom all-reduce) come
from the topology data, never from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from ..errors import ConfigError, LaunchError
from ..catalog.topology import Topology
from ..host.plan import LaunchPlan, ServerSpec, make_base_url
from .base import (
    DeviceKind,
    EngineOptions,
    check_devices,
    check_ports,
    frozen_env,
    server_name,
    spread_native_dp,
    startup_timeout,
)

VERSION_TIMEOUT_S = 180.0       # `vllm --version` imports torch; slow on a cold cache
MAKE_MODEL_TIMEOUT_S = 300.0
# So the vLLM interpreter imports this very checkout's tinymodel.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_VERSION_RE = re.compile(r"\b(\d+\.\d+(?:\.\d+)?(?:[.+\-][0-9A-Za-z.+\-]*)?)\b")

_version_cache: dict[tuple[str, ...], str] = {}
_version_error: dict[tuple[str, ...], str] = {}
_found_cache: dict[tuple[str, ...], tuple[bool, str]] = {}


def find_command(command: Sequence[str]) -> tuple[bool, str]:
    """Whether the vLLM command can run here, and why not (cached)."""
    key = tuple(command)
    if key in _found_cache:
        return _found_cache[key]
    if not key:
        result = (False, "the vLLM command is empty")
    else:
        exe = key[0]
        path = exe if os.sep in exe else shutil.which(exe)
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            where = "does not exist or is not executable" if os.sep in exe else "is not on PATH"
            result = (False, f"vLLM not found: {exe!r} {where}")
        elif len(key) >= 3 and key[1] == "-m":
            # `python -m vllm...`: the interpreter exists; does it have vllm?
            package = key[2].split(".")[0]
            probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({package!r}) else 1)"
            try:
                rc = subprocess.run([path, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=60).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                rc, package = 1, f"{package} ({exc})"
            result = (True, path) if rc == 0 else (False, f"vLLM not found: {path} cannot import {package}")
        else:
            result = (True, path)
    _found_cache[key] = result
    return result


def parse_version(output: str) -> str | None:
    """The version from ``vllm --version`` output (log lines may come first)."""
    for line in reversed([ln.strip() for ln in output.splitlines() if ln.strip()]):
        match = _VERSION_RE.search(line)
        if match:
            return match.group(1)
    return None


def format_cores(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the syntax VLLM_CPU_OMP_THREADS_BIND takes)."""
    parts: list[str] = []
    ordered = sorted(cores)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def cpu_bind(cores: Sequence[int], ranks: int) -> str:
    """Split a server's cores evenly between its ranks, ``|`` between ranks."""
    per = len(cores) // ranks
    return "|".join(format_cores(cores[r * per:(r + 1) * per]) for r in range(ranks))


def vllm_python(command: Sequence[str]) -> str:
    """The Python interpreter of the environment vLLM's CLI runs in.

    ``python -m vllm...`` -> that python; ``.../bin/vllm`` -> ``.../bin/python``
    next to it (a venv's console script), else the script's ``#!`` line.
    """
    if not command:
        raise ConfigError("the vLLM command is empty", field="--vllm")
    exe = command[0]
    path = exe if os.sep in exe else shutil.which(exe)
    if not path:
        raise ConfigError(f"cannot find the vLLM command {exe!r} on PATH", field="--vllm")
    if len(command) >= 3 and command[1] == "-m":
        return path
    folder = Path(path).parent          # not resolved: a venv's python is a symlink out of it
    for name in ("python", "python3"):
        if os.access(folder / name, os.X_OK):
            return str(folder / name)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(path, "rb") as fh:
            first = fh.readline(512).decode()
        if first.startswith("#!"):
            interpreter = first[2:].strip().split()[0]
            if os.access(interpreter, os.X_OK):
                return interpreter
    raise ConfigError(f"cannot tell which Python runs {path} (no python next to it, no #! line); "
                      f"pass --vllm '/path/to/python -m vllm.entrypoints.cli.main'", field="--vllm")


def model_cache_dir() -> Path:
    """Where generated models live: $MM27_MODEL_CACHE, else the user cache folder."""
    if os.environ.get("MM27_MODEL_CACHE"):
        return Path(os.environ["MM27_MODEL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pytest-mm27" / "models"


def provision_model(topology: Topology, vllm_command: Sequence[str], cache_dir: Path | None = None) -> Topology:
    """``topology`` with ``[model] make = ...`` generated and its folder as model.name.

    The model is written by :mod:`pytest_mm27.engines.tinymodel` with vLLM's own
    interpreter (the ``tokenizers`` library lives there, not here), once: a
    complete folder is reused, and a file lock keeps parallel runs from
    writing it twice. Topologies without ``make`` come back unchanged.
    """
    from . import tinymodel

    make = topology.model.make
    if not make:
        return topology
    spec = tinymodel.MAKERS[make]
    folder = Path(cache_dir or model_cache_dir()) / make
    if not tinymodel.is_complete(folder, spec):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(folder.parent / f".{make}.lock"):
            if not tinymodel.is_complete(folder, spec):
                _make_model(folder, make, vllm_python(vllm_command))
    return dataclasses.replace(topology, model=dataclasses.replace(topology.model, name=str(folder)))


def _make_model(folder: Path, make: str, python: str) -> None:
    argv = [python, "-m", "pytest_mm27.engines.tinymodel", str(folder), "--maker", make]
    pythonpath = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=MAKE_MODEL_TIMEOUT_S, env={**os.environ, "PYTHONPATH": pythonpath})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"could not generate the model in {folder}: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise LaunchError(f"could not generate the model in {folder} (exit code {proc.returncode}): "
                          f"{' '.join(argv)}\n{tail}")


class VllmEngine:
    name = "vllm"

    def available(self, options: EngineOptions, topology: Topology | None = None) -> tuple[bool, str]:
        """(True, "vllm X found, N GPUs visible") or (False, the reason it cannot run)."""
        found, detail = find_command(options.vllm_command)
        if not found:
            return False, detail
        if topology is not None and "vllm" not in topology.engines:
            return False, f"topology {topology.name!r} does not run on vllm (engines = {list(topology.engines)})"
        version = self.version(options)
        key = tuple(options.vllm_command)
        if key in _version_error:
            return False, _version_error[key]
        if topology is not None and topology.device == "cpu":
            cores = len(os.sched_getaffinity(0))
            if cores < topology.gpus:
                return False, (f"vllm {version} found, but only {cores} CPU core(s) are usable; "
                               f"topology {topology.name!r} needs {topology.gpus}")
            return True, f"vllm {version} found, CPU device, {cores} core(s) usable"
        from ..host.gpus import discover_gpus

        count = len(discover_gpus())
        if topology is not None and count < topology.gpus:
            have = "no GPUs are visible" if count == 0 else f"only {count} GPU(s) are visible"
            return False, f"vllm {version} found, but {have}; topology {topology.name!r} needs {topology.gpus}"
        return True, f"vllm {version} found, {count} GPU(s) visible"

    def version(self, options: EngineOptions) -> str:
        """``vllm --version``, cached per command; "unknown" when it fails."""
        key = tuple(options.vllm_command)
        if key not in _version_cache:
            version = None
            try:
                proc = subprocess.run([*key, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, timeout=VERSION_TIMEOUT_S)
                if proc.returncode == 0:
                    version = parse_version(proc.stdout) or parse_version(proc.stderr)
                else:
                    # Found but broken (an import error, a missing dist): say how.
                    tail = "\n  ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
                    _version_error[key] = (f"vLLM is not runnable: `{' '.join(key)} --version` exited with code "
                                           f"{proc.returncode}:\n  {tail}")
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                _version_error[key] = f"vLLM is not runnable: `{' '.join(key)} --version` failed: {exc}"
            _version_cache[key] = version or "unknown"
        return _version_cache[key]

    def prepare(self, topology: Topology, options: EngineOptions) -> Topology:
        """Provision what the topology needs before it can boot (a generated model)."""
        return provision_model(topology, options.vllm_command)

    def device_kind(self, topology: Topology) -> DeviceKind:
        return "cpu" if topology.device == "cpu" else "gpu"

    def devices_needed(self, topology: Topology) -> int:
        return topology.gpus

    def known_error(self, topology: Topology, concurrency: int) -> float | None:
        return None     # real servers: the numbers are the measurement

    def plan(self, topology: Topology, options: EngineOptions, ports: Sequence[int] = (),
             devices: Sequence[tuple[int, ...]] = ()) -> LaunchPlan:
        if "vllm" not in topology.engines:
            raise ConfigError(f"topology {topology.name!r} does not run on the vllm engine "
                              f"(engines = {list(topology.engines)})", source=str(topology.source))
        ports = check_ports(topology, self.name, ports)
        cpu = topology.device == "cpu"
        # GPUs: exactly TP (x DP) per server. CPU: each rank may own several cores.
        devices = check_devices(topology, self.name, devices, required=True, exact=not cpu)
        native_dp = topology.data_parallel if topology.dp_mode == "native" else 1
        model = topology.model
        served = model.served_name
        servers = []
        for i, (port, devs) in enumerate(zip(ports, devices, strict=True)):
            argv = [
                *options.vllm_command, "serve", model.name,
                "--host", options.host, "--port", str(port),
                "--served-model-name", served,
                "--tensor-parallel-size", str(topology.tensor_parallel),
                *(["--pipeline-parallel-size", str(topology.pipeline_parallel)] if topology.pipeline_parallel > 1
                  else []),
                "--max-num-seqs", str(topology.max_num_seqs),
                "--gpu-memory-utilization", str(topology.gpu_memory_utilization),
                "--max-model-len", str(topology.max_model_len),
                *(["--dtype", model.dtype] if model.dtype else []),
                *(["--data-parallel-size", str(native_dp)] if native_dp > 1 else []),
                *(["--api-server-count", str(topology.api_server_count)] if topology.api_server_count else []),
                *(["--api-key", options.api_key] if options.api_key else []),
                *topology.vllm_args,
            ]
            if cpu:
                device_env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_bind(devs, topology.gpus_per_server)}
            else:
                device_env = {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devs)}
            # Physical indices in CUDA_VISIBLE_DEVICES mean nvidia-smi's order
            # only with PCI_BUS_ID; the topology may still choose otherwise.
            order = {} if cpu else {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            env = frozen_env(order, topology.env, topology.engine_env.get("vllm"), options.extra_env, device_env)
            servers.append(ServerSpec(
                name=server_name(topology, i), argv=tuple(argv), env=env, host=options.host,
                port=port, gpus=devs, base_url=make_base_url(options.host, port), api_key=options.api_key,
                private_tmp=True,
            ))
        return spread_native_dp(LaunchPlan(
            topology=topology, engine=self.name, servers=tuple(servers),
            endpoints=tuple(s.base_url for s in servers), model=served,
            startup_timeout_s=startup_timeout(topology, options),
        ), options)
