"""Host-side pieces of the CUDA path, driven on CPU: the reused split-K buffer, per-arch autotune lists,
the block sizes the engine accepts, and the prefill grid sized from the scheduler's max query length."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TRITON_DEVICES
from test_dequant_gemm import make_packed
from test_paged_attention import MIXED, attention_tolerances, make_batch

from qserve.errors import ConfigError
from qserve.kernels.reference import dequant_gemm_reference
from qserve.serve.config import CUDA_BLOCK_SIZES, check_block_size

triton_gemm = pytest.importorskip("qserve.kernels.triton_gemm", reason="triton is not installed")
triton_attention = pytest.importorskip("qserve.kernels.triton_attention", reason="triton is not installed")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_split_k_launches_reuse_one_buffer(device, gen, monkeypatch):
    monkeypatch.setattr(triton_gemm, "_split_k_buffers", {})
    monkeypatch.setattr(triton_gemm, "_outgrown_buffers", [])
    p = make_packed("awq", 128, 64, 32, gen)
    config = triton_gemm.TileConfig(16, 32, 64, split_k=2)
    ptrs = []
    for m in (3, 2, 3):
        x = torch.randn(m, 128, generator=gen)
        want = dequant_gemm_reference(x, *p.tensors(), **p.kwargs())
        t = [None if a is None else a.to(device) for a in p.tensors()]
        y = triton_gemm.dequant_gemm_triton(x.to(device), *t, **p.kwargs(), config=config)
        # a stale partial sum left in the buffer by the previous launch would show here
        torch.testing.assert_close(y.cpu(), want, rtol=1e-3, atol=1e-3)
        ptrs.append(triton_gemm._split_k_buffers[y.device].data_ptr())
    assert ptrs[0] == ptrs[1] == ptrs[2]
    assert triton_gemm._outgrown_buffers == []
    dev = y.device
    small = triton_gemm._split_k_buffers[dev]
    view = triton_gemm.split_k_workspace(8, 64, dev)  # larger: grows
    assert view.shape == (8, 64) and bool((view == 0).all())
    assert triton_gemm._outgrown_buffers == [small]  # kept alive for graphs captured against it


def test_autotune_lists_per_arch_leave_out_what_does_not_fit():
    for arch, excluded in triton_gemm.ARCH_EXCLUDED_SHAPES.items():
        for family, shapes in ((True, triton_gemm.SPLIT_K_SHAPES), (False, triton_gemm.TILED_SHAPES)):
            got = {tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
                   for c in triton_gemm.autotune_configs(family, arch)}  # fmt: skip
            assert got == set(shapes) - excluded
            assert got, f"sm_{arch} has no candidate left in the {'split-K' if family else 'tiled'} family"
    assert len(triton_gemm.autotune_configs(True, None)) == len(triton_gemm.SPLIT_K_SHAPES)


def test_block_sizes_agree_and_are_checked_only_on_cuda():
    assert CUDA_BLOCK_SIZES == triton_attention.BLOCK_SIZES
    check_block_size(24, "cpu")  # the torch paths take any size
    for ok in CUDA_BLOCK_SIZES:
        check_block_size(ok, "cuda")
    with pytest.raises(ConfigError, match=r"block_size=24 is not supported on CUDA.*8, 16, 32, 64, 128.*--block-size"):
        check_block_size(24, "cuda")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_prefill_grid_from_the_given_max_query_len(device, gen):
    """The engine passes the longest chunk; the result equals the synced path's (GQA group of 3)."""
    b = make_batch(MIXED, 6, 2, 32, 16, torch.float16, gen, junk=float("nan"), device=device)
    max_q = max(q for _, q in MIXED)
    given = triton_attention.paged_attention_prefill_triton(*b.args(), max_query_len=max_q)
    synced = triton_attention.paged_attention_prefill_triton(*b.args())
    torch.testing.assert_close(given, synced, rtol=0, atol=0)
    torch.testing.assert_close(given.float().cpu(), b.expected, **attention_tolerances(torch.float16))


def test_prefill_meta_never_packs_fewer_rows_than_the_group():
    for heads, kv in ((8, 8), (32, 8), (64, 8), (32, 1)):
        for max_q in (1, 16, 33, 512):
            meta = triton_attention.prefill_meta(heads, kv, 128, 16, max_q, True)
            assert meta["BLOCK_M"] >= heads // kv and meta["BLOCK_M"] >= 16
