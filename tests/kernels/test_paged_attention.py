"""Paged attention and KV-cache writes (Triton kernels and torch paths) vs dense causal attention."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_testing import HAS_CUDA, TRITON_DEVICES

from qserve.kernels import cpu_ext, paged_attention, paged_attention_decode, write_kv_cache
from qserve.kernels.reference import paged_attention_reference, write_kv_cache_reference
from qserve.kernels.torch_attention import decode_buckets

triton_attention = pytest.importorskip("qserve.kernels.triton_attention", reason="triton is not installed")


def attention_tolerances(dtype: torch.dtype) -> dict:
    # Outputs are convex mixes of V entries of size ~1. The kernels round the pre-scaled q and the
    # softmax weights to the dot dtype and the output to q.dtype, each worth up to an ulp of an O(1)
    # value (the interpreter's bf16 cast truncates), so 4 ulps of the dtype, absolute and relative.
    # Attending to one wrong or missing key changes outputs by O(1 / context), far above that.
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}[dtype]
    return {"rtol": 4 * eps, "atol": 4 * eps}


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [S, max_blocks], -1 padded
    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    expected: torch.Tensor  # dense causal attention, fp32 [T, H, D]
    scale: float

    def args(self):
        return (self.q, self.key_cache, self.value_cache, self.block_tables, self.query_start_loc,
                self.seq_lens, self.scale)  # fmt: skip


def dense_attention(q, k, v, scale, causal=True):
    """q [q_len, H, D] = the last q_len positions of k/v [ctx, KVH, D]; plain fp32 softmax attention."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]; head h reads kv h // group
    v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, q_len, ctx]
    if causal:
        ctx, q_len = k.shape[1], q.shape[0]
        hidden = torch.arange(ctx)[None, :] > torch.arange(ctx - q_len, ctx)[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def make_batch(specs, heads, kv_heads, head_dim, block_size, dtype, gen, *, junk, device="cpu", causal=True):
    """Sequences (context, q_len) whose blocks are scattered in random order over a cache that holds
    `junk` in every slot no token was written to (unused blocks and the tails of last blocks)."""
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in specs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that no sequence owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache, value_cache = torch.full(shape, junk, dtype=dtype), torch.full(shape, junk, dtype=dtype)
    tables = torch.full((len(specs), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    qs, expected = [], []
    for i, (ctx, q_len) in enumerate(specs):
        own = [order.pop() for _ in range(blocks_per_seq[i])]
        tables[i, : len(own)] = torch.tensor(own, dtype=torch.int32)
        k = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(ctx)
        slots = tables[i].long()[pos // block_size] * block_size + pos % block_size
        write_kv_cache_reference(k, v, key_cache, value_cache, slots)
        q = torch.randn(q_len, heads, head_dim, generator=gen).to(dtype)
        qs.append(q)
        expected.append(dense_attention(q, k, v, head_dim**-0.5, causal))
    q_lens = torch.tensor([q_len for _, q_len in specs])
    return Batch(
        q=torch.cat(qs).to(device),
        key_cache=key_cache.to(device),
        value_cache=value_cache.to(device),
        block_tables=tables.to(device),
        query_start_loc=torch.cat([torch.zeros(1), q_lens.cumsum(0)]).to(device=device, dtype=torch.int32),
        seq_lens=torch.tensor([ctx for ctx, _ in specs], dtype=torch.int32, device=device),
        expected=torch.cat(expected),
        scale=head_dim**-0.5,
    )


# full prefill, decode, chunk continuing a cached prefix, exactly one full block, decode at a block edge
MIXED = [(37, 37), (5, 1), (70, 20), (16, 16), (33, 1)]
DECODES = [(1, 1), (16, 1), (77, 1), (40, 1)]
# (block_size, dtype, heads, kv_heads, head_dim): GQA with a non-power-of-two group, MQA, MHA with a
# head dim that is not a power of two; block sizes at both ends of 8..128
SHAPES = [
    (8, torch.float16, 6, 2, 32),
    (16, torch.bfloat16, 8, 1, 64),
    (128, torch.float32, 4, 4, 48),
]


def test_reference_matches_dense_attention(gen):
    b = make_batch(MIXED, 6, 2, 32, 8, torch.float32, gen, junk=1e4)
    torch.testing.assert_close(
        paged_attention_reference(*b.args()), b.expected, **attention_tolerances(torch.float32)
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("block_size", "dtype", "heads", "kv_heads", "head_dim"), SHAPES)
def test_triton_prefill_kernel_on_mixed_batch(block_size, dtype, heads, kv_heads, head_dim, device, gen):
    # NaN in every unwritten slot: a kernel that reads past a context or into a foreign block fails
    b = make_batch(MIXED, heads, kv_heads, head_dim, block_size, dtype, gen, junk=float("nan"), device=device)
    out = torch.full_like(b.q, float("nan"))
    got = triton_attention.paged_attention_prefill_triton(*b.args(), out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.float().cpu(), b.expected, **attention_tolerances(dtype))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_prefill_kernel_without_causal_mask(device, gen):
    b = make_batch(
        [(30, 12), (9, 9)], 4, 2, 32, 8, torch.float16, gen, junk=float("nan"), device=device, causal=False
    )
    # q stored head-major ([H, T, D] memory seen as [T, H, D]): the kernels read and write dense
    # [T, H, D], so the output must not inherit q's strides
    strided_q = b.q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided_q.is_contiguous()
    got = triton_attention.paged_attention_prefill_triton(strided_q, *b.args()[1:], causal=False)
    torch.testing.assert_close(got.float().cpu(), b.expected, **attention_tolerances(torch.float16))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("block_size", "dtype", "heads", "kv_heads", "head_dim", "splits"),
    # context slices (flash-decoding): with 2-3 slices the short contexts leave slices empty and the
    # 77-token one is merged from two partial softmaxes
    [(*shape, splits) for shape, splits in zip(SHAPES, [1, 3, 2], strict=True)],
)
def test_triton_decode_kernel(block_size, dtype, heads, kv_heads, head_dim, splits, device, gen):
    b = make_batch(
        DECODES, heads, kv_heads, head_dim, block_size, dtype, gen, junk=float("nan"), device=device
    )
    out = torch.full_like(b.q, float("nan"))
    got = triton_attention.paged_attention_decode_triton(
        b.q, b.key_cache, b.value_cache, b.block_tables, b.seq_lens, b.scale, out=out, num_splits=splits
    )
    torch.testing.assert_close(got.float().cpu(), b.expected, **attention_tolerances(dtype))


@pytest.fixture(params=["ext", "torch"])
def cpu_path(request, monkeypatch):
    """Run a CPU test through qserve's C++ decode kernel (fp32, when built) and through plain torch."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_ext, "available", lambda: False)
    elif not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    return request.param


@pytest.mark.parametrize(("block_size", "dtype", "heads", "kv_heads", "head_dim"), SHAPES)
def test_public_cpu_paths(block_size, dtype, heads, kv_heads, head_dim, gen, cpu_path):
    # The torch path gathers whole blocks and masks the tail, so unwritten slots need finite values
    # (caches are allocated zeroed); 1e4 there would dominate any softmax that failed to mask them.
    b = make_batch(MIXED, heads, kv_heads, head_dim, block_size, dtype, gen, junk=1e4)
    tol = attention_tolerances(dtype)
    torch.testing.assert_close(paged_attention(*b.args()).float(), b.expected, **tol)
    d = make_batch(DECODES, heads, kv_heads, head_dim, block_size, dtype, gen, junk=1e4)
    torch.testing.assert_close(paged_attention(*d.args()).float(), d.expected, **tol)
    got = paged_attention_decode(d.q, d.key_cache, d.value_cache, d.block_tables, d.seq_lens, d.scale)
    torch.testing.assert_close(got.float(), d.expected, **tol)


def test_cpu_decode_buckets_ragged_batches(gen, cpu_path):
    # ShareGPT-like spread (1 to 300 tokens) splits into several length buckets; the calls reuse the
    # gather workspace with different sizes, so stale rows from a larger earlier call must not leak.
    tol = attention_tolerances(torch.float32)
    for n in (40, 3, 17):
        lens = torch.randint(1, 300, (n,), generator=gen).tolist()
        d = make_batch([(c, 1) for c in lens], 9, 3, 64, 16, torch.float32, gen, junk=1e4)
        blocks = [-(-c // 16) for c in lens]
        if n == 40 and cpu_path == "torch":
            assert len(decode_buckets(blocks)) > 1  # the test really exercises several buckets
        got = paged_attention_decode(d.q, d.key_cache, d.value_cache, d.block_tables, d.seq_lens, d.scale)
        torch.testing.assert_close(got, d.expected, **tol)


@pytest.mark.parametrize("ctx", [1, 16, 45])
def test_cpu_single_sequence_decode(ctx, gen, cpu_path):
    # batch-1 decode cuts the context to its length instead of masking: junk past it must not count
    d = make_batch([(ctx, 1)], 6, 2, 32, 16, torch.float32, gen, junk=1e4)
    got = paged_attention(*d.args())
    torch.testing.assert_close(got, d.expected, **attention_tolerances(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("specs", [DECODES, [(300, 1), (1, 1), (129, 1)]])
def test_cpp_decode_reads_only_the_context(specs, dtype, gen):
    # The C++ kernel reads blocks in place and only up to each length, so NaN in every unwritten
    # slot (including the tail of each last block) must not reach the output. bf16 caches (a bf16
    # model's) are read in place too, with fp32 scores and accumulation.
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    d = make_batch(specs, 9, 3, 64, 16, dtype, gen, junk=float("nan"))
    assert d.key_cache.dtype == dtype and d.q.dtype == dtype
    got = cpu_ext.paged_decode(d.q, d.key_cache, d.value_cache, d.block_tables, d.seq_lens, d.scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), d.expected, **attention_tolerances(dtype))


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (8, 1, 64), (32, 8, 128), (6, 2, 256), (6, 2, 48), (70, 1, 64)],
)
def test_cpp_decode_bodies(heads, kv_heads, head_dim, dtype, generic, gen):
    # Head dims 64/128/256 take the register-blocked AVX-512 body where the CPU has it (query heads
    # per kv head 1 to 8 span one or several register blocks); 48, and 70 heads per kv head, always
    # take the generic loop; `generic=True` forces that loop. Contexts cover a partial 16-wide tail.
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    d = make_batch([(300, 1), (1, 1), (17, 1), (129, 1)], heads, kv_heads, head_dim, 16, dtype, gen,
                   junk=float("nan"))  # fmt: skip
    got = torch.ops.qserve_cpu.paged_decode(d.q, d.key_cache, d.value_cache, d.block_tables, d.seq_lens,
                                            d.scale, generic)  # fmt: skip
    torch.testing.assert_close(got.float(), d.expected, **attention_tolerances(dtype))


@pytest.mark.parametrize("path", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (32, 8, 128), (6, 2, 256), (8, 8, 64), (64, 1, 64), (6, 2, 48)]
)
def test_cpp_prefill_mixed_batch(heads, kv_heads, head_dim, dtype, path, gen):
    # Whole prompts, a chunk after a cached prefix, decodes and a long prompt in one call; NaN in every
    # slot no token was written to, so reading past a causal prefix or a context would show. path 0 is
    # the fastest body (AMX tiles for bf16 where the CPU has them: query blocks of 64 / G tokens, so the
    # group sizes 1-64 here cut the chunks differently), 1 the AVX-512 blocks, 2 the generic loop.
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    specs = [(37, 37), (5, 1), (70, 20), (16, 16), (33, 1), (300, 300)]
    b = make_batch(specs, heads, kv_heads, head_dim, 16, dtype, gen, junk=float("nan"))
    got = torch.ops.qserve_cpu.paged_prefill(b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc,
                                             b.seq_lens, b.scale, path)  # fmt: skip
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), b.expected, **attention_tolerances(dtype))


def test_cpp_prefill_takes_amx_tiles_for_bf16_where_the_cpu_has_them(gen):
    # The AMX body rounds the softmax weights to bf16 for P V, so its output differs from the AVX-512
    # body's (fp32 weights) in the last bits: that difference shows it ran; both match the reference.
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    if not torch.ops.qserve_cpu.has_amx_bf16():
        pytest.skip("this CPU has no AMX-BF16 (the AMX body is for Sapphire Rapids and later)")
    b = make_batch([(300, 300), (90, 41), (7, 1)], 9, 3, 64, 16, torch.bfloat16, gen, junk=float("nan"))
    args = (b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens, b.scale)
    amx, avx = torch.ops.qserve_cpu.paged_prefill(*args, 0), torch.ops.qserve_cpu.paged_prefill(*args, 1)
    assert not torch.equal(amx[:341], avx[:341])  # 300 + 41 prompt tokens, then one decode
    torch.testing.assert_close(amx[341:], avx[341:], rtol=0, atol=0)  # the decode: the same body either way
    torch.testing.assert_close(amx.float(), b.expected, **attention_tolerances(torch.bfloat16))


def test_cpp_prefill_rejects_an_unknown_path(gen):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    b = make_batch([(20, 20)], 4, 2, 64, 16, torch.bfloat16, gen, junk=0.0)
    with pytest.raises(RuntimeError, match="path is 0"):
        torch.ops.qserve_cpu.paged_prefill(b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc,
                                           b.seq_lens, b.scale, 3)  # fmt: skip


def test_cpu_mixed_batch_takes_the_cpp_prefill(gen, monkeypatch):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    calls = []
    real = cpu_ext.paged_prefill
    monkeypatch.setattr(cpu_ext, "paged_prefill", lambda *a: calls.append(1) or real(*a))
    b = make_batch(MIXED, 9, 3, 64, 16, torch.bfloat16, gen, junk=0.0)
    torch.testing.assert_close(paged_attention(*b.args()).float(), b.expected, **attention_tolerances(torch.bfloat16))
    assert calls == [1]
    with pytest.raises(RuntimeError, match="queries and length"):
        real(b.q, b.key_cache, b.value_cache, b.block_tables, b.query_start_loc, b.seq_lens - 30, b.scale)


def test_cpp_decode_refuses_mixed_cache_dtypes(gen):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    d = make_batch([(20, 1)], 4, 2, 16, 8, torch.float32, gen, junk=0.0)
    with pytest.raises(RuntimeError, match="both caches alike"):
        cpu_ext.paged_decode(d.q, d.key_cache, d.value_cache.bfloat16(), d.block_tables, d.seq_lens, d.scale)


def test_cpp_decode_rejects_tables_that_point_outside_the_cache(gen):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    d = make_batch([(20, 1)], 4, 2, 16, 8, torch.float32, gen, junk=0.0)
    bad = d.block_tables.clone()
    bad[0, 1] = d.key_cache.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ext.paged_decode(d.q, d.key_cache, d.value_cache, bad, d.seq_lens, d.scale)
    with pytest.raises(RuntimeError, match="length"):
        cpu_ext.paged_decode(d.q, d.key_cache, d.value_cache, d.block_tables, d.seq_lens * 100, d.scale)


def test_decode_buckets_cover_every_sequence_within_the_padding_bound(gen):
    for _ in range(50):
        blocks = torch.randint(1, 64, (int(torch.randint(1, 80, (1,), generator=gen)),), generator=gen).tolist()
        buckets = decode_buckets(blocks, max_padding=1.25)
        assert sorted(i for b in buckets for i in b) == list(range(len(blocks)))
        for b in buckets:
            widest = max(blocks[i] for i in b)
            assert blocks[b[0]] == widest  # the bucket is padded to its first (longest) sequence
            # a bucket either holds one sequence or pads at most 25% over its real blocks
            assert len(b) == 1 or len(b) * widest <= 1.25 * sum(blocks[i] for i in b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("specs", [MIXED, DECODES])
def test_public_cuda_dispatch(specs, gen):
    b = make_batch(specs, 8, 2, 64, 16, torch.float16, gen, junk=float("nan"), device="cuda")
    torch.testing.assert_close(
        paged_attention(*b.args()).float().cpu(), b.expected, **attention_tolerances(torch.float16)
    )


def test_public_cpu_path_never_calls_triton(gen, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU tensor reached a Triton kernel")

    for name in ("paged_attention_decode_triton", "paged_attention_prefill_triton", "write_kv_cache_triton"):
        monkeypatch.setattr(triton_attention, name, refuse)
    b = make_batch(MIXED, 4, 2, 32, 16, torch.float32, gen, junk=0.0)
    paged_attention(*b.args())
    write_kv_cache(b.q[:, :2], b.q[:, :2], b.key_cache, b.value_cache, torch.arange(b.q.shape[0]))


def _kv_write_case(dtype, gen, device):
    num_blocks, block_size, kv_heads, head_dim = 6, 8, 2, 48
    key, value = (torch.randn(7, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    slots = torch.tensor([3, -1, 17, 40, 9, -1, 47])  # -1: padding tokens, skipped
    caches = [
        torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)
    ]
    return key, value, caches, slots


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_cache(dtype, device, gen):
    key, value, (kc, vc), slots = _kv_write_case(dtype, gen, device)
    want_k, want_v = kc.clone(), vc.clone()
    write_kv_cache_reference(key, value, want_k, want_v, slots)
    assert not torch.equal(want_k, kc)  # the case writes something
    got_k, got_v = kc.clone().to(device), vc.clone().to(device)
    triton_attention.write_kv_cache_triton(key.to(device), value.to(device), got_k, got_v, slots.to(device))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
    cpu_k, cpu_v = kc.clone(), vc.clone()
    write_kv_cache(key, value, cpu_k, cpu_v, slots)  # the public torch path
    assert torch.equal(cpu_k, want_k) and torch.equal(cpu_v, want_v)


def test_heads_that_do_not_divide_are_rejected(gen):
    b = make_batch([(5, 1)], 4, 2, 32, 8, torch.float32, gen, junk=0.0)
    with pytest.raises(ValueError, match="multiple of KVH"):
        paged_attention(b.q[:, :3], *b.args()[1:])
