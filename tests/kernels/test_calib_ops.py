"""The C++ clipping-range search (kernels/csrc/calib_ops.cpp) against the torch definition
(`qserve.quantize.gptq.mse_qparams(..., kernel=False)`): same candidates, same fp32 arithmetic, so the same choice
except where two candidates tie to within the rounding of a sum's order."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import cpu_ext
from qserve.kernels.packing import SYM_SCALES, compute_qparams
from qserve.quantize.gptq import MSE_NORM, _lp_error, mse_qparams

pytestmark = pytest.mark.skipif(
    not cpu_ext.required() and not cpu_ext.available(), reason="C++ CPU kernels unavailable (no compiler)"
)


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[: rows // 2, 0] *= 8.0  # an outlier in half the rows: clipping pays off there
    w[rows - 1] = 0.0  # an all-zero group (scale clamps to 1e-8)
    w[rows - 2, :] = 0.01  # a constant group
    return w


@pytest.mark.parametrize("cols", [32, 64, 128, 100, 576])  # group sizes, and a ragged whole row
@pytest.mark.parametrize(("sym", "sym_scale"), [(False, "absmax"), (True, "absmax"), (True, "signed")])
def test_search_matches_the_torch_definition(cols, sym, sym_scale):
    w = _weights(257, cols, seed=cols)
    s_ref, z_ref = mse_qparams(w, 4, sym, sym_scale=sym_scale, kernel=False)
    s, z = torch.ops.qserve_cpu.mse_qparams(w, 4, sym, MSE_NORM, 100, 0.8, SYM_SCALES.index(sym_scale))
    e_ref = _lp_error(w, s_ref, z_ref, 4, MSE_NORM)
    e = _lp_error(w, s, z, 4, MSE_NORM)
    # Every row's chosen error is the torch choice's to fp32 rounding, and nearly every choice is identical.
    assert torch.allclose(e, e_ref, rtol=1e-5, atol=1e-30)
    same = (s == s_ref) & (z == z_ref)
    assert same.float().mean() >= 0.97, f"{int((~same).sum())} of {len(same)} rows chose another range"
    # never worse than min/max (p = 1 is a candidate)
    s0, z0 = compute_qparams(w, 4, sym, sym_scale=sym_scale)
    assert (e <= _lp_error(w, s0, z0, 4, MSE_NORM) * (1 + 1e-6)).all()
    assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 15).all()


def test_error_bodies_agree_and_match_torch():
    w = _weights(64, 100, seed=1)
    s, z = compute_qparams(w * 0.9, 4, False)
    ref = _lp_error(w, s, z, 4, MSE_NORM)
    scalar = torch.ops.qserve_cpu.lp_error_rows(w, s, z, 4, MSE_NORM, False)
    vector = torch.ops.qserve_cpu.lp_error_rows(w, s, z, 4, MSE_NORM, True)
    assert torch.allclose(scalar, ref, rtol=1e-5) and torch.allclose(vector, ref, rtol=1e-5)


def test_dispatch_uses_the_kernel_on_cpu_and_checks_arguments(monkeypatch):
    w = _weights(16, 64, seed=2)
    calls = []
    op = torch.ops.qserve_cpu.mse_qparams

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return op(*args)

    monkeypatch.setattr(torch.ops.qserve_cpu, "mse_qparams", Spy())
    mse_qparams(w, 4, False)
    mse_qparams(w, 4, False, sym_scale=None)  # the config's default: unread by a grid with zero points
    assert len(calls) == 2
    with pytest.raises(ValueError, match="sym_scale"):
        mse_qparams(w, 4, True, sym_scale="nope")
    with pytest.raises(RuntimeError, match="rows, cols"):
        op(w[0], 4, False, MSE_NORM, 100, 0.8, 0)


amx = pytest.mark.skipif(
    not cpu_ext.available() or not torch.ops.qserve_cpu.has_amx_bf16(), reason="this CPU has no AMX-BF16"
)


@amx
@pytest.mark.parametrize(("tokens", "n", "m"), [(8192, 576, 576), (1000, 200, 72), (31, 5, 40), (64, 1536, 576)])
def test_bf16_gram_is_the_fp32_product_of_the_bf16_values(tokens, n, m):
    g = torch.Generator().manual_seed(tokens + n)
    a = torch.randn(tokens, n, generator=g).bfloat16()
    b = torch.randn(tokens, m, generator=g).bfloat16()
    got = torch.ops.qserve_cpu.bf16_gram(a, b)
    ref = a.double().t() @ b.double()
    # exact products, fp32 sums in another order: within fp32 summation error of sum |a||b|
    bound = (a.double().abs().t() @ b.double().abs()) * tokens * 2.0**-24 + 1e-30
    assert got.dtype == torch.float32 and got.shape == (n, m)
    assert ((got.double() - ref).abs() <= bound).all()


@amx
def test_bf16_gram_symmetric_call_mirrors_exactly():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 100, generator=g).bfloat16()
    h = torch.ops.qserve_cpu.bf16_gram(x, x)
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h.double(), x.double().t() @ x.double(), rtol=1e-5, atol=1e-3)
    full = torch.ops.qserve_cpu.bf16_gram(x, x.clone())  # not the same tensor: every block computed
    torch.testing.assert_close(full, h, rtol=1e-6, atol=1e-4)


def test_bf16_gram_checks_its_arguments():
    a = torch.randn(4, 3).bfloat16()
    if not torch.ops.qserve_cpu.has_amx_bf16():
        with pytest.raises(RuntimeError, match="AMX"):
            torch.ops.qserve_cpu.bf16_gram(a, a)
        return
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.qserve_cpu.bf16_gram(a.float(), a)
    with pytest.raises(RuntimeError, match="share T"):
        torch.ops.qserve_cpu.bf16_gram(a, a[:3])


@amx
def test_gptq_hessian_from_bf16_inputs_matches_the_fp32_path(monkeypatch):
    from qserve.quantize.gptq import GPTQ

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 300, 96, generator=g).bfloat16()
    fx = (x.float() + 0.05 * torch.randn(x.shape, generator=g)).bfloat16()
    solvers = {}
    for amx_on in ("1", "0"):
        monkeypatch.setenv("QSERVE_GPTQ_AMX", amx_on)
        s = GPTQ(torch.randn(8, 96, generator=g))
        for _ in range(2):
            s.add_batch(x, fx)
        solvers[amx_on] = s
    on, off = solvers["1"], solvers["0"]
    assert on.n_samples == off.n_samples == 1200
    torch.testing.assert_close(on.hessian, off.hessian, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on.hessian, on.hessian.t(), rtol=0, atol=0)
    torch.testing.assert_close(on.cross, off.cross, rtol=0, atol=0)  # the same fp32 product either way
