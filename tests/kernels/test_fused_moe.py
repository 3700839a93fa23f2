"""Fused MoE dequant-GEMM (Triton, interpreted on CPU or real on CUDA) against the reference: every
routed expert dequantized from its packed tensors and applied in fp32; and the align step's layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import TRITON_DEVICES

from qserve.kernels import StackedPacked, fused_moe, packing
from qserve.kernels.reference import fused_moe_reference

triton_moe = pytest.importorskip("qserve.kernels.triton_moe", reason="triton is not installed")
TileConfig = triton_moe.TileConfig


def stack_experts(fmt, num_experts, k, n, group_size, gen, *, bits=4, sym=True, act_order=False,
                  ckpt="gptq", device="cpu") -> StackedPacked:  # fmt: skip
    """num_experts random Linears W [n, k], RTN-quantized and packed in `fmt`, stacked. With act-order
    each expert gets its own shuffled g_idx, except expert 0, which keeps contiguous groups (as a
    starved expert rounded to nearest does in a real GPTQ checkpoint)."""
    parts = []
    for e in range(num_experts):
        qw = packing.rtn_quantize(torch.randn(n, k, generator=gen), bits=bits, group_size=group_size, sym=sym)
        if act_order and e > 0:
            perm = torch.randperm(k, generator=gen)
            qw = packing.QuantizedWeight(qw.intweight, qw.scales, qw.zeros, qw.g_idx[perm], bits, group_size)
        parts.append(packing.pack_gptq(qw, ckpt) if fmt == "gptq" else packing.pack_awq(qw))
    g_idx = torch.stack([p.g_idx for p in parts]).to(device) if act_order else None
    return StackedPacked(
        torch.stack([p.qweight for p in parts]).to(device),
        torch.stack([p.qzeros for p in parts]).to(device),
        torch.stack([p.scales for p in parts]).to(device),
        g_idx,
    )


def route(tokens, num_experts, top_k, gen, device):
    """Softmax top-k routing of random logits: weights [T, k] float32, ids [T, k] int64."""
    probs = torch.randn(tokens, num_experts, generator=gen).softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights.to(device), ids.to(device)


def moe_tolerances(dtype, ref):
    # One more rounding than the dense GEMM's test: the gate|up output is stored in x.dtype before the
    # activation. Each rounding is half an ulp relative; through the down projection's sum of
    # random-sign terms it stays within a few ulps of the output's largest value, while a wrong
    # expert, nibble, zero point, scale or routing weight moves outputs by far more.
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}[dtype]
    return {"rtol": 4 * eps, "atol": 4 * eps * float(ref.abs().max())}


SMALL, LARGE = TileConfig(16, 64, 128), triton_moe.MOE_CONFIGS["large"]  # None: moe_config's choice
# (fmt, tokens, experts, top_k, hidden, inter, group, dtype, act_order, bits, sym, split gate/up, config)
CASES = [
    ("gptq", 1, 4, 2, 64, 64, 32, torch.float16, False, 4, True, False, None),  # batch-1 decode
    ("gptq", 5, 6, 2, 192, 64, 64, torch.bfloat16, True, 4, False, True, SMALL),  # act-order, K over 2 tiles
    ("awq", 9, 4, 3, 128, 96, 32, torch.bfloat16, False, 4, False, False, LARGE),
    ("awq", 3, 8, 2, 64, 128, -1, torch.float16, False, 4, True, False, SMALL),
    ("gptq", 7, 4, 2, 64, 64, 64, torch.float16, False, 8, False, False, None),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("fmt", "t", "e", "top_k", "h", "i", "gs", "dtype", "act", "bits", "sym", "split", "cfg"),
                         CASES)  # fmt: skip
def test_fused_moe_matches_reference(
    fmt, t, e, top_k, h, i, gs, dtype, act, bits, sym, split, cfg, device, gen
):
    kw = dict(bits=bits, sym=sym, act_order=act, device=device)
    if split:  # gate and up with different g_idx stay separate stacks: two launches
        gate_up = [stack_experts(fmt, e, h, i, gs, gen, **kw), stack_experts(fmt, e, h, i, gs, gen, **kw)]
    else:
        gate_up = [stack_experts(fmt, e, h, 2 * i, gs, gen, **kw)]
    down = stack_experts(fmt, e, i, h, gs, gen, **kw)
    x = torch.randn(t, h, generator=gen).to(device=device, dtype=dtype)
    weights, ids = route(t, e, top_k, gen, device)
    opts = dict(fmt=fmt, bits=bits, group_size=gs, activation=F.silu)
    y = triton_moe.fused_moe_triton(x, gate_up, down, weights, ids, **opts, config=cfg)
    cpu = [StackedPacked(*(None if a is None else a.cpu() for a in (s.qweight, s.qzeros, s.scales, s.g_idx)))
           for s in (*gate_up, down)]  # fmt: skip
    ref = fused_moe_reference(x.cpu(), cpu[:-1], cpu[-1], weights.cpu(), ids.cpu(), **opts)
    assert y.shape == (t, h) and y.dtype == dtype
    torch.testing.assert_close(y.cpu(), ref, **moe_tolerances(dtype, ref.float()))


def test_public_entry_dispatch(gen, monkeypatch):
    """backend 'triton' runs the kernel (interpreted here), 'torch' the reference; CPU tensors default
    to torch; 'triton' on CPU without the interpreter is a clear error."""
    gate_up, down = [stack_experts("awq", 3, 64, 64, 32, gen)], stack_experts("awq", 3, 32, 64, 32, gen)
    x = torch.randn(4, 64, generator=gen)
    weights, ids = route(4, 3, 2, gen, "cpu")
    opts = dict(fmt="awq", group_size=32, activation=F.silu)
    ref = fused_moe(x, gate_up, down, weights, ids, **opts)
    torch.testing.assert_close(
        ref, fused_moe_reference(x, gate_up, down, weights, ids, **opts), rtol=0, atol=0
    )
    y = fused_moe(x, gate_up, down, weights, ids, **opts, backend="triton")
    torch.testing.assert_close(y, ref, **moe_tolerances(torch.float32, ref))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_moe(x, gate_up, down, weights, ids, **opts, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="only under TRITON_INTERPRET=1"):
        fused_moe(x, gate_up, down, weights, ids, **opts, backend="triton")


def test_mismatched_stacks_are_rejected(gen):
    gate_up, down = [stack_experts("gptq", 3, 64, 64, 32, gen)], stack_experts("gptq", 2, 32, 64, 32, gen)
    weights, ids = route(2, 2, 2, gen, "cpu")
    with pytest.raises(ValueError, match=r"gate\|up stacks hold \[3\] experts, down 2"):
        triton_moe.fused_moe_triton(torch.randn(2, 64), gate_up, down, weights, ids, fmt="gptq", group_size=32,
                                    activation=F.silu)  # fmt: skip
    with pytest.raises(ValueError, match="do not match the experts' in_features 64"):
        triton_moe.fused_moe_triton(torch.randn(2, 48), gate_up, stack_experts("gptq", 3, 32, 64, 32, gen),
                                    weights, ids, fmt="gptq", group_size=32, activation=F.silu)  # fmt: skip


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"), [(1, 4, 2, 16), (37, 8, 2, 16), (50, 4, 3, 64)]
)
def test_align_groups_pairs_by_expert_in_whole_blocks(tokens, experts, top_k, block_m, gen):
    _, ids = route(tokens, experts, top_k, gen, "cpu")
    ids[0, 0] = experts - 1  # the last expert is never empty, the others may be
    sorted_ids, expert_ids, num_padded = triton_moe.moe_align_block_size(ids, block_m, experts)
    pairs = tokens * top_k
    counts = torch.bincount(ids.flatten(), minlength=experts)
    total = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(num_padded) == total and sorted_ids.numel() % block_m == 0
    assert sorted_ids.numel() >= total and expert_ids.numel() == sorted_ids.numel() // block_m
    assert (expert_ids[total // block_m :] == -1).all()
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
    assert (sorted_ids[total:] == pairs).all()  # beyond the padded total: padding only
    flat = ids.flatten()
    for b in range(total // block_m):
        block = sorted_ids[b * block_m : (b + 1) * block_m]
        members = block[block < pairs].long()
        assert members.numel() > 0 and (flat[members] == expert_ids[b]).all()  # one expert per block
        assert torch.equal(members, members.sort().values)  # stable: token order within an expert
