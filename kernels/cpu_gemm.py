"""Dense GEMM on CPU for the engine's small-M shapes: split the weight's rows across threads.

MKL's sgemm runs a single thread for skinny problems (one to a few hundred activation rows against
a weight of a few thousand rows). Measured on the 2-core development machine (SmolLM2-135M's 30
layers plus the 49152-row LM head, fp32, 2 threads, one forward's worth of GEMMs):

    rows M      1      4     16     64    256    512   2048
    F.linear   73    172    193    322    971   1536   7878   ms
    split x4   49     83    115    221    832   2095   8232   ms

Viewing W [out, in] as [T, out/T, in] and calling `bmm` gives each thread its own GEMM over a slice of
the output features, so a decode step reads the weights on every core instead of one. Above
SPLIT_MAX_ROWS rows the problem is compute-bound, MKL threads it itself, and the split only costs.

For fp32, qserve's own C++ kernel (`cpu_ext`, built on first use) does better still: it streams each
thread's share of the weight rows at the machine's read bandwidth. `python bench/cpu_gemv.py` on the
AVX-512 machine of 2026-12-01 (2 threads, same forward's GEMMs; `torch.sum` over the same bytes read
~47 GB/s at the time, 11.4 ms):

    rows M         1      4     16     64    256
    F.linear    30.7   46.5   49.1    107    345   ms
    split x4    17.8   25.4   41.1   94.8    346   ms
    cpu_ext     11.6   14.7   26.5   72.2    286   ms
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from qserve.kernels import cpu_ext, cpu_packed

SPLIT_MAX_ROWS = 256
# bf16 activations and weights: qserve's bf16-weight kernel (all threads on the weight rows, fp32
# accumulation) up to this many rows, oneDNN's bf16 GEMM above. SmolLM2-135M's GEMMs per forward, CPU
# time on one thread of the AVX-512 machine on 2026-12-02 (kernel vs F.linear): M=1 35 vs 47 ms,
# M=4 48 vs 49, M=16 80 vs 48.
BF16_KERNEL_MAX_ROWS = 2  # bf16 x bf16: qserve's kernel up to here, oneDNN (AVX512-BF16/AMX) above
SPLIT_WAYS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on CPU with few rows, qserve's C++ kernel or a thread split.

    A bf16 weight with fp32 activations (the bf16 LM head or tied embedding of a quantized model on
    the CPU) goes through the C++ bf16-weight kernel: fp32 accumulation, fp32 output."""
    if weight.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu":
        if cpu_ext.available() and weight.is_contiguous():
            y = cpu_packed.linear_bf16_weight(x, weight)
        else:
            y = F.linear(x, weight.float())
        return y if bias is None else y + bias
    if (
        weight.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and 0 < x.numel() // weight.shape[1] <= BF16_KERNEL_MAX_ROWS
        and weight.is_contiguous()
        and cpu_ext.available()
    ):  # bf16 decode: the same kernel, all threads on the weight rows (oneDNN runs these shapes on one)
        y = cpu_packed.linear_bf16_weight(x, weight)
        return y if bias is None else y + bias
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if rows == 0 or rows > SPLIT_MAX_ROWS or x.device.type != "cpu" or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, in_features).contiguous()
    if cpu_ext.usable(x2, weight):
        y = cpu_ext.linear_small_m(x2, weight).view(*x.shape[:-1], out_features)
        return y if bias is None else y + bias
    if out_features % SPLIT_WAYS or torch.get_num_threads() < 2:
        return F.linear(x, weight, bias)
    parts = weight.view(SPLIT_WAYS, out_features // SPLIT_WAYS, in_features).transpose(1, 2)
    y = torch.bmm(x2.expand(SPLIT_WAYS, rows, in_features), parts)  # [T, rows, out/T]
    y = y.transpose(0, 1).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def onednn_bf16_packing() -> bool:
    """Whether bf16 weights on the CPU are held in oneDNN's blocked layout (`DenseLinear`): torch was built
    with oneDNN, this CPU has its bf16 GEMMs (AVX512-BF16 or AMX), and QSERVE_CPU_ONEDNN_PACK is not 0.

    Measured on the AMX machine (2026-12-03, 2 threads, SmolLM2-135M's 120 GEMMs per forward, ms):

        rows M        1      3      7     64    200    512   2048
        F.linear   19.1   17.3   17.9   36.9    124    271   ~760
        packed     10.6   10.2   11.3   27.7    103    269   ~750

    `F.linear` reorders the plain weight into that layout on every call; at decode sizes that is most of
    the time. (qserve's own bf16 GEMV kernel, which the plain path takes for M <= 2, is ~20 ms at M=1.)"""
    return os.environ.get("QSERVE_CPU_ONEDNN_PACK", "1") != "0" and cpu_packed.onednn_bf16_supported()


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] (bf16, CPU) reordered into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight as `onednn_pack` left it; x in bf16 (other dtypes are
    computed in bf16 and returned in theirs)."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    if rows == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    x2 = x.reshape(rows, in_features)
    dtype = x2.dtype
    if dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features).to(dtype)
