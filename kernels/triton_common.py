"""Small helpers shared by the Triton kernel wrappers (importing this module needs triton)."""

from __future__ import annotations

import torch
import triton.language as tl


def dot_operands(dtype: torch.dtype, device: torch.device) -> tuple:
    """(tl dtype for tl.dot operands, input_precision) for activations of `dtype` on `device`.

    The interpreter's numpy backend has no bfloat16 arithmetic (measured: tl.dot on bf16 returns
    garbage there), so interpreted bf16 runs upcast the operands; on a GPU bf16 goes to the tensor
    cores as is. fp32 operands would silently run in tf32 on tensor cores; "ieee" keeps them exact.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu"):
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"
