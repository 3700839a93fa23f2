"""Linear layers of the engine: dense, or 4-bit GPTQ / AWQ holding the packed checkpoint tensors.

The model fuses q/k/v and gate/up into one layer each, so a layer is built from several checkpoint
Linears ("parts") whose outputs are concatenated.

On CUDA a quantized layer keeps the packed tensors and calls `qserve.kernels.dequant_gemm` (fused
dequantize + GEMM: the 4-bit weights are what is read from memory). On CPU the layer is dequantized
ONCE at load into a dense weight in the compute dtype and runs a plain matmul: dequantizing 4-bit
weights on every call costs far more than the GEMM itself on a CPU, and CPU GEMMs have no fused
low-bit path in torch. The CPU engine therefore holds full-size weights (the memory saving of 4-bit
applies on the GPU path only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qserve import kernels
from qserve.kernels import cpu_gemm, packing


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's Linears are packed (read from its metadata by the loader)."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    checkpoint_format: str = "gptq"  # GPTQ zero convention: "gptq" (v1, stores z - 1) or "gptq_v2"
    desc_act: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "awq"):
            raise ValueError(f"QuantSpec.method must be 'gptq' or 'awq', got {self.method!r}")
        if self.method == "awq" and self.bits != 4:
            raise ValueError(f"AWQ GEMM exists only at 4 bits, got bits={self.bits}")


@dataclass(frozen=True)
class PackedLinear:
    """One checkpoint Linear's packed tensors, as stored (see kernels/packing.py for the layouts)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None  # GPTQ only; None means contiguous groups

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def dequantize(self, spec: QuantSpec) -> torch.Tensor:
        """W' [out, in] float32 through the shared format code."""
        if spec.method == "awq":
            return packing.dequantize_awq(self.qweight, self.qzeros, self.scales, spec.group_size)
        return packing.dequantize_gptq(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            spec.bits,
            spec.group_size,
            spec.checkpoint_format,
        )


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """Packed 4-bit Linear(s) computed with the fused dequant-GEMM kernel (CUDA)."""

    def __init__(self, parts: list[PackedLinear], bias: torch.Tensor | None, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        # Plain attributes, not buffers: the loader places tensors on their device once, and a
        # Module.to(dtype) must never cast the fp16 scales.
        self.parts = _concat_parts(parts, spec)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [
            kernels.dequant_gemm(
                x,
                p.qweight,
                p.qzeros,
                p.scales,
                p.g_idx,
                None,
                fmt=self.spec.method,
                bits=self.spec.bits,
                group_size=self.spec.group_size,
                checkpoint_format=self.spec.checkpoint_format,
            )
            for p in self.parts
        ]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias


def _concat_parts(parts: list[PackedLinear], spec: QuantSpec) -> list[PackedLinear]:
    """Merge parts into one packed Linear when their layouts allow it, so a fused layer is one launch.

    Both layouts pack the output dim in whole words of 32 / bits columns and share the input grouping
    unless act-order gave each part its own g_idx; then the parts stay separate.
    """
    per_word = 32 // spec.bits
    same_groups = all(
        (p.g_idx is None and parts[0].g_idx is None)
        or (p.g_idx is not None and parts[0].g_idx is not None and torch.equal(p.g_idx, parts[0].g_idx))
        for p in parts
    )
    if len(parts) == 1 or not same_groups or any(p.out_features % per_word for p in parts):
        return parts
    return [
        PackedLinear(
            qweight=torch.cat([p.qweight for p in parts], dim=1),  # GPTQ [in/8, out], AWQ [in, out/8]
            qzeros=torch.cat([p.qzeros for p in parts], dim=1),  # [G, out/8]
            scales=torch.cat([p.scales for p in parts], dim=1),  # [G, out]
            g_idx=parts[0].g_idx,
        )
    ]


def build_linear(
    parts: list[torch.Tensor | PackedLinear],
    biases: list[torch.Tensor | None],
    spec: QuantSpec | None,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """One engine Linear from checkpoint parts (dense weights [out, in] or packed), outputs concatenated.

    A bias that some parts have and others lack is zero-filled for the latter.
    """
    out_sizes = [p.shape[0] if isinstance(p, torch.Tensor) else p.out_features for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [torch.zeros(n) if b is None else b.float() for b, n in zip(biases, out_sizes, strict=True)]
        ).to(device=device, dtype=dtype)
    packed = [p for p in parts if isinstance(p, PackedLinear)]
    if device.type == "cuda" and spec is not None and len(packed) == len(parts):
        moved = [
            PackedLinear(
                p.qweight.to(device),
                p.qzeros.to(device),
                p.scales.to(device),
                None if p.g_idx is None else p.g_idx.to(device),
            )
            for p in packed
        ]
        return QuantLinear(moved, bias, spec)
    dense = [p if isinstance(p, torch.Tensor) else p.dequantize(spec) for p in parts]
    weight = torch.cat([w.float() for w in dense], dim=0) if len(dense) > 1 else dense[0]
    return DenseLinear(weight.to(device=device, dtype=dtype).contiguous(), bias)
