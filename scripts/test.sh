#!/usr/bin/env bash
# README command 2: set up (with test tools), then run the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
QSERVE_EXTRAS=gguf,triton,plot,dev . scripts/bootstrap.sh
. .venv/bin/activate

ruff check .
pytest -q "$@"
