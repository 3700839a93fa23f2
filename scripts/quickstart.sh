#!/usr/bin/env bash
# README command 1: set up, then run the main job on the embedded SmolLM2-135M:
# pull -> quantize (AWQ w4 g64) -> validate -> perplexity before/after -> serve -> a chat request
# from the official `openai` client. Each step prints a line (with its expected time) before it starts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS
step() { echo; echo "== [quickstart $(( (SECONDS - START) / 60 ))m$(printf '%02d' $(( (SECONDS - START) % 60 )))s] $*"; }

step "1/4 setting up .venv (first time: about 2-4 min of installs; later: ~20 s)"
QSERVE_EXTRAS=gguf,triton,plot,dev . scripts/bootstrap.sh
. .venv/bin/activate

RECIPE=${RECIPE:-recipes/smollm2-135m-awq.yaml}
CKPT=${QSERVE_RUNS:-runs}/$(basename "$RECIPE" .yaml)
PORT=${PORT:-8000}

step "2/4 qserve pull smollm2-135m (converts the embedded GGUF once, ~30 s; then reused from ~/.cache/qserve)"
qserve pull smollm2-135m
step "3/4 qserve run $RECIPE $* (quantize, validate, perplexity, smoke test: about 10-15 min on 2 quiet cores,
   much longer on a busy machine; the original model's perplexity is cached after the first run)"
# A failed quality gate still leaves a valid checkpoint: report it, then serve it anyway.
qserve run "$RECIPE" "$@" || { [ -f "$CKPT/config.json" ] && echo "qserve run: a gate or stage failed; see $CKPT.report/run_report.md" >&2; } || exit 1

# max model len: the model's own limit (SmolLM2: 8192, config.json max_position_embeddings), as a plain
# `qserve serve` uses; the KV cache is the same 1 GiB default either way on a CPU.
step "4/4 qserve serve $CKPT --port $PORT, then one chat request (server start ~20 s)"
qserve serve "$CKPT" --port "$PORT" &
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

kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true
trap - EXIT
ELAPSED=$(( SECONDS - START ))
cat <<MSG

== quickstart done in $(( ELAPSED / 60 ))m$(printf '%02d' $(( ELAPSED % 60 )))s; the server has been stopped.
qserve is installed in .venv, which is not on your PATH. Either activate it in each new shell:
    . .venv/bin/activate          # then: qserve --help
or call it by its path:
    .venv/bin/qserve --help
Serve the quantized checkpoint again (Ctrl-C stops it):
    .venv/bin/qserve serve $CKPT --port $PORT
and ask it from another terminal (the model name is the directory, unless --served-model-name is given):
    curl http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "$CKPT", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
Reports: $CKPT.report/run_report.md
MSG
