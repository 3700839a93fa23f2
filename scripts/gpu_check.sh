#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: set up (scripts/bootstrap.sh, with the test tools),
# then compile check for this GPU's arch, the gpu-marked tests, bench/gpu_kernels.py and engine throughput
# (SmolLM2-135M fp16 and AWQ, CUDA graphs on and off) and the fused MoE stage; prints one table, writes one JSON
# (bench/results/gpu_check.json; --out elsewhere). Arguments go to scripts/gpu_check.py
# (--skip compile,tests,kernels,quantize,engine,structured,moe,tp; --num-prompts N; --max-tokens N;
# --tp-format fp16|gptq). The tp stage (TP=2 vs TP=1 decode, Llama-3-8B shapes) needs 2 GPUs, else it is skipped.
# Exit 0: every stage passed; 1: a stage failed (see the table and runs/gpu-check/*.log); 2: no GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Refuse before installing anything: this script only means something on a GPU.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no device); run it on a machine" \
       "with an NVIDIA GPU. Without one: python -m qserve.kernels.compile_check checks the kernels" \
       "and ./scripts/test.sh runs the suite on CPU." >&2
  exit 2
fi

QSERVE_EXTRAS=${QSERVE_EXTRAS:-gguf,triton,plot,dev} . scripts/bootstrap.sh
. "${QSERVE_VENV:-.venv}/bin/activate"
python scripts/gpu_check.py "$@"
