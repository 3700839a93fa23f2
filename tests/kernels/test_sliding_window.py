"""Sliding-window paged attention (a query at position p sees keys > p - window, as transformers masks
it): the reference against dense attention, the CPU torch path and the Triton kernels against the
reference, with junk (NaN where the kernel must not even read) in every cache slot no token owns."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TRITON_DEVICES
from test_paged_attention import attention_tolerances, make_batch

from qserve.kernels import paged_attention, paged_attention_decode
from qserve.kernels.reference import paged_attention_reference

triton_attention = pytest.importorskip("qserve.kernels.triton_attention", reason="triton is not installed")

# (context, q_len): a prefill longer than the window, a decode far past it, a chunk continuing a cached
# prefix (its first query's window starts blocks in), a decode inside the window, a short prefill
MIXED = [(40, 40), (77, 1), (70, 20), (5, 1), (9, 9)]
DECODES = [(40, 1), (77, 1), (8, 1), (1, 1), (23, 1)]


def dense_window(q, k, v, scale, window):
    """q [q_len, H, D] = the last q_len positions of k/v [ctx, KVH, D], causal and windowed, fp32."""
    group = q.shape[1] // k.shape[1]
    ctx, q_len = k.shape[0], q.shape[0]
    k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, q_len, ctx]
    key, query = torch.arange(ctx)[None, :], torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill((key > query) | (key <= query - window), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def test_reference_window_matches_dense(gen):
    ctx, window, heads, kv_heads, dim = 30, 7, 4, 2, 16
    b = make_batch([(ctx, 12)], heads, kv_heads, dim, 8, torch.float32, gen, junk=1e4)
    flat = lambda cache: cache[b.block_tables[0, :4].long()].reshape(-1, kv_heads, dim)[:ctx]
    want = dense_window(b.q, flat(b.key_cache), flat(b.value_cache), b.scale, window)
    torch.testing.assert_close(
        paged_attention_reference(*b.args(), window=window), want, rtol=1e-5, atol=1e-5
    )
    # a window covering every context changes nothing; window 1 sees only the token itself
    torch.testing.assert_close(
        paged_attention_reference(*b.args(), window=ctx), b.expected, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        paged_attention_reference(*b.args(), window=1)[-1],
        flat(b.value_cache)[-1].repeat_interleave(heads // kv_heads, dim=0),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(("block_size", "dtype", "window"), [(8, torch.float32, 8), (16, torch.bfloat16, 13)])
@pytest.mark.parametrize("specs", [MIXED, DECODES, DECODES[:1]], ids=["mixed", "decodes", "batch1"])
def test_torch_path_honours_the_window(block_size, dtype, window, specs, gen):
    # the torch path reads whole blocks and masks (cache memory must be finite there): large junk in
    # every slot no token owns shows any slot the mask lets through
    b = make_batch(specs, 6, 2, 32, block_size, dtype, gen, junk=1e4)
    want = paged_attention_reference(*b.args(), window=window)
    got = paged_attention(*b.args(), window=window)
    torch.testing.assert_close(got.float(), want.float(), **attention_tolerances(dtype))
    if specs is DECODES:
        got = paged_attention_decode(b.q, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale,
                                     window=window)  # fmt: skip
        torch.testing.assert_close(got.float(), want.float(), **attention_tolerances(dtype))


def test_window_past_every_context_is_full_attention(gen):
    """fp32 decodes (the C++ kernel's case when it is built) with a window no context exceeds."""
    b = make_batch(DECODES, 4, 4, 16, 8, torch.float32, gen, junk=0.0)
    torch.testing.assert_close(paged_attention(*b.args(), window=100), b.expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="window must be a positive number"):
        paged_attention(*b.args(), window=0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("block_size", "dtype", "heads", "kv_heads", "window"),
                         [(8, torch.float16, 6, 2, 8), (16, torch.bfloat16, 4, 1, 21)])  # fmt: skip
def test_triton_prefill_honours_the_window(block_size, dtype, heads, kv_heads, window, device, gen):
    b = make_batch(MIXED, heads, kv_heads, 32, block_size, dtype, gen, junk=float("nan"), device=device)
    want = paged_attention_reference(*(a.cpu() if torch.is_tensor(a) else a for a in b.args()), window=window)
    got = triton_attention.paged_attention_prefill_triton(*b.args(), window=window)
    torch.testing.assert_close(got.float().cpu(), want.float(), **attention_tolerances(dtype))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_honours_the_window(splits, device, gen):
    b = make_batch(DECODES, 8, 2, 64, 8, torch.float16, gen, junk=float("nan"), device=device)
    window = 10
    want = paged_attention_reference(*(a.cpu() if torch.is_tensor(a) else a for a in b.args()), window=window)
    got = triton_attention.paged_attention_decode_triton(
        b.q, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale, num_splits=splits, window=window
    )
    torch.testing.assert_close(got.float().cpu(), want.float(), **attention_tolerances(torch.float16))
