"""The CPU dense GEMM (row-split across threads for small M) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels import cpu_gemm


@pytest.mark.parametrize("rows", [1, 3, 64, 256, 257])
@pytest.mark.parametrize("out_features", [96, 98])  # 98: not divisible by the split, falls back
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(rows, out_features, with_bias, gen):
    x = torch.randn(rows, 80, generator=gen)
    w = torch.randn(out_features, 80, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    # fp32 sums of 80 products of O(1) values: different BLAS kernels may reorder the sum, a few ulps
    torch.testing.assert_close(cpu_gemm.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_leading_dims_and_uses_the_split(gen, monkeypatch):
    x = torch.randn(2, 3, 64, generator=gen)
    w = torch.randn(128, 64, generator=gen)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    y = cpu_gemm.linear(x, w)
    assert calls, "a 6-row GEMM with 2 threads should take the split path"
    assert y.shape == (2, 3, 128)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_falls_back_for_large_m_and_one_thread(gen, monkeypatch):
    w = torch.randn(128, 64, generator=gen)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    cpu_gemm.linear(torch.randn(cpu_gemm.SPLIT_MAX_ROWS + 1, 64, generator=gen), w)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    cpu_gemm.linear(torch.randn(4, 64, generator=gen), w)
    assert not calls
