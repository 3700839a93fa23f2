"""The int8-activation path of the 4-bit CPU kernels (kernels/csrc/cpu_packed.cpp, packed_linear_q8).

Tolerance. Activations are quantized per row and block of gcd(group_size, 32) inputs to int8 with scale
max|x| / 127; the kernel then computes exactly the fp32 GEMM of the weights with the dequantized int8
activations x_hat (integer sums are exact; only the fp32 per-block terms round). So:
- against kernels/reference.py fed x_hat: fp32 rounding only (rtol 1e-5, atol 2e-4, as the fp32 path);
- against the reference fed x: |y - y_ref| <= 0.5 * sum_k |W'[n, k]| * scale(m, block(k)) (each x_hat_k
  is within half a step of x_k), plus the same fp32 slack. On random layers that is ~0.5% of |y|'s scale
  (the llama.cpp Q4 x Q8 trade-off); QSERVE_CPU_ACT_INT8=0 keeps exact fp32 math.
Every body the CPU has (avx512_vnni, avx2, scalar) runs; they must agree bit for bit. The AVX-512 bodies
are also checked on any x86 CPU through SIMDe (test_avx512_bodies_on_simde), where its headers exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cpu_packed import LAYOUTS, checkpoint_linear, resident

from qserve.kernels import cpu_ext, cpu_packed, reference

ROWS = (1, 2, 3, 4, 7)
BODIES = ("avx512_vnni", "avx2", "scalar")


@pytest.fixture(autouse=True)
def compiled_kernels():
    if cpu_ext.required():
        assert cpu_ext.available(), cpu_ext.unavailable_reason()
    elif not cpu_ext.available():
        pytest.skip(f"qserve's C++ CPU kernels are unavailable: {cpu_ext.unavailable_reason()}")


def cpu_has(body: str) -> bool:
    ops = torch.ops.qserve_cpu
    return {"avx512_vnni": ops.has_avx512_vnni, "avx2": ops.has_avx2, "scalar": lambda: True}[body]()


@pytest.fixture(params=BODIES)
def body(request, monkeypatch):
    if not cpu_has(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("QSERVE_CPU_ISA", request.param)
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "1")
    assert cpu_packed.int8_body() == request.param
    return request.param


def dequantized_activations(x: torch.Tensor, w: cpu_packed.CpuPackedWeight):
    """(x_hat, step) in the checkpoint's input order: what the kernel multiplies, and its per-input scale."""
    q, scales = cpu_packed.quantize_activations(x, w)
    rows, k = q.shape
    block = k // scales.shape[1]
    assert block in (4, 8, 16, 32) and w.group_size % block == 0
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    x_hat = (q.float().view(rows, -1, block) * scales.unsqueeze(-1)).view(rows, k)
    step = scales.repeat_interleave(block, dim=1)
    if w.perm is not None:  # resident order -> checkpoint order
        x_hat_c, step_c = torch.empty_like(x_hat), torch.empty_like(step)
        x_hat_c[:, w.perm], step_c[:, w.perm] = x_hat, step
        x_hat, step = x_hat_c, step_c
    return x_hat, step


@pytest.mark.parametrize(("fmt", "group_size", "act_order"), LAYOUTS)
@pytest.mark.parametrize("out_features", [200, 64])
def test_int8_path_matches_the_reference(fmt, group_size, act_order, out_features, body, gen):
    in_f = 256
    tensors = checkpoint_linear(fmt, out_features, in_f, group_size, act_order, gen)
    w = resident(tensors, fmt, group_size)
    dense = reference.dequantize_weight(*tensors, fmt=fmt, group_size=group_size)  # [out, in]
    for rows in ROWS:
        x = torch.randn(rows, in_f, generator=gen)
        x[0, 5] = 9.0  # an outlier: its block's step grows, the bound below follows it
        y = cpu_packed.linear(x, w)  # M <= INT8_MAX_ROWS with the switch on: the int8 kernel
        assert y.dtype == torch.float32 and y.shape == (rows, out_features)
        x_hat, step = dequantized_activations(x, w)
        assert torch.all((x_hat - x).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7)
        exact = reference.dequant_gemm_reference(x_hat, *tensors, fmt=fmt, group_size=group_size)
        torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-3, msg=lambda m, r=rows: f"M={r}: {m}")
        fp32 = reference.dequant_gemm_reference(x, *tensors, fmt=fmt, group_size=group_size)
        bound = 0.5 * step @ dense.abs().t() + 2e-4 + 1e-5 * fp32.abs()
        assert torch.all((y - fp32).abs() <= bound), f"M={rows}: beyond the int8 bound"
        assert (y - fp32).norm() / fp32.norm() < 0.02  # ~0.005 typical
        # every body runs the same integer sums and fp32 steps: bit-identical
        assert torch.equal(cpu_packed.linear_int8(x, w, "scalar"), y)
        xb = x.bfloat16()
        yb = cpu_packed.linear(xb, w)
        assert yb.dtype == torch.bfloat16
        # bf16 rows are quantized in place (no act-order) or through an fp32 copy (act-order): either way
        # the same int8 values and sums as the fp32 rows holding the same numbers, rounded once to bf16
        assert torch.equal(yb, cpu_packed.linear(xb.float(), w).bfloat16())
        xb_hat, _ = dequantized_activations(xb, w)
        exact_b = reference.dequant_gemm_reference(xb_hat, *tensors, fmt=fmt, group_size=group_size)
        torch.testing.assert_close(
            yb.float(), exact_b, rtol=8e-3, atol=1e-2, msg=lambda m, r=rows: f"M={r}: {m}"
        )


def test_gptq_v2_zeros_and_fp32_scales(body, gen):
    tensors = checkpoint_linear("gptq", 72, 128, 32, False, gen, checkpoint_format="gptq_v2")
    qweight, qzeros, scales, g_idx = tensors
    for sc in (scales, scales.float()):
        w = resident((qweight, qzeros, sc, g_idx), "gptq", 32, "gptq_v2")
        x = torch.randn(3, 128, generator=gen)
        x_hat, _ = dequantized_activations(x, w)
        expected = reference.dequant_gemm_reference(
            x_hat, qweight, qzeros, sc, g_idx, fmt="gptq", group_size=32, checkpoint_format="gptq_v2"
        )
        torch.testing.assert_close(cpu_packed.linear(x, w), expected, rtol=1e-5, atol=1e-3)


def test_odd_group_sizes_and_block_sizes(body, gen):
    # group size 48: activation blocks of 16; 40 (one group, K = 40): blocks of 8; 12: blocks of 4
    for out_f, in_f, gs in ((104, 96, 48), (72, 40, 40), (72, 36, 12)):
        tensors = checkpoint_linear("awq", out_f, in_f, gs, False, gen)
        w = resident(tensors, "awq", gs)
        x = torch.randn(5, in_f, generator=gen)
        x_hat, _ = dequantized_activations(x, w)
        expected = reference.dequant_gemm_reference(x_hat, *tensors, fmt="awq", group_size=gs)
        y = cpu_packed.linear(x, w)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-3)
        assert torch.equal(cpu_packed.linear_int8(x, w, "scalar"), y)


def test_non_finite_activations_give_nan_not_silent_zeros(body, gen):
    tensors = checkpoint_linear("awq", 64, 128, 32, False, gen)
    w = resident(tensors, "awq", 32)
    x = torch.randn(2, 128, generator=gen)
    x[1, 7] = float("nan")
    y = cpu_packed.linear(x, w)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_decode_calls_take_the_int8_path_where_the_cpu_has_it(monkeypatch, gen):
    """Fails if a CPU with AVX512-VNNI (or AVX2 without AVX-512) silently runs another body by default."""
    monkeypatch.delenv("QSERVE_CPU_ISA", raising=False)
    monkeypatch.delenv("QSERVE_CPU_ACT_INT8", raising=False)
    ops = torch.ops.qserve_cpu
    if ops.has_avx512_vnni():
        expected = "avx512_vnni"
    elif ops.has_avx512():
        expected = None  # AVX-512 without VNNI: the fp32 AVX-512 kernel (int8 not measured there)
    elif ops.has_avx2():
        expected = "avx2"
    else:
        expected = None
    assert cpu_packed.isa_name() == (expected or ("avx512" if ops.has_avx512() else "scalar"))
    assert cpu_packed.int8_body() == expected
    tensors = checkpoint_linear("awq", 64, 128, 32, False, gen)
    w = resident(tensors, "awq", 32)
    code = {"scalar": 0, "avx2": 2, "avx512_vnni": 3}
    for rows, takes_int8 in (
        (1, expected is not None),
        (cpu_packed.INT8_MAX_ROWS, expected is not None),
        (cpu_packed.INT8_MAX_ROWS + 1, False),
    ):
        before = list(ops.q8_calls())
        cpu_packed.linear(torch.randn(rows, 128, generator=gen), w)
        after = list(ops.q8_calls())
        if takes_int8:
            assert after[code[expected]] == before[code[expected]] + 1, (
                f"M={rows}: the {expected} body did not run"
            )
            assert sum(after) == sum(before) + 1
        else:
            assert after == before, f"M={rows}: the int8 kernel ran"


def test_switching_int8_off_gives_the_exact_fp32_path(monkeypatch, gen):
    tensors = checkpoint_linear("gptq", 200, 256, 64, True, gen)
    w = resident(tensors, "gptq", 64)
    x = torch.randn(2, 256, generator=gen)
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "0")
    assert cpu_packed.int8_body() is None
    before = list(torch.ops.qserve_cpu.q8_calls())
    y = cpu_packed.linear(x, w)
    assert list(torch.ops.qserve_cpu.q8_calls()) == before
    isa = cpu_packed._ISA_CODES[cpu_packed.isa_name()]
    fp32 = torch.ops.qserve_cpu.packed_linear(x, w.qdata, w.scales, w.zeros, w.perm, 200, 64, isa)
    assert torch.equal(y, fp32)
    torch.testing.assert_close(
        y, reference.dequant_gemm_reference(x, *tensors, fmt="gptq", group_size=64), rtol=1e-5, atol=1e-3
    )
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "yes")
    with pytest.raises(ValueError, match="QSERVE_CPU_ACT_INT8='yes' is not one of auto, 1, 0"):
        cpu_packed.linear(x, w)


def test_bad_requests_get_messages(gen, monkeypatch):
    tensors = checkpoint_linear("awq", 64, 128, 32, False, gen)
    w = resident(tensors, "awq", 32)
    ops = torch.ops.qserve_cpu
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match=r"isa must be 0 \(scalar\), 2 \(avx2\) or 3 \(avx512_vnni\)"):
        ops.packed_linear_q8(x, w.qdata, w.scales, w.zeros, None, 64, 32, 1)
    if not ops.has_avx512_vnni():
        with pytest.raises(RuntimeError, match="lacks AVX512-VNNI"):
            ops.packed_linear_q8(x, w.qdata, w.scales, w.zeros, None, 64, 32, 3)
    codes = torch.randint(0, 16, (64, 132), generator=gen)
    odd = cpu_packed.repack(codes, torch.ones(6, 64), torch.zeros(6, 64), None, 22)  # 22: not a multiple of 4
    with pytest.raises(RuntimeError, match="group size that is a multiple of 4, got 22"):
        ops.packed_linear_q8(torch.randn(1, 132), odd.qdata, odd.scales, odd.zeros, None, 64, 22, 0)
    # such a layer still runs, through the fp32 kernel
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "1")
    assert cpu_packed.linear(torch.randn(1, 132), odd).shape == (1, 64)
    with pytest.raises(ValueError, match="body='sse9'"):
        cpu_packed.linear_int8(x, w, "sse9")


HARNESS = Path(__file__).with_name("csrc") / "q8_simde_check.cpp"


def test_avx512_bodies_on_simde(tmp_path):
    """The AVX512-VNNI int8 body and the AVX-512 fp32 bodies, compiled on SIMDe's portable intrinsics and
    run here against the portable bodies (int8: bit for bit), so they are checked on CPUs without them."""
    if not Path("/usr/include/simde/x86/avx512.h").exists() or shutil.which("g++") is None:
        pytest.skip("needs g++ and the SIMDe headers (Debian/Ubuntu: apt-get install libsimde-dev)")
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    exe = tmp_path / "q8_simde_check"
    cmd = [
        "g++",
        "-std=c++17",
        "-O1",
        "-fopenmp",
        *(f"-I{p}" for p in include_paths()),
        f"-I{HARNESS.parent}",
        str(HARNESS),
        "-o",
        str(exe),
        f"-L{lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib}",
    ]
    if os.uname().machine in ("x86_64", "amd64"):
        cmd.insert(3, "-march=native")
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout[-4000:]
