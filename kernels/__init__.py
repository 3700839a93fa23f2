"""Triton kernels and their torch references.

Public entry points (the engine codes against these): `dequant_gemm`, `dequantize_weight`, `fused_moe`,
`write_kv_cache`, `rope_and_write_kv`, `paged_attention`, `paged_attention_decode`. CUDA tensors run
Triton kernels (`triton_gemm`, `triton_attention`); CPU tensors run torch (`torch_attention`,
`reference`), or in fp32 qserve's C++ decode kernels (`cpu_ext`) where they could be built.
Importing this package does not import triton.

This folder is the package `qserve.kernels` (pyproject's package-dir). A Python process started in the
repository root also finds it as the top-level module `kernels`, because the current directory is on
sys.path, and `kernels` is a real PyPI package (Hugging Face's kernel hub) that transformers and vLLM
probe for. Imported under that name, this file stands aside (`_stand_aside`): it loads the real `kernels`
from the rest of sys.path when one is installed, and otherwise leaves an empty module that transformers'
availability check (`importlib.util.find_spec`, distribution metadata, then an import whose result has no
`__version__` and no `__file__`) reads as "not installed". It never imports qserve under that name.
"""

import sys as _sys


def _stand_aside(name: str) -> None:
    """Replace this module (imported as `name`, not as qserve.kernels) by the real package or a blank."""
    import importlib.util
    import os
    from importlib.machinery import PathFinder

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    elsewhere = [p for p in _sys.path if isinstance(p, str) and os.path.abspath(p or os.curdir) != root]
    spec = PathFinder.find_spec(name, elsewhere) if "." not in name else None
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        real = importlib.util.module_from_spec(spec)
        _sys.modules[name] = real  # the import statement returns whatever sys.modules holds at the end
        try:
            spec.loader.exec_module(real)
        except BaseException:
            _sys.modules.pop(name, None)
            raise
        return
    module = _sys.modules[name]
    module.__file__ = None  # no file and no __version__: transformers' probe reads "not installed"
    module.__path__ = []  # `import kernels.ops` finds nothing instead of qserve's modules

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(
            f"module {name!r} has no attribute {attr!r}: this is qserve's kernels/ folder found on sys.path "
            f"(run from the qserve checkout), not the PyPI package `kernels`; qserve's kernels are "
            f"`qserve.kernels`. Install the PyPI package or start Python outside the checkout."
        )

    module.__getattr__ = __getattr__


if __name__ != "qserve.kernels":
    _stand_aside(__name__)
else:
    from qserve.kernels.ops import (
        FUSED_MAX_TOKENS,
        StackedPacked,
        dequant_gemm,
        dequantize_weight,
        fused_moe,
        g_idx_is_trivial,
        paged_attention,
        paged_attention_decode,
        rope_and_write_kv,
        write_kv_cache,
    )

    __all__ = [
        "FUSED_MAX_TOKENS",
        "StackedPacked",
        "dequant_gemm",
        "dequantize_weight",
        "fused_moe",
        "g_idx_is_trivial",
        "paged_attention",
        "paged_attention_decode",
        "rope_and_write_kv",
        "write_kv_cache",
    ]
