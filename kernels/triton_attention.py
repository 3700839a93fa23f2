"""Paged attention over the engine's block-table KV cache, and the cache write (Triton).

Cache layout: key_cache / value_cache [num_blocks, block_size, KVH, D], contiguous; the flat slot of a
token is block_id * block_size + offset. Each kernel finds a key's block through the sequence's block
table one key at a time, so its key tile (BLOCK_N) is independent of the cache block size (8..128).

decode:  one program per (sequence, kv head, context slice) serves all H / KVH query heads of that kv
         head, so each K/V block is read once per kv head (GQA); the query heads are padded to 16 rows
         for tl.dot. Small batches split long contexts into slices merged by a second kernel
         (flash-decoding), so a single sequence still fills the GPU.
prefill: one program per (sequence, kv head, BLOCK_M // GROUP query tokens) serves those tokens for
         all query heads of the kv head (rows are (token, head) pairs), so K/V is read once per kv
         head; queries are the last q_len positions of the context, with a bottom-right causal mask.
         It serves decodes in a mixed batch; the engine passes the longest chunk (max_query_len) from
         the scheduler, so sizing the grid needs no device-to-host copy.
Sliding-window attention (Gemma 3's local layers, Mistral): with `window`, a query at position p sees
only keys > p - window; both kernels start at the key tile holding the first visible key.
Softmax is online (running max and sum in fp32), as in FlashAttention.

Importing this module needs triton. On CPU tensors it only runs under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qserve.kernels.triton_common import dot_operands


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    ROW: tl.constexpr, ROW_PAD: tl.constexpr,
):  # fmt: skip
    """Copy token t's [KVH * D] key and value row to its cache slot; slot -1 (padding) is skipped."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(key_ptr + t * ROW + offs, mask=mask)
        v = tl.load(value_ptr + t * ROW + offs, mask=mask)
        tl.store(key_cache_ptr + slot * ROW + offs, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + slot * ROW + offs, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, ctx, q_pos, window,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SLIDING: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of q [R, D] (pre-scaled) over key positions start..start+BLOCK_N;
    SLIDING: row r sees only keys > q_pos[r] - window."""
    pos = start + tl.arange(0, BLOCK_N)
    in_ctx = pos < ctx
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    d = tl.arange(0, HEAD_DIM_PAD)
    offs = (slot[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]
    kv_mask = in_ctx[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)  # [R, BLOCK_N] fp32
    visible = in_ctx[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    if SLIDING:
        visible = visible & (pos[None, :] > q_pos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if SLIDING:
        # a row whose window starts past this tile has seen no key yet (m = -inf): subtract 0
        # instead, so its p and alpha are exp(-inf) = 0, not NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    # without a window every row sees position 0 in the first tile, so m_new is finite from the start
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale, max_blocks, window,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Attention of q [S, H, D] (one token per sequence) for the heads of one kv head over one of
    NUM_SPLITS slices of the context (SLIDING: of its last `window` positions, from the key tile that
    holds the first of them). One slice writes out; several write fp32 partials (running max m, sum
    l, unnormalised acc) that _combine_splits_kernel merges."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + seq)
    r = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    head = kv_head * GROUP + r
    offs = (seq * NUM_KV_HEADS * GROUP + head[:, None]) * HEAD_DIM + d[None, :]
    mask = (r[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = (tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale).to(DOT_DTYPE)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), dtype=tl.float32)
    q_pos = tl.zeros((GROUP_PAD,), dtype=tl.int32) + ctx - 1
    lo = 0
    if SLIDING:  # the key tile holding position ctx - window: earlier tiles are invisible
        lo = tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N
    span = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole key tiles per slice
    first = lo + split * span
    for start in range(first, tl.minimum(ctx, first + span), BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq.to(tl.int64) * max_blocks,
            kv_head, start, ctx, q_pos, window, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N,
            False, SLIDING, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    if NUM_SPLITS == 1:
        tl.store(out_ptr + offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # an empty slice (past a short context) leaves m = -inf, l = 0, acc = 0: weight 0 when merged
        row = (seq * NUM_KV_HEADS * GROUP + head) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=r[:, None] < GROUP)
        tl.store(part_ml_ptr + row * 2, m_i, mask=r < GROUP)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=r < GROUP)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """out[seq, head] from the NUM_SPLITS partial softmaxes of one (sequence, head): program (seq * H + head)."""
    pid = tl.program_id(0)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    rows = pid * NUM_SPLITS + sp
    valid = sp < NUM_SPLITS
    m = tl.load(part_ml_ptr + rows * 2, mask=valid, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + rows * 2 + 1, mask=valid, other=0.0)
    acc = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM_PAD + d[None, :], mask=valid[:, None], other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))  # slice 0 is never empty, so the max is finite
    o = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l_part, axis=0)
    tl.store(out_ptr + pid * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr, scale,
    max_blocks, window,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out for BLOCK_M // GROUP query tokens of one sequence and all GROUP query heads of one kv head;
    q/out [T, H, D]. Rows are (token, head) pairs, token-major, so each K/V tile is read once for the
    whole group: a decode in a mixed batch reads its context once per kv head, not once per query head."""
    GROUP: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per program (BLOCK_M >= GROUP)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = tl.program_id(2) * TOKENS
    if first < q_len:  # the grid is sized for the longest chunk; shorter ones have idle programs
        ctx = tl.load(seq_lens_ptr + seq)
        r = tl.arange(0, BLOCK_M)
        tok = first + r // GROUP
        head = kv_head * GROUP + r % GROUP
        d = tl.arange(0, HEAD_DIM_PAD)
        offs = ((q_start + tok[:, None]).to(tl.int64) * NUM_HEADS + head[:, None]) * HEAD_DIM + d[None, :]
        row_ok = (r < TOKENS * GROUP) & (tok < q_len)
        mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
        q = (tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale).to(DOT_DTYPE)
        # absolute position of each row's token; padding rows sit past the chunk and see every key
        # up to `end`, so their softmax stays finite (they are never stored)
        q_pos = ctx - q_len + tok
        end = ctx
        if CAUSAL:  # keys after this program's last query token are invisible to all of its rows
            end = tl.minimum(ctx, ctx - q_len + first + TOKENS)
        lo = 0
        if SLIDING:  # keys before the first token's window are invisible to all of its rows
            lo = tl.maximum(ctx - q_len + first - window + 1, 0) // BLOCK_N * BLOCK_N
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=tl.float32)
        for start in range(lo, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq.to(tl.int64) * max_blocks,
                kv_head, start, ctx, q_pos, window, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N,
                CAUSAL, SLIDING, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
        if SLIDING:  # a padding row past the chunk may have seen no key at all (it is never stored)
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(out_ptr + offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


# Cache block sizes the kernels accept (a key's block is found with a shift and a mask); the engine
# refuses others at start-up on CUDA (serve/config.py).
BLOCK_SIZES = (8, 16, 32, 64, 128)


def write_kv_meta(num_kv_heads: int, head_dim: int) -> dict:
    """Constexprs of _write_kv_kernel."""
    row = num_kv_heads * head_dim
    return {"ROW": row, "ROW_PAD": triton.next_power_of_2(row)}


def decode_meta(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, num_splits: int, sliding: bool = False
) -> dict:
    """Constexprs of _decode_kernel (less the dot operand dtype) for one cache and head layout."""
    group = num_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    return {
        "NUM_KV_HEADS": num_kv_heads, "GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group)),
        "HEAD_DIM": head_dim, "HEAD_DIM_PAD": head_dim_pad, "BLOCK_SIZE": block_size,
        "BLOCK_N": 64 if head_dim_pad <= 128 else 32, "NUM_SPLITS": num_splits, "SLIDING": sliding,
    }  # fmt: skip


def combine_meta(head_dim: int, num_splits: int) -> dict:
    """Constexprs of _combine_splits_kernel."""
    return {
        "HEAD_DIM": head_dim, "HEAD_DIM_PAD": triton.next_power_of_2(head_dim), "NUM_SPLITS": num_splits,
        "SPLITS_PAD": triton.next_power_of_2(num_splits),
    }  # fmt: skip


def prefill_meta(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, max_query_len: int, causal: bool,
    sliding: bool = False,
) -> dict:  # fmt: skip
    """Constexprs of _prefill_kernel (less the dot operand dtype). BLOCK_M rows hold BLOCK_M // GROUP
    query tokens of one kv head's GROUP query heads: 64 for long chunks, 16 (tl.dot's minimum) when
    the longest chunk is short, and never fewer than GROUP."""
    head_dim_pad = triton.next_power_of_2(head_dim)
    group = num_heads // num_kv_heads
    block_m = max(64 if max_query_len > 32 else 16, triton.next_power_of_2(group))
    return {
        "NUM_HEADS": num_heads, "NUM_KV_HEADS": num_kv_heads, "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": head_dim_pad, "BLOCK_SIZE": block_size, "BLOCK_M": block_m,
        # 64 keys per tile only for small tiles: BLOCK_M 64 x BLOCK_N 64 at head dim 64 spills on sm_80
        # (compile check: 168 registers, 8 B stack); 32 keys fit every arch without spills
        "BLOCK_N": 64 if head_dim_pad <= 64 and block_m <= 16 else 32, "CAUSAL": causal, "SLIDING": sliding,
    }  # fmt: skip


def prefill_warps(head_dim: int) -> int:
    """num_warps of _prefill_kernel launches: 8 for heads wider than 128 (Gemma 3's 256), where the
    64-row tile's fp32 accumulator spilled at 4 warps (compile check: 80-120 B of stack at 255
    registers on sm_80/89) and fits at 8 without spills."""
    return 8 if triton.next_power_of_2(head_dim) > 128 else 4


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("paged KV caches must be contiguous [num_blocks, block_size, KVH, D] tensors")
    block_size = key_cache.shape[1]
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"cache block_size must be one of {BLOCK_SIZES} (powers of two in 8..128), got {block_size}")


def write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping) -> None:
    """key/value [T, KVH, D] -> caches at flat slots slot_mapping [T]; -1 skips the token."""
    _check_cache(key_cache, value_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key.contiguous(), value.contiguous(), key_cache, value_cache, slot_mapping.contiguous(),
        **write_kv_meta(key_cache.shape[2], key_cache.shape[3]),
    )  # fmt: skip


def decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many context slices each (sequence, kv head) is cut into. A decode batch with fewer
    (sequence, kv head) pairs than SMs would leave most of the GPU idle (one sequence of Llama-3-8B
    has 8), so long contexts are split until about two programs run per SM; slices keep >= 4 key
    tiles so the merge stays cheap next to the attention itself."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    pairs = num_seqs * num_kv_heads
    if pairs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, pairs), triton.cdiv(max_context, 256), 16))


def paged_attention_decode_triton(
    q, key_cache, value_cache, block_tables, seq_lens, scale, *, out: torch.Tensor | None = None,
    num_splits: int | None = None, window: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [S, H, D] (one token per sequence) -> [S, H, D], into `out` when given; `num_splits` pins
    the context split (tests), else `decode_splits` picks it without a host sync; `window`: each
    query sees only the last `window` positions (sliding-window attention)."""
    _check_cache(key_cache, value_cache)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    # the kernels index out as contiguous [T, H, D]; empty_like would copy a strided q's layout
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if num_seqs == 0:
        return out
    dot_dtype, precision = dot_operands(q.dtype, q.device)
    head_dim_pad = triton.next_power_of_2(head_dim)
    if num_splits is None:  # the block table width bounds every context: no sync needed
        longest = block_tables.shape[1] * block_size
        num_splits = decode_splits(num_seqs, num_kv_heads, min(longest, window or longest), q.device)
    part_acc = part_ml = out  # placeholders: unused when there is one split
    if num_splits > 1:
        part_acc = torch.empty((num_seqs * num_heads * num_splits, head_dim_pad), device=q.device)
        part_ml = torch.empty((num_seqs * num_heads * num_splits, 2), device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q.contiguous(), key_cache, value_cache, block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), out, part_acc, part_ml, scale, block_tables.shape[1], window or 0,
        **decode_meta(num_heads, num_kv_heads, head_dim, block_size, num_splits, window is not None),
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
    )  # fmt: skip
    if num_splits > 1:
        _combine_splits_kernel[(num_seqs * num_heads,)](
            part_acc, part_ml, out, **combine_meta(head_dim, num_splits)
        )
    return out


def paged_attention_prefill_triton(
    q, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, *, causal=True,
    max_query_len: int | None = None, out: torch.Tensor | None = None, window: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Mixed batch: q [T, H, D] concatenated per sequence; see `qserve.kernels.paged_attention`."""
    _check_cache(key_cache, value_cache)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    # the kernels index out as contiguous [T, H, D]; empty_like would copy a strided q's layout
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:  # one host sync; callers that know it (the scheduler does) pass it
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    dot_dtype, precision = dot_operands(q.dtype, q.device)
    meta = prefill_meta(num_heads, num_kv_heads, head_dim, block_size, max_query_len, causal, window is not None)
    tokens_per_program = meta["BLOCK_M"] // (num_heads // num_kv_heads)
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, tokens_per_program))
    _prefill_kernel[grid](
        q.contiguous(), key_cache, value_cache, block_tables.to(torch.int32).contiguous(),
        query_start_loc.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(), out, scale,
        block_tables.shape[1], window or 0, **meta, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=prefill_warps(head_dim),
    )  # fmt: skip
    return out
