"""Triton kernels and their torch references.

Public entry points (the engine codes against these): `dequant_gemm`, `dequantize_weight`,
`write_kv_cache`, `rope_and_write_kv`, `paged_attention`, `paged_attention_decode`. CUDA tensors run
Triton kernels (`triton_gemm`, `triton_attention`); CPU tensors run torch (`torch_attention`,
`reference`), or in fp32 qserve's C++ decode kernels (`cpu_ext`) where they could be built.
Importing this package does not import triton.
"""

from qserve.kernels.ops import (
    FUSED_MAX_TOKENS,
    dequant_gemm,
    dequantize_weight,
    g_idx_is_trivial,
    paged_attention,
    paged_attention_decode,
    rope_and_write_kv,
    write_kv_cache,
)

__all__ = [
    "FUSED_MAX_TOKENS",
    "dequant_gemm",
    "dequantize_weight",
    "g_idx_is_trivial",
    "paged_attention",
    "paged_attention_decode",
    "rope_and_write_kv",
    "write_kv_cache",
]
