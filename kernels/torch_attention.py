"""Paged attention and KV-cache writes in plain torch: the engine's CPU hot path.

Decodes are batched: sequences are sorted by context length and cut into a few buckets of similar
length, each bucket's blocks are gathered into one padded [S, KVH, L, D] tensor, and one
`scaled_dot_product_attention` call with a padding mask serves the whole bucket. One call for many
sequences is several times faster than one call each, and bucketing keeps the padding small: ShareGPT
prompts run from 4 to ~1000 tokens, so padding all of them to the longest read ~4x the real context.
The gathers write into a per-thread workspace reused across layers and steps: a fresh multi-megabyte
tensor per gather costs more in page faults than the copy itself.

Prefill chunks have many queries each, so they are attended one sequence at a time without padding
waste, with an explicit bottom-right causal mask (the queries are the last q_len positions). GQA folds
each kv head's query heads into the query dim, so K/V are never repeated per query head.

Whole blocks are read, including the unwritten tail of a sequence's last block, and masked: cache
memory must hold finite values (the engine allocates it with torch.zeros; stale K/V are fine), since
a NaN there would survive the mask (0 * NaN). The Triton kernels never load those slots.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from qserve.kernels import cpu_ext


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim] rotated by position: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter key/value [T, KVH, D] into caches [num_blocks, block_size, KVH, D] at flat slots; -1 skips."""
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        key, value, slots = key[valid], value[valid], slots[valid]
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    # views, not copies: the caches are allocated contiguous, so a flat slot index addresses them directly
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(value_cache.dtype))


class _Workspace(threading.local):
    """Per-thread scratch memory for the decode gathers, grown on demand and reused."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
        numel = math.prod(shape)
        key = (dtype, device, slot)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            # grow by half again so a slowly lengthening batch does not reallocate every step
            buf = torch.empty(max(numel, numel * 3 // 2), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:numel].view(shape)


_workspace = _Workspace()


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, slot: int | None = None) -> torch.Tensor:
    """Rows of the given blocks, in order: block_ids [..., nb] -> [..., KVH, nb * block_size, D].

    Whole blocks are copied (block_size * KVH * D contiguous elements each), which is several times
    faster than gathering token rows one by one; positions past a sequence's end are masked by callers.
    With `slot`, the rows land in workspace buffer `slot` (valid until the next gather into it).
    """
    _, block_size, num_kv_heads, head_dim = cache.shape
    lead = block_ids.shape[:-1]
    # padding entries (-1 or stale ids) are clamped into range; callers mask the positions they cover
    flat = block_ids.reshape(-1).long().clamp(0, cache.shape[0] - 1)
    if slot is None:
        rows = cache.index_select(0, flat)
    else:
        out = _workspace.get((flat.numel(), *cache.shape[1:]), cache.dtype, cache.device, slot)
        rows = torch.index_select(cache, 0, flat, out=out)
    rows = rows.view(*lead, block_ids.shape[-1] * block_size, num_kv_heads, head_dim)
    return rows.transpose(-3, -2)


# A bucket may hold at most this many gathered blocks per block of real context (the padding ratio).
MAX_DECODE_PADDING = 1.25


def decode_buckets(num_blocks: list[int], max_padding: float = MAX_DECODE_PADDING) -> list[list[int]]:
    """Group sequences (by index) so each group's padded size count * max(blocks) stays within
    `max_padding` of its real size sum(blocks). Longest first; every index appears exactly once."""
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__, reverse=True)
    buckets: list[list[int]] = []
    i = 0
    while i < len(order):
        widest = num_blocks[order[i]]
        bucket, real = [order[i]], widest
        i += 1
        while i < len(order) and (len(bucket) + 1) * widest <= max_padding * (real + num_blocks[order[i]]):
            bucket.append(order[i])
            real += num_blocks[order[i]]
            i += 1
        buckets.append(bucket)
    return buckets


def _decode_padded(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_blocks: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q [S, H, D] over contexts padded to `num_blocks` blocks: one SDPA call. With `window`, each
    query sees only the last `window` positions of its context."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    ids = block_tables[:, :num_blocks]  # padding entries are clamped, then masked
    if num_seqs == 1:  # batch-1 decode: gather only the blocks it reads, cut instead of masking
        length = int(seq_lens[0])
        first = 0 if window is None else max(0, length - window) // block_size
        k = _gather_blocks(key_cache, ids[:, first:], slot=0).to(q.dtype)  # [1, KVH, L, D]
        v = _gather_blocks(value_cache, ids[:, first:], slot=1).to(q.dtype)
        lo = 0 if window is None else max(0, length - window) - first * block_size
        k, v, valid = k[:, :, lo : length - first * block_size], v[:, :, lo : length - first * block_size], None
    else:
        k = _gather_blocks(key_cache, ids, slot=0).to(q.dtype)  # [S, KVH, L, D]
        v = _gather_blocks(value_cache, ids, slot=1).to(q.dtype)
        pos = torch.arange(num_blocks * block_size, device=q.device)
        lens = seq_lens.long()[:, None]
        valid = pos[None, :] < lens
        if window is not None:
            valid &= pos[None, :] >= lens - window
        valid = valid[:, None, None, :]  # [S, 1, 1, L]
    # A decode has no causal structure among its query heads, so the G = H / KVH heads that share a kv
    # head ride in SDPA's query-length dim: [S, H, D] -> [S, KVH, G, D]. This is GQA without repeating
    # K/V, and measured faster on CPU than SDPA's enable_gqa (which is slow in bf16).
    out = F.scaled_dot_product_attention(
        q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim),
        k,
        v,
        attn_mask=valid,
        scale=scale,
    )
    return out.reshape(num_seqs, num_heads, head_dim)


def _cpp_decode_takes(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """The C++ decode kernel reads fp32 or bf16 caches (both alike) with an fp32 or bf16 q, on the CPU."""
    kinds = (torch.float32, torch.bfloat16)
    return (
        q.dtype in kinds
        and key_cache.dtype in kinds
        and value_cache.dtype == key_cache.dtype
        and all(t.device.type == "cpu" and t.is_contiguous() for t in (q, key_cache, value_cache))
        and cpu_ext.available()
    )


def paged_decode_torch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [S, H, D] -> [S, H, D], in length buckets of padded SDPA calls.
    With `window` (sliding-window attention), a query sees only the last `window` positions.

    In fp32 or bf16 with qserve's C++ kernels built, they read the blocks in place instead (no gathers, no
    padding); measured at batch 1 (SmolLM2's heads, 100-token context, 2 threads, one call):
    49 us this way, 14 us through the C++ kernel. The C++ kernel attends to the whole context, so a
    window shorter than some context takes the torch path.
    """
    if q.shape[0] == 0:
        return torch.empty_like(q)
    q = q.contiguous()
    if window is not None and int(seq_lens.max()) <= window:
        window = None  # every context fits its window: plain causal attention
    if window is None and _cpp_decode_takes(q, key_cache, value_cache):
        return cpu_ext.paged_decode(
            q,
            key_cache,
            value_cache,
            block_tables.to(torch.int32).contiguous(),
            seq_lens.to(torch.int32).contiguous(),
            float(scale),
        )
    block_size = key_cache.shape[1]
    blocks = [-(-n // block_size) for n in seq_lens.tolist()]
    buckets = decode_buckets(blocks)
    if len(buckets) == 1:
        return _decode_padded(q, key_cache, value_cache, block_tables, seq_lens, max(blocks), scale, window)
    out = torch.empty_like(q)
    for bucket in buckets:
        idx = torch.tensor(bucket, device=q.device)
        out[idx] = _decode_padded(
            q[idx], key_cache, value_cache, block_tables[idx], seq_lens[idx], blocks[bucket[0]], scale, window
        )
    return out


def _attend_one(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    causal: bool,
    window: int | None = None,
) -> torch.Tensor:
    """q [q_len, H, D], the last q_len of context_len positions, over one sequence's cache; with
    `window` each query sees only the last `window` positions up to its own."""
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-context_len // block_size)
    # keys before the first query's window are read by no query: skip their whole blocks
    first = 0 if window is None else max(0, context_len - q_len - window + 1) // block_size
    start = first * block_size  # position of the first gathered key
    k = _gather_blocks(key_cache, block_table[first:num_blocks])[:, : context_len - start].to(q.dtype)
    v = _gather_blocks(value_cache, block_table[first:num_blocks])[:, : context_len - start].to(q.dtype)
    # [q_len, H, D] -> [KVH, G * q_len, D]: fold the query heads of a kv head into the query dim (GQA)
    qf = (
        q.reshape(q_len, num_kv_heads, group, head_dim)
        .permute(1, 2, 0, 3)
        .reshape(num_kv_heads, -1, head_dim)
    )
    mask = None
    if (causal and q_len > 1) or window is not None:
        # SDPA's is_causal aligns the mask top-left; chunked prefill needs it bottom-right (the queries
        # are the last q_len positions), so the mask is explicit, repeated for each folded head.
        q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        key_pos = torch.arange(start, context_len, device=q.device)[None, :]
        mask = key_pos <= q_pos[:, None] if causal else torch.ones_like(key_pos, dtype=torch.bool)
        if window is not None:
            mask = mask & (key_pos > q_pos[:, None] - window)  # [q_len, ctx - start]
        mask = mask.repeat(group, 1)  # [G * q_len, ctx - start]
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)  # [KVH, G * q_len, D]
    return (
        out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
    )


def paged_attention_torch(
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
    """Mixed batch of prefill chunks and decodes; same contract as `qserve.kernels.paged_attention`."""
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    is_decode = q_lens == 1
    if bool(is_decode.all()):
        return paged_decode_torch(q, key_cache, value_cache, block_tables, seq_lens, scale, window)
    q = q.contiguous()
    if causal and window is None and q.shape[0] and _cpp_decode_takes(q, key_cache, value_cache):
        # The whole mixed batch in one C++ call, blocks read in place, each query over its causal prefix.
        # SmolLM2's heads, bf16, 2 threads, one layer (AMX machine, 2026-12-03): a 1000-token prompt
        # 84-110 ms through the SDPA calls below, 19-23 ms this way (27 with one query per task instead of
        # blocks of 16); 300 tokens 7-11 vs 1.7-1.9 ms; 83 tokens 0.7-1.3 vs 0.20.
        return cpu_ext.paged_prefill(
            q,
            key_cache,
            value_cache,
            block_tables.to(torch.int32).contiguous(),
            query_start_loc.to(torch.int32).contiguous(),
            seq_lens.to(torch.int32).contiguous(),
            float(scale),
        )
    out = torch.empty_like(q)
    decode_ids = torch.nonzero(is_decode).flatten()
    if decode_ids.numel():
        rows = starts[decode_ids]  # token index of each decode's single query
        out[rows] = paged_decode_torch(
            q[rows], key_cache, value_cache, block_tables[decode_ids], seq_lens[decode_ids], scale, window
        )
    start_list, len_list = starts.tolist(), seq_lens.tolist()
    for i in torch.nonzero(~is_decode).flatten().tolist():
        lo, hi = start_list[i], start_list[i + 1]
        if hi > lo:
            out[lo:hi] = _attend_one(
                q[lo:hi], key_cache, value_cache, block_tables[i], len_list[i], scale, causal, window
            )
    return out
