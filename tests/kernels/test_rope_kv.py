"""`kernels.rope_and_write_kv`: qserve's C++ CPU kernel against the torch path (RoPE + KV-cache write)."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import cpu_ext, rope_and_write_kv, torch_attention


def _case(n, heads, kv_heads, head_dim, gen, num_blocks=6, block_size=4):
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen)
    angles = torch.rand(n, 1, head_dim // 2, generator=gen) * 6.3
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen)
    value_cache = torch.randn(cache_shape, generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::3] = -1  # padding tokens: rotated q, nothing written
    return qkv, angles.cos(), angles.sin(), key_cache, value_cache, slots


@pytest.mark.parametrize(
    ("n", "heads", "kv_heads", "head_dim"), [(1, 9, 3, 64), (7, 4, 4, 48), (20, 8, 1, 16)]
)
def test_cpp_kernel_matches_the_torch_path(n, heads, kv_heads, head_dim, gen, monkeypatch):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    qkv, cos, sin, kc, vc, slots = _case(n, heads, kv_heads, head_dim, gen)
    kc2, vc2 = kc.clone(), vc.clone()
    q = rope_and_write_kv(qkv, cos, sin, kc, vc, slots, heads)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    q_ref = rope_and_write_kv(qkv, cos, sin, kc2, vc2, slots, heads)
    assert q.shape == (n, heads, head_dim)
    # same products, at most one fma contraction apart: an ulp or two of O(1) values
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc, kc2, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc, vc2)  # v is copied, not computed


def test_torch_path_rotates_q_and_k_by_position_and_skips_padding(gen, monkeypatch):
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    qkv, cos, sin, kc, vc, slots = _case(5, 2, 1, 8, gen)
    before = kc.clone()
    q = rope_and_write_kv(qkv, cos, sin, kc, vc, slots, 2)
    x = qkv[:, :16].view(5, 2, 8)
    torch.testing.assert_close(q, torch_attention.apply_rotary(x, cos, sin))
    flat_k = kc.view(-1, 1, 8)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k = torch_attention.apply_rotary(
                qkv[t : t + 1, 16:24].view(1, 1, 8), cos[t : t + 1], sin[t : t + 1]
            )
            torch.testing.assert_close(flat_k[slot], k[0])
            assert torch.equal(vc.view(-1, 1, 8)[slot], qkv[t, 24:32].view(1, 8))
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [i for i in range(flat_k.shape[0]) if i not in written]
    assert torch.equal(flat_k[untouched], before.view(-1, 1, 8)[untouched])


def test_cpp_kernel_rejects_a_slot_outside_the_cache(gen):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    qkv, cos, sin, kc, vc, slots = _case(4, 2, 1, 8, gen)
    slots[1] = kc.shape[0] * kc.shape[1]
    with pytest.raises(RuntimeError, match="outside the cache"):
        rope_and_write_kv(qkv, cos, sin, kc, vc, slots, 2)


@pytest.mark.parametrize("cos_dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernel_bf16_matches_fp32_rope_rounded_once(cos_dtype, gen):
    # bf16 qkv and caches (a bf16 model's): RoPE in fp32 on the bf16 inputs, each output rounded once,
    # so it equals the fp32 kernel on the same (exactly representable) inputs, rounded to bf16.
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    qkv, cos, sin, kc, vc, slots = _case(9, 9, 3, 64, gen)
    qkv, kc, vc = qkv.bfloat16(), kc.bfloat16(), vc.bfloat16()
    cos, sin = cos.to(cos_dtype), sin.to(cos_dtype)
    kc32, vc32 = kc.float(), vc.float()
    q = rope_and_write_kv(qkv, cos, sin, kc, vc, slots, 9)
    q32 = rope_and_write_kv(qkv.float(), cos.float(), sin.float(), kc32, vc32, slots, 9)
    assert q.dtype == torch.bfloat16
    # fp32 results that differ by an fma contraction may round to neighbouring bf16 values
    torch.testing.assert_close(q.float(), q32.bfloat16().float(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(kc.float(), kc32.bfloat16().float(), rtol=2**-7, atol=1e-6)
    assert torch.equal(vc.float(), vc32)
    assert (q.float() == q32.bfloat16().float()).float().mean() > 0.99


@pytest.mark.parametrize("shape", [(1, 576), (33, 64), (4, 3, 128), (5, 100)])
def test_cpp_rms_norm_bf16_matches_the_torch_path(shape, gen, monkeypatch):
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    from qserve.serve.model import RMSNorm

    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight = torch.nn.Parameter((torch.rand(shape[-1], generator=gen) + 0.5).bfloat16(), requires_grad=False)
    x = (torch.randn(shape, generator=gen) * 3).bfloat16()
    calls = []
    real = cpu_ext.rms_norm
    monkeypatch.setattr(cpu_ext, "rms_norm", lambda *a: calls.append(1) or real(*a))
    got = norm(x)
    assert calls, "the bf16 norm did not take the C++ kernel"
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    want = norm(x)
    assert got.dtype == want.dtype == torch.bfloat16 and len(calls) == 1
    # The torch path rounds the normalised row to bf16 and rounds again after the weight product; the
    # C++ pass rounds once. Two roundings against one (plus fp32 sums in another order) differ by up to
    # two bf16 ulps on a few elements (seed 1066328869: 2 ulps at one element of 2112; 3000 seeds: at
    # most 1.15% relative), so the bound is two ulps (2**-6), not one.
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=0)
    assert (got == want).float().mean() > 0.98
    x32 = x.float()
    norm32 = RMSNorm(shape[-1], 1e-5)
    norm32.weight = torch.nn.Parameter(norm.weight.float(), requires_grad=False)
    torch.testing.assert_close(cpu_ext.rms_norm(x32, norm32.weight, 1e-5), norm32(x32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3072), (64, 256), (3, 2, 40)])
def test_cpp_silu_mul_bf16_matches_the_torch_path(shape, gen, monkeypatch):
    # The MLP's silu(gate) * up on a bf16 gate|up output in one pass; odd widths take the scalar tail.
    if not cpu_ext.available():
        pytest.skip(f"the C++ CPU kernels are not built here: {cpu_ext.unavailable_reason()}")
    import torch.nn.functional as F

    from qserve.serve.model import MLP

    x = (torch.randn(shape, generator=gen) * 4).bfloat16()
    x.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp under/overflow, zeros
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_ext.silu_mul(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    # exp in another implementation: the silu may land one bf16 ulp apart before the product
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-30)
    assert (got == want).float().mean() > 0.97
    calls = []
    monkeypatch.setattr(cpu_ext, "silu_mul", lambda t: calls.append(1) or want.reshape(*t.shape[:-1], -1))
    ident = torch.nn.Identity()
    assert torch.equal(MLP(ident, ident)(x), want) and calls == [1]  # the MLP takes the fused op in bf16
