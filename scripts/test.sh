#!/usr/bin/env bash
# README command 2: set up (with test tools), then run the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
QSERVE_EXTRAS=gguf,triton,plot,dev,structured . scripts/bootstrap.sh
. .venv/bin/activate

ruff check .
# AutoAWQ 0.2.9 is the independent reader in tests/quantize/test_interop_autoawq.py. --no-deps: its
# `datasets` requirement would give qserve's calibration presets a Hub fallback and change their errors.
python -m pip install -q --disable-pip-version-check --no-deps "autoawq==0.2.9"
pytest -q "$@"
