"""The 4-bit CPU kernels (kernels/csrc/cpu_packed.cpp via kernels/cpu_packed.py) against kernels/reference.py.

Every test runs each kernel body, forced through QSERVE_CPU_ISA (each the CPU has), with the exact fp32
activations (QSERVE_CPU_ACT_INT8=0); the int8-activation path is tested in test_cpu_packed_q8.py. Without the compiled kernels these tests skip, except under
QSERVE_REQUIRE_CPU_EXT=1 (CI), where they fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels import cpu_ext, cpu_packed, packing, reference

ROWS = (1, 2, 3, 4, 7, 16, 33, 64, 257)


@pytest.fixture(autouse=True)
def compiled_kernels():
    if cpu_ext.required():
        assert cpu_ext.available(), cpu_ext.unavailable_reason()  # raises CpuExtensionError first
    elif not cpu_ext.available():
        pytest.skip(f"qserve's C++ CPU kernels are unavailable: {cpu_ext.unavailable_reason()}")


@pytest.fixture(params=["avx512_vnni", "avx512", "avx2", "scalar"])
def isa(request, monkeypatch):
    ops = torch.ops.qserve_cpu
    has = {"avx512_vnni": ops.has_avx512_vnni, "avx512": ops.has_avx512, "avx2": ops.has_avx2}
    if request.param in has and not has[request.param]():
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("QSERVE_CPU_ISA", request.param)
    # the exact fp32 kernels; the int8-activation path is tested in test_cpu_packed_q8.py
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "0")
    assert cpu_packed.isa_name() == request.param
    return request.param


def checkpoint_linear(fmt, out_f, in_f, group_size, act_order, gen, checkpoint_format="gptq"):
    """A packed Linear as a checkpoint stores it: (qweight, qzeros, scales, g_idx)."""
    w = torch.randn(out_f, in_f, generator=gen)
    if act_order:
        perm = torch.randperm(in_f, generator=gen)
        qw = packing.rtn_quantize(w[:, perm], bits=4, group_size=group_size, sym=False)
        inverse = torch.argsort(perm)
        qw = packing.QuantizedWeight(
            qw.intweight[:, inverse], qw.scales, qw.zeros, qw.g_idx[inverse], 4, group_size
        )
    else:
        qw = packing.rtn_quantize(w, bits=4, group_size=group_size, sym=fmt == "gptq")
    if fmt == "awq":
        p = packing.pack_awq(qw)
        return p.qweight, p.qzeros, p.scales, None
    p = packing.pack_gptq(qw, checkpoint_format)
    return p.qweight, p.qzeros, p.scales, p.g_idx


def resident(tensors, fmt, group_size, checkpoint_format="gptq"):
    logical = cpu_packed.from_checkpoint(
        *tensors, fmt=fmt, group_size=group_size, checkpoint_format=checkpoint_format
    )
    return cpu_packed.repack(*logical, group_size)


LAYOUTS = [
    ("awq", 32, False), ("awq", 64, False), ("awq", 128, False), ("awq", -1, False),
    ("gptq", 32, False), ("gptq", 64, False), ("gptq", 128, False), ("gptq", -1, False),
    ("gptq", 32, True), ("gptq", 64, True), ("gptq", 128, True),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "group_size", "act_order"), LAYOUTS)
def test_repacked_weight_dequantizes_bit_identically(fmt, group_size, act_order, isa, gen):
    # out 200: ragged against the 64-column blocks; in 256: several groups of each size
    tensors = checkpoint_linear(fmt, 200, 256, group_size, act_order, gen)
    w = resident(tensors, fmt, group_size)
    assert (w.perm is not None) == act_order
    expected = reference.dequantize_weight(*tensors, fmt=fmt, group_size=group_size)
    got = cpu_packed.dequantize(w)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_gptq_v2_zeros_and_fp32_scales_repack_exactly(isa, gen):
    tensors = checkpoint_linear("gptq", 72, 128, 32, False, gen, checkpoint_format="gptq_v2")
    w = resident(tensors, "gptq", 32, "gptq_v2")
    expected = reference.dequantize_weight(*tensors, fmt="gptq", group_size=32, checkpoint_format="gptq_v2")
    assert torch.equal(cpu_packed.dequantize(w), expected)
    qweight, qzeros, scales, g_idx = tensors
    w32 = resident((qweight, qzeros, scales.float(), g_idx), "gptq", 32, "gptq_v2")
    assert w32.scales.dtype == torch.float32
    assert torch.equal(cpu_packed.dequantize(w32), expected)


@pytest.mark.parametrize(("fmt", "group_size", "act_order"), LAYOUTS)
@pytest.mark.parametrize("out_features", [200, 64])
def test_packed_linear_matches_the_reference(fmt, group_size, act_order, out_features, isa, gen):
    in_f = 256
    tensors = checkpoint_linear(fmt, out_features, in_f, group_size, act_order, gen)
    w = resident(tensors, fmt, group_size)
    for rows in ROWS:  # 1..32 rows: the fused kernel; 33 and more: dequantized tiles into at::mm
        x = torch.randn(rows, in_f, generator=gen)
        y = cpu_packed.linear(x, w)
        expected = reference.dequant_gemm_reference(x, *tensors, fmt=fmt, group_size=group_size)
        assert y.dtype == torch.float32 and y.shape == (rows, out_features)
        # fp32 sums of 256 products |x| ~ 1, |w| ~ 3 in another order: typically ~sqrt(K) ulps of |y| ~ 50
        # (~6e-5), seen up to 2.1e-4 over random seeds; a wrong nibble, scale or zero is off by O(1)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-3, msg=lambda m, r=rows: f"M={r}: {m}")
        xb = x.bfloat16()
        yb = cpu_packed.linear(xb, w)
        assert yb.dtype == torch.bfloat16
        # bf16 activations are read exactly and accumulated in fp32: only the bf16 output rounds (and from
        # BF16_TILES_MIN_ROWS rows on CPUs with bf16 GEMMs, or AMX_MIN_ROWS on AMX, each weight too: 2^-9
        # relative)
        exact = reference.dequant_gemm_reference(xb.float(), *tensors, fmt=fmt, group_size=group_size)
        if (rows >= cpu_packed.BF16_TILES_MIN_ROWS and cpu_packed.bf16_tiles()) or (
            rows >= cpu_packed.AMX_MIN_ROWS and cpu_packed.amx_linear()
        ):
            dense = reference.dequant_gemm_reference(torch.eye(in_f), *tensors, fmt=fmt, group_size=group_size)
            bound = (xb.float().abs() @ dense.abs()) * 2.0**-8 + exact.abs() * 2.0**-8 + 1e-6
            assert ((yb.float() - exact).abs() <= bound).all(), f"M={rows}"
            continue
        torch.testing.assert_close(
            yb.float(), exact, rtol=8e-3, atol=1e-2, msg=lambda m, r=rows: f"M={r}: {m}"
        )


def test_prefill_path_runs_under_inference_mode_on_several_threads(isa, gen):
    """The engine calls under torch.inference_mode(); the prefill tiles are written by pool threads, which
    do not inherit that mode, so the output must not be written through autograd-checked tensor ops."""
    tensors = checkpoint_linear("awq", 2048, 256, 64, False, gen)  # several 512 KiB tiles
    w = resident(tensors, "awq", 64)
    x = torch.randn(64, 256, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = cpu_packed.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    expected = reference.dequant_gemm_reference(x, *tensors, fmt="awq", group_size=64)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-3)


def test_packed_linear_keeps_leading_dims_and_non_contiguous_input(isa, gen):
    tensors = checkpoint_linear("awq", 128, 128, 32, False, gen)
    w = resident(tensors, "awq", 32)
    x = torch.randn(3, 2, 256, generator=gen)[..., ::2]  # [3, 2, 128], strided
    y = cpu_packed.linear(x, w)
    assert y.shape == (3, 2, 128)
    expected = reference.dequant_gemm_reference(x.reshape(6, 128), *tensors, fmt="awq", group_size=32)
    torch.testing.assert_close(y.reshape(6, 128), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("in_features", [576, 49, 33])  # 49, 33: tails shorter than a vector
def test_bf16_weight_kernel_matches_fp32_matmul(in_features, isa, gen):
    w = torch.randn(131, in_features, generator=gen).bfloat16()
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen)
        y = cpu_packed.linear_bf16_weight(x, w)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-5, atol=1e-4 * in_features**0.5)


def test_resident_bytes_stay_near_the_checkpoint_bytes(gen):
    # resident bytes: 0.5 per weight + fp16 scale and uint8 zero per group and column (64-column blocks)
    tensors = checkpoint_linear("awq", 256, 512, 64, False, gen)
    w = resident(tensors, "awq", 64)
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    assert w.nbytes == 256 * 512 // 2 + 8 * 256 * 3
    assert w.nbytes <= 1.05 * checkpoint_bytes


def test_bad_inputs_get_messages(gen, monkeypatch):
    tensors = checkpoint_linear("awq", 64, 128, 32, False, gen)
    w = resident(tensors, "awq", 32)
    with pytest.raises(ValueError, match="x has 127 input features; this 4-bit layer takes 128"):
        cpu_packed.linear(torch.randn(2, 127), w)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 128\]"):
        torch.ops.qserve_cpu.packed_linear(torch.randn(1, 127), w.qdata, w.scales, w.zeros, None, 64, 32, 0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_packed.linear(torch.randn(2, 128).double(), w)
    with pytest.raises(RuntimeError, match="do not cover K"):
        torch.ops.qserve_cpu.packed_linear(torch.randn(1, 128), w.qdata, w.scales, w.zeros, None, 64, 48, 0)
    with pytest.raises(RuntimeError, match="qdata must be contiguous uint8"):
        torch.ops.qserve_cpu.packed_linear(
            torch.randn(1, 128), w.qdata.int(), w.scales, w.zeros, None, 64, 32, 0
        )
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.qserve_cpu.packed_linear(torch.randn(1, 128), w.qdata, w.scales, w.zeros, None, 64, 32, 7)
    monkeypatch.setenv("QSERVE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="QSERVE_CPU_ISA='sse9'"):
        cpu_packed.linear(torch.randn(1, 128), w)


def test_repack_refuses_what_the_layout_cannot_hold(gen):
    codes = torch.randint(0, 16, (64, 96), generator=gen)
    with pytest.raises(ValueError, match="divides in_features"):
        cpu_packed.repack(codes, torch.ones(2, 64), torch.zeros(2, 64), None, 64)
    uneven = torch.tensor([0] * 40 + [1] * 56)  # 2 groups, but not 48 inputs each
    with pytest.raises(ValueError, match="does not assign 48 inputs"):
        cpu_packed.repack(codes, torch.ones(2, 64), torch.zeros(2, 64), uneven, 48)


def test_auto_isa_is_the_best_the_cpu_has(monkeypatch):
    monkeypatch.delenv("QSERVE_CPU_ISA", raising=False)
    ops = torch.ops.qserve_cpu
    if ops.has_avx512_vnni():
        expected = "avx512_vnni"
    elif ops.has_avx512():
        expected = "avx512"
    else:
        expected = "avx2" if ops.has_avx2() else "scalar"
    assert cpu_packed.isa_name() == expected


def test_bf16_weight_kernel_tiles_under_inference_mode_on_two_threads(gen):
    # Above the fused rows the bf16 kernel splits the weight into tiles over OpenMP threads. Worker threads
    # do not inherit InferenceMode, so writing a tile's product into the (inference) output tensor with a
    # tensor op threw there; the engine runs under inference_mode with 2 threads (a 4-bit model's LM head
    # on a prefill-sized batch).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(4096, 576, generator=gen).bfloat16()  # several tiles
        x = torch.randn(64, 576, generator=gen)
        with torch.inference_mode():
            y = cpu_packed.linear_bf16_weight(x, w)
        torch.testing.assert_close(y, F.linear(x, w.float()), rtol=1e-5, atol=1e-4 * 576**0.5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu_packed.bf16_tiles(), reason="this CPU's oneDNN has no bf16 GEMMs (AVX512-BF16/AMX)")
def test_bf16_prompt_rows_multiply_bf16_tiles(gen, monkeypatch):
    # bf16 activations from BF16_TILES_MIN_ROWS rows: dequantized tiles rounded to bf16 (2^-9 relative
    # per weight) into oneDNN's bf16 GEMM with fp32 sums, then the bf16 output rounding; fewer rows and
    # QSERVE_CPU_BF16_TILES=0 keep the exact fp32 tiles.
    tensors = checkpoint_linear("awq", 200, 256, 64, False, gen)
    w = resident(tensors, "awq", 64)
    dense = cpu_packed.dequantize(w)  # [out, in] fp32
    x = torch.randn(cpu_packed.BF16_TILES_MIN_ROWS + 5, 256, generator=gen).bfloat16()
    exact = x.float() @ dense.T
    y = cpu_packed.linear(x, w).float()
    bound = (x.float().abs() @ dense.abs().T) * 2.0**-8 + exact.abs() * 2.0**-8 + 1e-6
    assert ((y - exact).abs() <= bound).all()
    monkeypatch.setenv("QSERVE_CPU_BF16_TILES", "0")
    y32 = cpu_packed.linear(x, w).float()
    torch.testing.assert_close(y32, exact.bfloat16().float(), rtol=8e-3, atol=1e-2)
    assert not torch.equal(y, y32)  # the two settings took different paths


@pytest.mark.skipif(not cpu_ext.available() or not cpu_packed.amx_linear(), reason="this CPU has no AMX-BF16")
@pytest.mark.parametrize(("fmt", "group_size", "act_order"), LAYOUTS)
def test_amx_rows_multiply_the_bf16_rounded_weights(fmt, group_size, act_order, gen):
    # From AMX_MIN_ROWS bf16 rows the blocks of 64 columns are dequantized to bf16 AMX tiles: the result is
    # the fp32-summed product of the bf16 activations with the bf16-rounded dense weight, rounded once to
    # bf16 (ragged N against the blocks, M against the 16-row tiles, act-order activations permuted).
    tensors = checkpoint_linear(fmt, 200, 256, group_size, act_order, gen)
    w = resident(tensors, fmt, group_size)
    dense = reference.dequantize_weight(*tensors, fmt=fmt, group_size=group_size).bfloat16().double()
    for rows in (cpu_packed.AMX_MIN_ROWS, 16, 17, 33, 64, 257):
        x = torch.randn(rows, 256, generator=gen).bfloat16()
        y = cpu_packed.linear(x, w)
        direct = torch.ops.qserve_cpu.packed_linear_amx(x, w.qdata, w.scales, w.zeros, w.perm, 200, w.group_size)
        assert torch.equal(y, direct), f"M={rows}: the AMX kernel did not run"
        exact = x.double() @ dense.T
        # one bf16 rounding of the output (2^-9 relative) plus fp32 sums of 256 products
        bound = exact.abs() * 2.0**-8 + (x.double().abs() @ dense.abs().T) * 2.0**-20 + 1e-6
        assert ((y.double() - exact).abs() <= bound).all(), f"M={rows}"


@pytest.mark.skipif(not cpu_ext.available() or not cpu_packed.amx_linear(), reason="this CPU has no AMX-BF16")
def test_amx_path_leaves_few_rows_fp32_and_odd_k_to_the_other_kernels(gen, monkeypatch):
    w = resident(checkpoint_linear("awq", 64, 96, 32, False, gen), "awq", 32)  # K = 96: three 32-input steps
    w80 = resident(checkpoint_linear("awq", 64, 80, 16, False, gen), "awq", 16)  # K = 80: not whole steps
    rows = cpu_packed.AMX_MIN_ROWS
    assert cpu_packed.kernel_path(torch.zeros(rows, 96, dtype=torch.bfloat16), w) == "amx"
    assert cpu_packed.kernel_path(torch.zeros(rows, 80, dtype=torch.bfloat16), w80) == "fp32"
    assert cpu_packed.kernel_path(torch.zeros(rows - 1, 96, dtype=torch.bfloat16), w) in ("int8", "fp32")
    assert cpu_packed.kernel_path(torch.zeros(rows, 96), w) == "fp32"  # fp32 activations stay exact
    monkeypatch.setenv("QSERVE_CPU_BF16_TILES", "0")
    assert cpu_packed.kernel_path(torch.zeros(rows, 96, dtype=torch.bfloat16), w) == "fp32"
    y = cpu_packed.linear(torch.randn(40, 80, generator=gen).bfloat16(), w80)  # the fallback still works
    assert y.shape == (40, 64)
