#!/usr/bin/env bash
# README command 1: set up, then run the main job on the embedded SmolLM2-135M.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
. .venv/bin/activate

qserve pull smollm2-135m
qserve eval ppl smollm2-135m --seqlen 2048 --max-windows 16
