"""The CPU dense GEMM for few rows (qserve's C++ kernel, or a row split across threads) against F.linear."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels import cpu_ext, cpu_gemm


@pytest.fixture
def torch_path(monkeypatch):
    """Take the C++ kernel out, as on a machine without a compiler."""
    monkeypatch.setattr(cpu_ext, "available", lambda: False)


@pytest.mark.parametrize("rows", [1, 3, 64, 256, 257])
@pytest.mark.parametrize("out_features", [96, 98])  # 98: not divisible by the split, falls back
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("path", ["ext", "torch"])
def test_linear_matches_f_linear(rows, out_features, with_bias, path, gen, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(cpu_ext, "available", lambda: False)
    x = torch.randn(rows, 80, generator=gen)
    w = torch.randn(out_features, 80, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    # fp32 sums of 80 products of O(1) values: different kernels may reorder the sum, a few ulps
    torch.testing.assert_close(cpu_gemm.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_leading_dims_and_uses_the_split(gen, monkeypatch, torch_path):
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


def test_linear_falls_back_for_large_m_and_one_thread(gen, monkeypatch, torch_path):
    w = torch.randn(128, 64, generator=gen)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    cpu_gemm.linear(torch.randn(cpu_gemm.SPLIT_MAX_ROWS + 1, 64, generator=gen), w)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    cpu_gemm.linear(torch.randn(4, 64, generator=gen), w)
    assert not calls


# Under QSERVE_REQUIRE_CPU_EXT=1 (CI) nothing skips: a machine that cannot build the kernels fails.
needs_build_tools = pytest.mark.skipif(
    not cpu_ext.required() and (shutil.which("c++") is None or shutil.which("ninja") is None),
    reason="no C++ compiler or ninja on PATH: the C++ kernel cannot be built",
)


@needs_build_tools
def test_the_cpp_kernel_builds_on_a_machine_with_a_compiler():
    assert cpu_ext.available(), cpu_ext.unavailable_reason()


@needs_build_tools
@pytest.mark.parametrize(
    "rows,out_features,in_features",
    [(1, 1, 1), (1, 7, 15), (2, 4, 16), (3, 963, 576), (5, 49, 1537), (17, 130, 33), (256, 64, 80)],
)
def test_cpp_kernel_matches_f_linear_on_ragged_shapes(rows, out_features, in_features, gen):
    # ragged on purpose: rows of W not a multiple of the kernel's 4, K not a multiple of 16 (masked tail)
    assert cpu_ext.available(), cpu_ext.unavailable_reason()
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    y = cpu_ext.linear_small_m(x, w)
    assert y.shape == (rows, out_features)
    # fp32 dot products of up to 1537 O(1) terms summed in another order: error ~ sqrt(K) ulps of |y|
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-4 * (in_features**0.5))


@needs_build_tools
def test_linear_takes_the_cpp_kernel_for_fp32_and_not_for_bf16(gen, monkeypatch):
    calls = []
    real = cpu_ext.linear_small_m
    monkeypatch.setattr(cpu_ext, "linear_small_m", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(98, 64, generator=gen)
    x = torch.randn(1, 3, 64, generator=gen)
    torch.testing.assert_close(cpu_gemm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    cpu_gemm.linear(x.bfloat16(), w.bfloat16())
    assert calls == [1]


@needs_build_tools
def test_cpp_kernel_rejects_bad_inputs_with_a_message(gen):
    assert cpu_ext.available(), cpu_ext.unavailable_reason()
    with pytest.raises(RuntimeError, match="float32 only"):
        cpu_ext.linear_small_m(torch.randn(1, 8).double(), torch.randn(4, 8).double())
    with pytest.raises(RuntimeError, match="expected"):
        cpu_ext.linear_small_m(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_ext.linear_small_m(torch.randn(8, 2).t(), torch.randn(4, 8))


def test_a_failed_build_falls_back_to_torch_with_a_warning(gen, monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.delenv("QSERVE_REQUIRE_CPU_EXT", raising=False)
    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level("WARNING"):
        assert not cpu_ext.available()
    assert "Ninja is required" in cpu_ext.unavailable_reason()
    assert "torch path" in caplog.text
    x, w = torch.randn(2, 64, generator=gen), torch.randn(96, 64, generator=gen)
    torch.testing.assert_close(cpu_gemm.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_a_failed_build_is_an_error_when_the_kernels_are_required(monkeypatch):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("error: command 'c++' failed")

    monkeypatch.setenv("QSERVE_REQUIRE_CPU_EXT", "1")
    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(cpu_ext.CpuExtensionError, match=r"QSERVE_REQUIRE_CPU_EXT=1 .*command 'c\+\+' failed"):
        cpu_ext.available()
    with pytest.raises(cpu_ext.CpuExtensionError):  # every later caller too, not only the first
        cpu_gemm.linear(torch.randn(2, 64), torch.randn(96, 64))
    assert "command 'c++' failed" in cpu_ext.unavailable_reason()


@needs_build_tools
def test_linear_runs_a_bf16_weight_through_the_cpp_kernel(gen, monkeypatch):
    from qserve.kernels import cpu_packed

    calls = []
    real = cpu_packed.linear_bf16_weight
    monkeypatch.setattr(cpu_packed, "linear_bf16_weight", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(300, 64, generator=gen).bfloat16()
    b = torch.randn(300, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    y = cpu_gemm.linear(x, w, b)
    assert calls == [1] and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4)


def test_qserve_cpu_ext_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.delenv("QSERVE_REQUIRE_CPU_EXT", raising=False)
    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setenv("QSERVE_CPU_EXT", "0")
    assert not cpu_ext.available()
    assert "QSERVE_CPU_EXT=0" in cpu_ext.unavailable_reason()


@needs_build_tools
@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_bf16_decode_takes_the_cpp_kernel_up_to_its_row_limit(rows, gen, monkeypatch):
    from qserve.kernels import cpu_packed

    calls = []
    real = cpu_packed.linear_bf16_weight
    monkeypatch.setattr(cpu_packed, "linear_bf16_weight", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(200, 96, generator=gen).bfloat16()
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    y = cpu_gemm.linear(x, w)
    assert y.dtype == torch.bfloat16 and len(calls) == (rows <= cpu_gemm.BF16_KERNEL_MAX_ROWS)
    # both accumulate in fp32 and round once to bf16: at most one bf16 ulp apart
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=8e-3, atol=1e-2)
