"""Torch references for every kernel in `qserve.kernels`: slow, obviously correct, fp32 inside.

The Triton kernels and the fast torch paths are tested against these. The packed formats are decoded
only through `qserve.kernels.packing`, the same code the quantizer and the loader use, so a kernel that
agrees with this module agrees with the checkpoint format.
"""

from __future__ import annotations

import torch

from qserve.kernels import packing

FORMATS = ("gptq", "awq")


def packed_shape(
    fmt: str, bits: int, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx=None
) -> tuple[int, int]:
    """(in_features, out_features) of a packed Linear, after checking that its tensors agree.

    Kernels index these tensors with the implied strides, so a mismatch must stop here, not read
    out of bounds; the message names the tensor, the expected and the found shape.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown packed format fmt={fmt!r}; expected one of {FORMATS}")
    pack = 32 // bits
    n_groups, out_f = scales.shape
    if out_f % pack:
        raise ValueError(f"{fmt} scales: out_features {out_f} is not a multiple of {pack} (32 / bits={bits})")
    if fmt == "gptq":
        in_f = qweight.shape[0] * pack
        want_qweight, want_qzeros = (qweight.shape[0], out_f), (n_groups, out_f // pack)
    else:
        in_f = qweight.shape[0]
        want_qweight, want_qzeros = (in_f, out_f // pack), (n_groups, out_f // pack)
    for name, tensor, want in (("qweight", qweight, want_qweight), ("qzeros", qzeros, want_qzeros)):
        if tuple(tensor.shape) != want or tensor.dtype != torch.int32:
            raise ValueError(
                f"{fmt} {name}: expected int32 {list(want)} for scales {list(scales.shape)}, "
                f"found {tensor.dtype} {list(tensor.shape)}; check the checkpoint's bits and format"
            )
    if g_idx is not None and tuple(g_idx.shape) != (in_f,):
        raise ValueError(f"g_idx: expected [{in_f}] (one group per input channel), found {list(g_idx.shape)}")
    return in_f, out_f


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
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense W' [out, in] in `dtype` from a packed GPTQ or AWQ-GEMM Linear."""
    if fmt == "gptq":
        w = packing.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format)
    elif fmt == "awq":
        if g_idx is not None:
            raise ValueError("AWQ GEMM has no g_idx (groups are contiguous); pass g_idx=None")
        if bits != 4:
            raise ValueError(f"AWQ GEMM exists only at 4 bits, got bits={bits}")
        w = packing.dequantize_awq(qweight, qzeros, scales, group_size)
    else:
        raise ValueError(f"unknown packed format fmt={fmt!r}; expected one of {FORMATS}")
    return w.to(dtype)


def dequant_gemm_reference(
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
) -> torch.Tensor:
    """y = x @ W'^T (+ bias), accumulated in fp32 and returned in x.dtype; x [..., in] -> [..., out]."""
    w = dequantize_weight(
        qweight,
        qzeros,
        scales,
        g_idx,
        fmt=fmt,
        bits=bits,
        group_size=group_size,
        checkpoint_format=checkpoint_format,
    )
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Token t goes to block slot_mapping[t] // block_size, offset slot_mapping[t] % block_size; -1 skips."""
    block_size = key_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[t]
        value_cache[slot // block_size, slot % block_size] = value[t]


def context_slots(block_table: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """Flat cache slot of each position 0..context_len-1 of one sequence: int64 [context_len]."""
    pos = torch.arange(context_len, device=block_table.device)
    return block_table.long()[pos // block_size] * block_size + pos % block_size


def paged_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new tokens over its whole cached context, one sequence at a time.

    q [num_tokens, H, D]; caches [num_blocks, block_size, KVH, D]; the new tokens of sequence i are the
    last q_len_i of its seq_lens[i] positions, so query j attends to positions <= seq_lens[i] - q_len_i + j.
    With `window` (sliding-window attention) a query at position p sees only positions > p - window.
    """
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = q.shape[1]
    flat_k = key_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = value_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, ctx in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        slots = context_slots(block_tables[i], ctx, block_size)
        # [ctx, KVH, D] -> [H, ctx, D]: each kv head serves H / KVH consecutive query heads
        k = flat_k[slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1).transpose(0, 1)
        v = flat_v[slots].float().repeat_interleave(num_heads // num_kv_heads, dim=1).transpose(0, 1)
        qi = q[lo:hi].float().transpose(0, 1)  # [H, q_len, D]
        scores = qi @ k.transpose(1, 2) * scale  # [H, q_len, ctx]
        q_pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        key_pos = torch.arange(ctx, device=q.device)
        if causal:
            scores = scores.masked_fill(key_pos[None, :] > q_pos[:, None], float("-inf"))
        if window is not None:
            scores = scores.masked_fill(key_pos[None, :] <= q_pos[:, None] - window, float("-inf"))
        out[lo:hi] = (scores.softmax(dim=-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def fused_moe_reference(
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
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, j], each
    expert dequantized from its stacked packed tensors (`qserve.kernels.StackedPacked`: qweight, qzeros,
    scales, g_idx with a leading expert dim) and applied in fp32; x [T, H] -> [T, H] in x.dtype."""
    kw = dict(fmt=fmt, bits=bits, group_size=group_size, checkpoint_format=checkpoint_format)

    def dense(s, e: int) -> torch.Tensor:
        g_idx = None if s.g_idx is None else s.g_idx[e]
        return dequantize_weight(s.qweight[e], s.qzeros[e], s.scales[e], g_idx, **kw)  # [out, in]

    xf = x.float()
    out = torch.zeros_like(xf)
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        h = torch.cat([xf[token] @ dense(s, e).t() for s in gate_up], dim=-1)
        gate, up = h.chunk(2, dim=-1)
        y = (activation(gate) * up) @ dense(down, e).t()
        out.index_add_(0, token, y * topk_weights[token, slot].float()[:, None])
    return out.to(x.dtype)
