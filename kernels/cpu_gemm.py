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
