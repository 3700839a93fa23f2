#!/usr/bin/env bash
# README command 2: set up (with test tools), then run the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# ray: tests/deploy/test_ray_serve.py runs a local Ray cluster (ray[serve] is ~1 min of download). It also
# brings uvloop and httptools; the server pins asyncio and h11 (serve/api/shutdown.py), so nothing changes.
QSERVE_EXTRAS=gguf,triton,plot,dev,structured,ray . scripts/bootstrap.sh
. .venv/bin/activate
# Where a C++ compiler exists (CI), the CPU kernels must build: a failed build fails, kernel tests never skip.
if command -v c++ >/dev/null || command -v g++ >/dev/null; then export QSERVE_REQUIRE_CPU_EXT=1; fi
# The ray extra is installed above: the live Ray Serve tests must run, a missing Ray fails them.
export QSERVE_REQUIRE_RAY=1

echo "[test] ruff check . (a few seconds)"
ruff check .
# AutoAWQ 0.2.9 is the independent reader in tests/quantize/test_interop_autoawq.py. --no-deps: its
# `datasets` requirement would give qserve's calibration presets a Hub fallback and change their errors.
echo "[test] installing autoawq==0.2.9 --no-deps (the interop test's independent reader; seconds)"
python -m pip install -q --disable-pip-version-check --no-deps "autoawq==0.2.9"
if [ "${QSERVE_REQUIRE_CPU_EXT:-0}" = 1 ]; then
  # Built once here, before the suite: otherwise the first test that needs them (often a server child
  # with a start-up timeout) pays the compile.
  echo "[test] building the C++ CPU kernels for this machine (once per source change; 15-60 s)"
  python -c "import sys; from qserve.kernels import cpu_ext
try:
    cpu_ext.available()
except cpu_ext.CpuExtensionError as exc:
    sys.exit(f'[test] {exc}')"
fi
echo "[test] pytest -q: about 4-5 min on 2 quiet cores, 35-40 min on a busy machine. The slow SmolLM2"
echo "       end-to-end tests take minutes each with no dot until they finish; pass -v to see each test's"
echo "       name as it starts. The 10 slowest are listed at the end."
pytest -q --durations=10 "$@"
