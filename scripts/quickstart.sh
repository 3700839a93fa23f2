#!/usr/bin/env bash
# README command 1: set up, then run the main job on the embedded SmolLM2-135M:
# pull -> quantize (AWQ w4 g64) -> validate -> perplexity before/after -> serve -> a chat request
# from the official `openai` client.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
QSERVE_EXTRAS=gguf,triton,plot,dev . scripts/bootstrap.sh
. .venv/bin/activate

RECIPE=${RECIPE:-recipes/smollm2-135m-awq.yaml}
CKPT=${QSERVE_RUNS:-runs}/$(basename "$RECIPE" .yaml)
PORT=${PORT:-8000}

qserve pull smollm2-135m
# A failed quality gate still leaves a valid checkpoint: report it, then serve it anyway.
qserve run "$RECIPE" "$@" || { [ -f "$CKPT/config.json" ] && echo "qserve run: a gate or stage failed; see $CKPT.report/run_report.md" >&2; } || exit 1

qserve serve "$CKPT" --port "$PORT" --max-model-len 2048 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -fs "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited" >&2; exit 1; }
  sleep 1
done
python - "$PORT" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
model = client.models.list().data[0].id
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=32,
    temperature=0,
)
print(f"[{model}] {reply.choices[0].message.content}")
PY
