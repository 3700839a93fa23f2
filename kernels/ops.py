"""The public kernel entry points: Triton on CUDA tensors, torch on everything else.

Dispatch is by the tensors' device only (never by environment), so CPU callers always get the torch
paths, even in a process where TRITON_INTERPRET is set (`fused_moe` takes an explicit backend="triton"
so tests can run its CUDA path's Python glue under the interpreter). The Triton modules are imported on the first
CUDA call, so importing `qserve.kernels` does not need triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qserve.kernels import cpu_ext, cpu_gemm, reference, torch_attention

# Above this many tokens, dequantize + cuBLAS beats the fused kernel: the GEMM is compute-bound and
# the one-off decode of the weight is amortised over the rows. vLLM's Triton AWQ path switches at the
# same count from its own measurements; bench/gpu_kernels.py reports the crossover per shape on a GPU.
FUSED_MAX_TOKENS = 256
GEMM_PATHS = ("fused", "dequant")
MOE_BACKENDS = ("triton", "torch")


def g_idx_is_trivial(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx is i // group_size (no act-order): callers may then pass g_idx=None, which lets
    the fused kernel load scales once per tile instead of once per row. Check once, at load time."""
    in_features = g_idx.numel()
    gs = in_features if group_size == -1 else group_size
    expected = torch.arange(in_features, device=g_idx.device, dtype=torch.int32) // gs
    return bool(torch.equal(g_idx.to(torch.int32), expected))


def dequantize_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    fmt: str,
    bits: int = 4,
    group_size: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W' [out, in] in `dtype`, for `F.linear`. A caller may cache it: on CPU the engine
    dequantizes each Linear once at load and runs plain matmuls, which is far faster than decoding the
    packed weight on every call."""
    if qweight.is_cuda:
        from qserve.kernels import triton_gemm

        w_t = triton_gemm.dequantize_t(
            qweight, qzeros, scales, g_idx, fmt=fmt, bits=bits, group_size=group_size,
            checkpoint_format=checkpoint_format, dtype=dtype,
        )  # fmt: skip
        return w_t.t().contiguous()  # [in, out] -> [out, in]
    return reference.dequantize_weight(
        qweight, qzeros, scales, g_idx, fmt=fmt, bits=bits, group_size=group_size,
        checkpoint_format=checkpoint_format, dtype=dtype,
    )  # fmt: skip


def dequant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    fmt: str,
    bits: int = 4,
    group_size: int,
    checkpoint_format: str = "gptq",
    path: str | None = None,
) -> torch.Tensor:
    """y = x @ W'^T (+ bias): x [..., in] fp16/bf16/fp32 -> [..., out] in x.dtype.

    fmt "gptq": qweight int32 [in * bits / 32, out], qzeros [G, out * bits / 32], scales fp16 [G, out],
    g_idx int32 [in] or None (act-order allowed). fmt "awq": qweight [in, out / 8] interleaved, qzeros
    [G, out / 8], scales [G, out], g_idx None. On CUDA, `path` forces "fused" (Triton) or "dequant"
    (decode + torch.matmul); by default the fused kernel serves up to FUSED_MAX_TOKENS rows.
    On CPU the weight is decoded on every call: cache `dequantize_weight(...)` on hot paths instead.
    """
    if path is not None and path not in GEMM_PATHS:
        raise ValueError(f"path must be one of {GEMM_PATHS} or None, got {path!r}")
    in_features, _ = reference.packed_shape(fmt, bits, qweight, qzeros, scales, g_idx)
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x [..., {x.shape[-1]}] does not match the packed weight's in_features {in_features}"
        )
    if not x.is_cuda:
        # fp16 matmul on CPU is slow or missing: compute in fp32 there, bf16 and fp32 stay as they are
        compute = torch.float32 if x.dtype == torch.float16 else x.dtype
        w = reference.dequantize_weight(
            qweight, qzeros, scales, g_idx, fmt=fmt, bits=bits, group_size=group_size,
            checkpoint_format=checkpoint_format, dtype=compute,
        )  # fmt: skip
        b = bias.to(compute) if bias is not None else None
        return cpu_gemm.linear(x.to(compute), w, b).to(x.dtype)

    from qserve.kernels import triton_gemm

    tokens = x.numel() // x.shape[-1]
    if path is None:
        path = "fused" if tokens <= FUSED_MAX_TOKENS else "dequant"
    if path == "fused":
        return triton_gemm.dequant_gemm_triton(
            x, qweight, qzeros, scales, g_idx, bias, fmt=fmt, bits=bits, group_size=group_size,
            checkpoint_format=checkpoint_format,
        )  # fmt: skip
    w_t = triton_gemm.dequantize_t(
        qweight, qzeros, scales, g_idx, fmt=fmt, bits=bits, group_size=group_size,
        checkpoint_format=checkpoint_format, dtype=x.dtype,
    )  # fmt: skip  # W'^T [in, out]
    y = torch.matmul(x, w_t)
    return y + bias.to(x.dtype) if bias is not None else y


@dataclass(frozen=True)
class StackedPacked:
    """One projection of every expert, packed tensors stacked on a leading expert dim (see the module
    docstring); g_idx None means contiguous groups for every expert."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.scales.shape[0]

    def shape(self, fmt: str, bits: int) -> tuple[int, int]:
        """(in_features, out_features) of each expert, after checking the stacked tensors agree."""
        e = self.num_experts
        for name, t in (("qweight", self.qweight), ("qzeros", self.qzeros), ("g_idx", self.g_idx)):
            if t is not None and (t.dim() < 2 or t.shape[0] != e):
                raise ValueError(f"stacked {name}: expected a leading expert dim of {e} (from scales "
                                 f"{list(self.scales.shape)}), found {list(t.shape)}")  # fmt: skip
        return reference.packed_shape(fmt, bits, self.qweight[0], self.qzeros[0], self.scales[0],
                            None if self.g_idx is None else self.g_idx[0])  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    gate_up: list,
    down,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    fmt: str,
    bits: int = 4,
    group_size: int,
    checkpoint_format: str = "gptq",
    activation,
    backend: str | None = None,
) -> torch.Tensor:
    """A MoE block's routed experts: sum_j topk_weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)),
    e = topk_ids[t, j]; x [T, H] -> [T, H] in x.dtype.

    `gate_up` (a list of one stack of gate|up, or two stacks gate and up) and `down` are
    `StackedPacked`: every expert's packed tensors with a leading expert dim. On CUDA (or
    backend "triton": CPU tensors then need TRITON_INTERPRET=1) the fused Triton kernel runs, one
    launch per projection for all experts; on CPU (backend "torch") the reference, which dequantizes
    every routed expert on every call (the CPU engine keeps its experts as `CpuQuantLinear` instead).
    """
    if backend is not None and backend not in MOE_BACKENDS:
        raise ValueError(f"backend must be one of {MOE_BACKENDS} or None, got {backend!r}")
    backend = backend or ("triton" if x.is_cuda else "torch")
    kw = dict(
        fmt=fmt, bits=bits, group_size=group_size, checkpoint_format=checkpoint_format, activation=activation
    )
    if backend == "torch":
        return reference.fused_moe_reference(x, gate_up, down, topk_weights, topk_ids, **kw)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("fused_moe backend 'triton' on CPU tensors runs only under TRITON_INTERPRET=1 "
                         "(tests); use CUDA tensors or backend 'torch'")  # fmt: skip
    from qserve.kernels import triton_moe

    return triton_moe.fused_moe_triton(x, gate_up, down, topk_weights, topk_ids, **kw)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [T, KVH, D] into caches [num_blocks, block_size, KVH, D] at slot = block * block_size
    + offset; slot -1 skips the token (padding)."""
    if key_cache.is_cuda:
        from qserve.kernels import triton_attention

        triton_attention.write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping)
    else:
        torch_attention.write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping)


def rope_and_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """RoPE (rotate-half) on the q and k heads of a fused projection qkv [T, (H + 2 KVH) * D], with
    cos/sin [T, 1, D / 2] per token, and the rotated k and the v written to the paged caches at the
    flat slots (-1 skips); returns the rotated q [T, H, D]."""
    n = qkv.shape[0]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    if cpu_ext.usable_low_precision(qkv, key_cache, value_cache) and cos.dtype in (torch.float32, qkv.dtype):
        return cpu_ext.rope_write_kv(
            qkv,
            cos.reshape(n, -1).contiguous(),
            sin.reshape(n, -1).contiguous(),
            key_cache,
            value_cache,
            slot_mapping.long().contiguous(),
            num_heads,
        )
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # q and k heads side by side are rotated in one pass: [T, H + KVH, D]
    qk = torch_attention.apply_rotary(qkv[:, : q_size + kv_size].view(n, -1, head_dim), cos, sin)
    v = qkv[:, q_size + kv_size :].view(n, num_kv_heads, head_dim)
    write_kv_cache(qk[:, num_heads:], v, key_cache, value_cache, slot_mapping)
    return qk[:, :num_heads]


def _check_heads(q: torch.Tensor, key_cache: torch.Tensor) -> None:
    num_heads, num_kv_heads = q.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads or q.shape[2] != key_cache.shape[3]:
        raise ValueError(
            f"q [T, H={num_heads}, D={q.shape[2]}] does not fit a cache with KVH={num_kv_heads}, "
            f"D={key_cache.shape[3]}: H must be a multiple of KVH and head dims must match"
        )


def paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [S, H, D] over each sequence's seq_lens[i] cached positions,
    or with `window` (sliding-window attention) over the last `window` of them."""
    _check_heads(q, key_cache)
    _check_window(window)
    if q.is_cuda:
        from qserve.kernels import triton_attention

        return triton_attention.paged_attention_decode_triton(
            q, key_cache, value_cache, block_tables, seq_lens, scale, window=window
        )
    return torch_attention.paged_decode_torch(q, key_cache, value_cache, block_tables, seq_lens, scale, window)


def _check_window(window: int | None) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive number of positions or None, got {window!r}")


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    causal: bool = True,
    max_query_len: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Mixed batch of prefill chunks and decodes: q [T, H, D] -> [T, H, D] in q.dtype.

    query_start_loc int32 [S + 1] (every sequence has at least one query token); seq_lens int32 [S]
    counts each sequence's context including this step's tokens, already written with
    `write_kv_cache`. Query j of sequence i sits at position seq_lens[i] - q_len_i + j and, if causal,
    sees positions <= its own. block_tables int32 [S, max_blocks] (padding entries ignored).
    `max_query_len`, the longest chunk, sizes the CUDA kernel's grid; without it the CUDA path reads
    it back from query_start_loc (a device-to-host sync per call). `window` (sliding-window attention,
    as transformers defines it): query position p sees only key positions > p - window as well.
    """
    if q.shape[0] == seq_lens.shape[0]:  # T == S with q_len >= 1 each: all decodes, no host sync
        return paged_attention_decode(q, key_cache, value_cache, block_tables, seq_lens, scale, window=window)
    _check_heads(q, key_cache)
    _check_window(window)
    if not q.is_cuda:
        return torch_attention.paged_attention_torch(
            q, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, causal=causal, window=window
        )
    from qserve.kernels import triton_attention

    return triton_attention.paged_attention_prefill_triton(
        q, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, causal=causal,
        max_query_len=max_query_len, window=window,
    )  # fmt: skip
