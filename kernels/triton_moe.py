"""Fused mixture-of-experts dequant-GEMM for GPTQ and AWQ-GEMM packed experts (Triton).

A MoE block routes each token to its top-k experts. Instead of one GEMM launch per active expert, the
(token, slot) pairs are sorted by expert and cut into blocks of BLOCK_M pairs that all belong to one
expert (`moe_align_block_size`: each expert's run is padded to a whole number of blocks); one launch
then computes every block against its own expert's packed 4-bit (or 8-bit GPTQ) weights, decoded tile
by tile in registers with the dense kernel's code (`triton_gemm._weight_tile`). The experts' packed
tensors are stacked: qweight [E, ...], qzeros [E, G, ...], scales [E, G, N], g_idx [E, K].

`fused_moe_triton` runs a whole block's experts: gate|up for every pair (rows gathered from the tokens),
the activation in torch, down for every pair with the pair's routing weight applied in the kernel's
epilogue, and the k weighted outputs of each token summed. Nothing reads back to the host: the align
step is torch ops whose sizes depend only on the token count, and blocks past the padded total exit.

Importing this module needs triton. On CPU tensors it only runs under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from qserve.kernels.ops import StackedPacked
from qserve.kernels.triton_common import dot_operands
from qserve.kernels.triton_gemm import TileConfig, _format_constants, _weight_tile


@triton.jit
def _fused_moe_kernel(
    a_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_pairs, num_m_blocks, stride_qw, stride_qz, stride_s, stride_g,
    TOP_K: tl.constexpr, A_PER_PAIR: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    AWQ: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    ACT_ORDER: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[pair, n0:n0+BLOCK_N] = a[row(pair)] @ W'_e^T for the BLOCK_M pairs of one aligned block.

    Pair p is (token p // TOP_K, slot p % TOP_K); its input row is a[p] (A_PER_PAIR: down, whose
    input is per pair) or a[p // TOP_K] (gate|up, whose input is the token). Padding entries hold
    num_pairs and are neither read nor written. MUL_WEIGHT scales each row by its routing weight."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M consecutive programs share a weight column tile while it is hot in L2
    # (consecutive blocks mostly belong to the same expert)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    num_padded = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M < num_padded:  # the grid is sized for the worst padding; the rest is idle
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        valid = pair < num_pairs
        if A_PER_PAIR:
            a_row = pair.to(tl.int64)
        else:
            a_row = (pair // TOP_K).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        qw = qweight_ptr + expert * stride_qw
        qz = qzeros_ptr + expert * stride_qz
        sc = scales_ptr + expert * stride_s
        gi = g_idx_ptr + expert * stride_g
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(
                a_ptr + a_row[:, None] * K + offs_k[None, :],
                mask=valid[:, None] & (offs_k[None, :] < K),
                other=0.0,
            )
            w = _weight_tile(
                qw, qz, sc, gi, t * BLOCK_K, pid_n * BLOCK_N, K, N,
                AWQ, BITS, GROUP_SIZE, ZERO_OFFSET, ACT_ORDER, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        if MUL_WEIGHT:
            acc = acc * tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        out_offs = pair.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(
            out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N)
        )


# Launch configurations. Few pairs per expert (decode): 16-row blocks waste little on padding and the
# work is reading each active expert's weight once; many (prefill): 64-row blocks reuse each weight
# tile over more rows. `python -m qserve.kernels.compile_check` compiles both for sm_80/89/90.
# (16, 64, 128) with 3 stages spilled on sm_90 (8 B of stack at 128 registers, GPTQ bf16 gate|up); a
# 64-deep K tile with 4 stages keeps as many bytes in flight at 80 registers.
MOE_CONFIGS = {
    "small": TileConfig(16, 64, 64, num_warps=4, num_stages=4),
    "large": TileConfig(64, 64, 64, num_warps=4, num_stages=4),
}
SMALL_MAX_PAIRS_PER_EXPERT = 16


def moe_config(num_pairs: int, num_experts: int) -> TileConfig:
    """The launch configuration for `num_pairs` (token, expert) pairs over `num_experts` experts."""
    return MOE_CONFIGS["small" if num_pairs <= SMALL_MAX_PAIRS_PER_EXPERT * num_experts else "large"]


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of topk_ids [T, k] by expert, each expert's run padded to whole
    blocks of `block_m` pairs.

    Returns sorted_ids int32 [L] (pair index t * k + j, grouped by expert, stable within an expert;
    padding entries hold T * k), expert_ids int32 [L / block_m] (the expert of each block; -1 past the
    padded total) and num_padded int32 [1] (the padded total). L = T * k + min(T * k, E) * (block_m - 1)
    bounds the padded total whatever the routing, so every size is known without reading the device.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected [tokens, k], found {list(topk_ids.shape)}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its size back from the device
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[experts_sorted]
    length = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    length = triton.cdiv(length, block_m) * block_m
    sorted_ids = torch.full((length,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[(ends - padded)[experts_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def fused_moe_gemm_triton(
    a: torch.Tensor, w: StackedPacked, topk_weights: torch.Tensor | None, sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor, num_padded: torch.Tensor, *, top_k: int, a_per_pair: bool, fmt: str,
    bits: int = 4, group_size: int, checkpoint_format: str = "gptq", config: TileConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """out [T * k, N]: row p = a[p if a_per_pair else p // k] @ W'_{expert(p)}^T, times topk_weights'
    entry p when given. `sorted_ids` / `expert_ids` / `num_padded` come from `moe_align_block_size`
    with block_m = config.block_m."""
    K, N = w.shape(fmt, bits)
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"activations {list(a.shape)} do not match the experts' in_features {K}")
    if sorted_ids.numel() % config.block_m or expert_ids.numel() != sorted_ids.numel() // config.block_m:
        raise ValueError(
            f"sorted_ids [{sorted_ids.numel()}] / expert_ids [{expert_ids.numel()}] were not "
            f"aligned to block_m={config.block_m}; use moe_align_block_size with the same block_m"
        )
    num_pairs = a.shape[0] * (1 if a_per_pair else top_k)
    consts = _format_constants(fmt, bits, group_size, K, w.g_idx, checkpoint_format)
    dot_dtype, precision = dot_operands(a.dtype, a.device)
    if out is None:
        out = torch.empty((num_pairs, N), device=a.device, dtype=a.dtype)
    if num_pairs == 0:
        return out
    num_m_blocks = sorted_ids.numel() // config.block_m
    g_arg = (
        w.g_idx.to(torch.int32).contiguous() if w.g_idx is not None else w.scales
    )  # unused without act-order
    weights_arg = topk_weights.reshape(-1).contiguous() if topk_weights is not None else w.scales
    grid = (num_m_blocks * triton.cdiv(N, config.block_n),)
    _fused_moe_kernel[grid](
        a.contiguous(), w.qweight.contiguous(), w.qzeros.contiguous(), w.scales.contiguous(), g_arg, out,
        weights_arg, sorted_ids, expert_ids, num_padded,
        N, K, num_pairs, num_m_blocks, w.qweight[0].numel(), w.qzeros[0].numel(), w.scales[0].numel(),
        K if w.g_idx is not None else 0,
        TOP_K=top_k, A_PER_PAIR=a_per_pair, MUL_WEIGHT=topk_weights is not None,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, **consts,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=8,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def fused_moe_triton(
    x: torch.Tensor, gate_up: list[StackedPacked], down: StackedPacked, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, *, fmt: str, bits: int = 4, group_size: int, checkpoint_format: str = "gptq",
    activation: Callable[[torch.Tensor], torch.Tensor], config: TileConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """sum_j topk_weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j]: x [T, H] ->
    [T, H] in x.dtype.

    `gate_up` is one stack whose outputs are gate then up (each expert's two Linears concatenated), or
    two stacks, gate and up, when they cannot be concatenated (act-order with different g_idx);
    `down` is one stack. `config` pins the tiles (tests), else `moe_config` picks them."""
    if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"x {list(x.shape)}, topk_weights {list(topk_weights.shape)} and topk_ids "
                         f"{list(topk_ids.shape)}: expected [T, H], [T, k] and [T, k]")  # fmt: skip
    tokens, top_k = topk_ids.shape
    num_experts = down.num_experts
    if any(s.num_experts != num_experts for s in gate_up):
        raise ValueError(
            f"gate|up stacks hold {[s.num_experts for s in gate_up]} experts, down {num_experts}"
        )
    if tokens == 0:
        return torch.empty_like(x)
    cfg = config or moe_config(tokens * top_k, num_experts)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, cfg.block_m, num_experts)
    kw = dict(fmt=fmt, bits=bits, group_size=group_size, checkpoint_format=checkpoint_format, config=cfg)
    align = (sorted_ids, expert_ids, num_padded)
    parts = [fused_moe_gemm_triton(x, s, None, *align, top_k=top_k, a_per_pair=False, **kw) for s in gate_up]
    h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [T * k, 2 I]
    gate, up = h.chunk(2, dim=-1)
    inter = (activation(gate) * up).contiguous()  # [T * k, I]
    y = fused_moe_gemm_triton(inter, down, topk_weights.to(torch.float32), *align, top_k=top_k,
                              a_per_pair=True, **kw)  # fmt: skip  # [T * k, H], weighted
    return y.view(tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)
