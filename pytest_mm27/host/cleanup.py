"""What vLLM, torch, NCCL and OpenMP leave in ``/dev/shm`` and the temp folder, and removing it.

A server killed mid-run (or one that just does not clean up: TP=2 on CPU
leaves ``/dev/shm/vllm_dist_<hex>-tp:...`` behind) fills ``/dev/shm``, which
is RAM, run after run. Only what is ours is removed: files that appeared
while our servers ran, or that are named after a ``vllm_dist_<hex>`` folder
in one of our servers' own TMPDIRs, owned by this user, and no longer open
or mapped by any process (another run on the host may still use a file of
the same kind).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Snapshot", "remove_leftovers", "snapshot"]

# Not sem.*: a named semaphore is mapped under a temporary name before it is
# linked, so "not mapped" cannot be proven, and its creator unlinks it anyway.
SHM_NAME_RE = re.compile(r"^(psm_|torch_|vllm|nccl|__KMP_REGISTERED_LIB)", re.I)
TMP_GLOBS = ("vllm_dist_*",)
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class Snapshot:
    """What was there before our servers started: none of it is ever removed."""

    shm: frozenset[str]
    tmp: frozenset[str]


def snapshot() -> Snapshot:
    return Snapshot(frozenset(_listdir(SHM_DIR)), frozenset(_tmp_entries()))


def remove_leftovers(before: Snapshot, private_tmp_dirs: Sequence[Path]) -> tuple[list[str], list[str]]:
    """Remove what our servers left (see the module's docstring); (paths removed, errors)."""
    candidates: list[Path] = []
    dist_names = tuple(p.name for d in private_tmp_dirs for p in d.glob("vllm_dist_*"))
    for name in sorted(_listdir(SHM_DIR)):
        new_and_known = name not in before.shm and SHM_NAME_RE.match(name)
        if new_and_known or (dist_names and name.startswith(dist_names)):
            candidates.append(SHM_DIR / name)
    tmp = Path(tempfile.gettempdir())
    candidates += [tmp / name for name in sorted(_tmp_entries() - before.tmp)]
    candidates += [d for d in private_tmp_dirs if d.exists()]
    candidates = [p for p in candidates if _owned_by_us(p)]
    if not candidates:
        return [], []
    in_use = _paths_in_use()
    removed, errors = [], []
    for path in candidates:
        if any(u == str(path) or u.startswith(str(path) + "/") for u in in_use):
            continue            # another live process (another run) still uses it
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(str(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"cannot remove {path}: {exc.strerror or exc}")
    return removed, errors


def _listdir(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def _tmp_entries() -> set[str]:
    tmp = Path(tempfile.gettempdir())
    return {p.name for pattern in TMP_GLOBS for p in tmp.glob(pattern)}


def _owned_by_us(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.getuid()
    except OSError:
        return False


def _paths_in_use() -> set[str]:
    """Files under /dev/shm or the temp folder that live processes hold open or mapped.

    Read from /proc, not psutil: psutil's memory_maps() parses smaps (about
    ten times slower here, and far more on a GPU box whose servers map
    thousands of regions), and /dev/shm is Linux's anyway.
    """
    roots = (str(SHM_DIR) + "/", tempfile.gettempdir().rstrip("/") + "/")
    used: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        base = f"/proc/{entry}"
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{base}/fd/{fd}")
                    if target.startswith(roots):
                        used.add(target.removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            with open(f"{base}/maps", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    idx = line.find("/")
                    if idx >= 0:
                        target = line[idx:].rstrip("\n")
                        if target.startswith(roots):
                            used.add(target.removesuffix(" (deleted)"))
    return used
