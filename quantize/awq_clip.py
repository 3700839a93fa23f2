"""AWQ's clipping search: per (output row, input group), the |w| bound that best preserves the output.

As in llm-awq's `auto_clip`: candidates shrink the group's max |w| by 0, 1/n_grid, ... up to
`max_shrink`, and each row-group keeps the bound whose quantized weights give the smallest mean
squared error of that group's partial dot products over the calibration tokens.

The error of one row-group e = Q(w) - w [gs] over tokens x_g is mean_t (x_g . e)^2 = e^T G_g e / n with
G_g = sum_t x_g x_g^T, so only the per-group Gram blocks are kept, never the [out, tokens, groups]
products the reference builds (which is why it samples just 512 tokens).
"""

from __future__ import annotations

import torch

from qserve.kernels.packing import effective_group_size, rtn_quantize

# Rows processed at once: bounds the [rows, G, gs] temporaries for wide layers.
_ROW_CHUNK = 2048


def gram_blocks(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Gram matrices sum_t x_g x_g^T of rows [N, in] -> [G, gs, gs] (float32)."""
    n, in_f = rows.shape
    gs = effective_group_size(in_f, group_size)
    x = rows.float().reshape(n, in_f // gs, gs).transpose(0, 1)  # [G, N, gs]
    return x.transpose(1, 2) @ x


def search_clip(
    weight: torch.Tensor,
    grams: torch.Tensor,
    n_tokens: int,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, float, float]:
    """Best clip bound for W [out, in] given its input Gram blocks [G, gs, gs] over n_tokens.

    Returns (max_val [out, G] float32, error with clipping, error without), errors being the mean
    squared partial-output error per row-group summed over row-groups.
    """
    out_f, in_f = weight.shape
    gs = effective_group_size(in_f, group_size)
    n_groups = in_f // gs
    best_val = torch.empty(out_f, n_groups, dtype=torch.float32, device=weight.device)
    best_err = torch.empty_like(best_val)
    base_err = torch.empty_like(best_val)
    for r1 in range(0, out_f, _ROW_CHUNK):
        w = weight[r1 : r1 + _ROW_CHUNK].float()
        org_max = w.reshape(w.shape[0], n_groups, gs).abs().amax(dim=-1)  # [rows, G]
        chunk_best = torch.full_like(org_max, float("inf"))
        chunk_val = org_max.clone()
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            err = _group_error(w, max_val, grams, bits, group_size, sym) / n_tokens
            if step == 0:
                base_err[r1 : r1 + w.shape[0]] = err
            better = err < chunk_best
            chunk_best = torch.where(better, err, chunk_best)
            chunk_val = torch.where(better, max_val, chunk_val)
        best_val[r1 : r1 + w.shape[0]] = chunk_val
        best_err[r1 : r1 + w.shape[0]] = chunk_best
    return best_val, float(best_err.sum()), float(base_err.sum())


def _group_error(w, max_val, grams, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """e^T G_g e for each row-group, e = Q(clip(w)) - w: [rows, G]."""
    rows = w.shape[0]
    n_groups = grams.shape[0]
    q = rtn_quantize(w, bits, group_size, sym, clip_max=max_val).dequantize()
    e = (q - w).reshape(rows, n_groups, -1)  # [rows, G, gs]
    eg = torch.einsum("rgi,gij->rgj", e, grams)
    return (eg * e).sum(dim=-1)
