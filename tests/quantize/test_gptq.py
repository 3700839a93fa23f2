"""GPTQ solve: beats RTN on correlated inputs, matches an independent unbatched solve, and its
result is a well-formed QuantizedWeight in every grouping mode."""

from __future__ import annotations

import pytest
import torch

from qserve.errors import ConfigError
from qserve.kernels.packing import pack_awq, pack_gptq, rtn_quantize, unpack_awq, unpack_gptq
from qserve.quantize.gptq import GPTQ


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors here are tiny: a second OpenMP thread only adds synchronisation, which on a shared
    # 2-core machine costs more than the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """x = z @ A: channels mix a few latent factors, plus a few channels with 10x magnitude."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim // 4, generator=g)
    a = torch.randn(dim // 4, dim, generator=g)
    x = z @ a + 0.1 * torch.randn(n, dim, generator=g)
    x[:, :4] *= 10.0
    return x


def make_layer(out_f: int, in_f: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.05


def solve(w, x, batches: int = 4, **kw):
    gptq = GPTQ(w)
    for chunk in x.chunk(batches):
        gptq.add_batch(chunk.reshape(2, -1, x.shape[1]))  # [..., in] with a leading batch dim
    return gptq.quantize(**kw)


def output_error(x, w, w_q) -> float:
    return float((x @ w_q.t() - x @ w.t()).norm())


MODES = [(False, False), (True, False), (True, True), (False, True)]


@pytest.mark.parametrize("group_size", [128, 64, -1])
@pytest.mark.parametrize(("desc_act", "static_groups"), MODES)
def test_gptq_beats_rtn_on_correlated_inputs(group_size, desc_act, static_groups):
    x = correlated_inputs(2048, 256)
    w = make_layer(256, 256)
    res = solve(w, x, group_size=group_size, desc_act=desc_act, static_groups=static_groups)
    rtn = rtn_quantize(w, 4, group_size, sym=True).dequantize()
    err_gptq = output_error(x, w, res.qweight.dequantize())
    err_rtn = output_error(x, w, rtn)
    print(f"g{group_size} act={desc_act} static={static_groups}: gptq {err_gptq:.3f} rtn {err_rtn:.3f}")
    assert err_gptq < 0.7 * err_rtn


@pytest.mark.parametrize(("desc_act", "static_groups"), MODES)
@pytest.mark.parametrize("sym", [True, False])
def test_loss_is_the_objective_of_the_dequantized_weight(desc_act, static_groups, sym):
    """sum_i (w_i - q_i)^2 / U_ii^2 equals trace(E H E^T) exactly when the solve is consistent, so
    this fails if codes, scales, g_idx or the permutation disagree with what the solve produced."""
    x = correlated_inputs(1024, 128)
    w = make_layer(64, 128)
    res = solve(w, x, group_size=32, sym=sym, desc_act=desc_act, static_groups=static_groups, block_size=48)
    h = 2.0 / x.shape[0] * x.t() @ x
    h += res.damp * torch.diag(h).mean() * torch.eye(128)
    e = res.qweight.dequantize() - w
    objective = 0.5 * float(torch.einsum("oi,ij,oj->", e, h, e))
    assert res.loss == pytest.approx(objective, rel=2e-3)


def reference_solve(w, h, bits, gs, sym, perm=None):
    """Unbatched OBS form: explicit inverse, one column at a time, no lazy blocks, no Cholesky."""
    from qserve.kernels.packing import compute_qparams, dequantize_tensor, quantize_tensor

    w = w.clone()
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.inv(h.double())
    out = torch.zeros_like(w)
    for c in range(w.shape[1]):
        if c % gs == 0:
            scale, zero = compute_qparams(w[:, c : c + gs], bits, sym)
        q = dequantize_tensor(quantize_tensor(w[:, c], scale, zero, bits), scale, zero)
        out[:, c] = q
        err = ((w[:, c] - q).double() / hinv[c, c])[:, None]
        w[:, c + 1 :] -= (err * hinv[c, c + 1 :][None, :]).float()
        # Remove column c from the inverse (Schur complement), as OBS does after each step.
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out


@pytest.mark.parametrize("desc_act", [False, True])
def test_matches_unbatched_reference(desc_act):
    x = correlated_inputs(1024, 96, seed=3)
    w = make_layer(32, 96, seed=4)
    res = solve(w, x, group_size=24, sym=False, desc_act=desc_act, block_size=40)
    h = 2.0 / x.shape[0] * x.t() @ x
    h += res.damp * torch.diag(h).mean() * torch.eye(96)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if desc_act else None
    ref = reference_solve(w, h, 4, 24, sym=False, perm=perm)
    mine = res.qweight.dequantize()
    # fp32 vs fp64 paths differ in the last bits of the scales; a different code would show up as
    # a difference of a whole quantization step.
    step = res.qweight.scales[res.qweight.g_idx.long()].t()
    other_code = ((mine - ref).abs() > step / 2).float().mean()
    assert other_code < 0.01, f"{other_code:.3f} of weights got a different code than the unbatched solve"
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_block_size_does_not_change_the_result():
    x = correlated_inputs(1024, 128)
    w = make_layer(64, 128)
    a = solve(w, x, group_size=32, block_size=128).qweight
    b = solve(w, x, group_size=32, block_size=20).qweight
    # Lazy batching reorders float sums only: every code is the same.
    assert torch.equal(a.intweight, b.intweight)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), atol=1e-6, rtol=0)


def test_act_order_groups_follow_the_hessian_diagonal():
    x = correlated_inputs(2048, 256)
    w = make_layer(128, 256)
    res = solve(w, x, group_size=64, desc_act=True)
    g_idx = res.qweight.g_idx
    # Each group holds exactly group_size columns, and group k holds the k-th run of columns by
    # descending diag(H): the activation order, as the reference's g_idx[invperm] gives.
    assert torch.bincount(g_idx.long()).tolist() == [64] * 4
    diag = torch.diag(x.t() @ x)
    order = torch.argsort(diag, descending=True, stable=True)
    for k in range(4):
        assert set(torch.nonzero(g_idx == k).flatten().tolist()) == set(order[64 * k : 64 * (k + 1)].tolist())
    assert not torch.equal(g_idx, torch.arange(256, dtype=torch.int32) // 64)


@pytest.mark.parametrize(("desc_act", "static_groups"), [(False, False), (True, True), (False, True)])
def test_contiguous_groups_have_plain_g_idx(desc_act, static_groups):
    res = solve(
        make_layer(64, 128),
        correlated_inputs(512, 128),
        group_size=32,
        desc_act=desc_act,
        static_groups=static_groups,
    )
    assert torch.equal(res.qweight.g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_per_channel_group_is_one_group():
    res = solve(make_layer(64, 128), correlated_inputs(512, 128), group_size=-1, desc_act=True)
    assert res.qweight.scales.shape == (1, 64)
    assert torch.equal(res.qweight.g_idx, torch.zeros(128, dtype=torch.int32))


def test_dead_columns_are_zeroed():
    x = correlated_inputs(1024, 128)
    dead = [5, 77, 100]
    x[:, dead] = 0.0
    w = make_layer(64, 128)
    res = solve(w, x, group_size=32, desc_act=True)
    w_q = res.qweight.dequantize()
    assert res.dead_columns == 3
    assert torch.isfinite(w_q).all()
    assert torch.equal(w_q[:, dead], torch.zeros(64, 3))
    assert output_error(x, w, w_q) < 0.7 * output_error(x, w, rtn_quantize(w, 4, 32).dequantize())


def test_singular_hessian_raises_damping():
    x = correlated_inputs(512, 64)
    x[:, 32:] = x[:, :32]  # duplicated channels: H has rank <= 32, undamped Cholesky fails
    res = solve(make_layer(32, 64), x, group_size=32, damp=0.0)
    assert res.damp > 0.0
    assert torch.isfinite(res.qweight.dequantize()).all()


def test_non_finite_inputs_are_a_typed_error():
    gptq = GPTQ(make_layer(16, 32), name="model.layers.3.mlp.down_proj")
    x = torch.randn(8, 32)
    x[0, 0] = float("inf")
    gptq.add_batch(x)
    with pytest.raises(ConfigError, match=r"layers\.3\.mlp\.down_proj.*NaN or inf"):
        gptq.quantize()


def test_running_mean_matches_one_shot_hessian():
    x = correlated_inputs(3000, 64)
    gptq = GPTQ(make_layer(8, 64))
    for chunk in x.split(7):  # many small, uneven batches
        gptq.add_batch(chunk)
    torch.testing.assert_close(gptq.hessian, 2.0 / 3000 * x.t() @ x, rtol=1e-4, atol=1e-3)
    assert gptq.n_samples == 3000


@pytest.mark.parametrize(("desc_act", "static_groups"), MODES)
def test_result_packs_and_unpacks(desc_act, static_groups):
    res = solve(
        make_layer(64, 128),
        correlated_inputs(512, 128),
        group_size=32,
        sym=False,
        desc_act=desc_act,
        static_groups=static_groups,
    )
    qw = res.qweight
    p = pack_gptq(qw)
    back = unpack_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, 4, 32)
    assert torch.equal(back.intweight, qw.intweight)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx)
    if desc_act and not static_groups:
        with pytest.raises(ValueError, match="contiguous"):
            pack_awq(qw)  # AWQ GEMM has no g_idx: act-order groups cannot be written there
    else:
        a = pack_awq(qw)
        back = unpack_awq(a.qweight, a.qzeros, a.scales, 32)
        assert torch.equal(back.intweight, qw.intweight)
        assert torch.equal(back.zeros, qw.zeros)


def test_take_hessian_gives_the_same_solve_as_accumulating():
    x = correlated_inputs(512, 64)
    w_q, w_k = make_layer(32, 64, seed=5), make_layer(16, 64, seed=6)
    first = GPTQ(w_q)
    first.add_batch(x)
    shared = GPTQ(w_k)
    shared.take_hessian(first)
    own = GPTQ(w_k)
    own.add_batch(x)
    a, b = shared.quantize(group_size=32), own.quantize(group_size=32)
    assert torch.equal(a.qweight.intweight, b.qweight.intweight)
    assert a.n_samples == 512
    with pytest.raises(ValueError, match="in_features"):
        GPTQ(make_layer(8, 32)).take_hessian(first)


@pytest.mark.parametrize("sym", [True, False])
def test_mse_qparams_never_worse_than_min_max_and_better_on_heavy_tails(sym):
    from qserve.kernels.packing import compute_qparams
    from qserve.quantize.gptq import MSE_NORM, _lp_error, mse_qparams

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g)
    w[:32, 0] *= 8.0  # one outlier per row in the first half: clipping it pays off there
    s0, z0 = compute_qparams(w, 4, sym)
    s1, z1 = mse_qparams(w, 4, sym)
    e0, e1 = _lp_error(w, s0, z0, 4, MSE_NORM), _lp_error(w, s1, z1, 4, MSE_NORM)
    assert (e1 <= e0).all()  # p = 1 is a candidate, so no row gets worse
    assert e1[:32].sum() < (0.9 if sym else 0.98) * e0[:32].sum()  # asym already fits a one-sided outlier
    assert (s1 <= s0 + 1e-7).all() and (s1 < s0).any()  # only ever shrinks the range
    assert torch.equal(z1, z1.round()) and (z1 >= 0).all() and (z1 <= 15).all()


@pytest.mark.parametrize(("desc_act", "static_groups"), MODES)
def test_mse_search_solves_consistently_and_still_beats_rtn(desc_act, static_groups):
    x = correlated_inputs(2048, 128)
    w = make_layer(64, 128)
    res = solve(w, x, group_size=32, desc_act=desc_act, static_groups=static_groups, sym=False, mse=True)
    plain = solve(w, x, group_size=32, desc_act=desc_act, static_groups=static_groups, sym=False)
    # the packed form round-trips and the stored scales are the searched ones, not min/max
    q = res.qweight
    assert not torch.equal(q.scales, plain.qweight.scales)
    p = pack_gptq(q)
    back = unpack_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, 4, 32)
    assert torch.equal(back.intweight, q.intweight) and torch.equal(back.zeros, q.zeros)
    rtn = rtn_quantize(w, 4, 32, sym=False).dequantize()
    assert output_error(x, w, q.dequantize()) < 0.7 * output_error(x, w, rtn)


def test_mse_is_a_gptq_option():
    from qserve.quantize.config import QuantConfig

    with pytest.raises(ConfigError, match="mse is a GPTQ option"):
        QuantConfig(model="m", output="o", method="awq", group_size=64, mse=True)
    assert QuantConfig(model="m", output="o", method="gptq", sym=True, mse=True).fingerprint_dict()["mse"] is True


# --- asymmetric calibration (GPTAQ) ----------------------------------------------------------------


def _asymmetric_case(n: int = 2048, dim: int = 128):
    """Float inputs x_f and the inputs a quantized model hands the layer: x_f plus an error that is
    correlated with x (what earlier quantized layers leave), not independent noise."""
    x_f = correlated_inputs(n, dim, seed=3)
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(dim, dim, generator=g) * 0.08
    x_q = x_f + x_f @ mix
    return x_f, x_q, make_layer(96, dim, seed=5)


def _asym_solve(w, x_q, x_f, float_inputs: bool, **kw):
    gptq = GPTQ(w)
    for q, f in zip(x_q.chunk(4), x_f.chunk(4), strict=True):
        gptq.add_batch(q, f if float_inputs else None)
    return gptq.quantize(**kw).qweight.dequantize()


@pytest.mark.parametrize("desc_act", [False, True])
def test_float_inputs_make_the_solve_target_the_float_output(desc_act):
    """min |Q x_q - W x_f|: with the float inputs the result must be much closer to the float layer's
    output than the plain solve, which targets W x_q."""
    x_f, x_q, w = _asymmetric_case()
    target = x_f @ w.t()
    plain = _asym_solve(w, x_q, x_f, False, group_size=32, desc_act=desc_act)
    asym = _asym_solve(w, x_q, x_f, True, group_size=32, desc_act=desc_act)
    err_plain = float((x_q @ plain.t() - target).norm())
    err_asym = float((x_q @ asym.t() - target).norm())
    # The plain solve inherits the whole input error (x_q - x_f) W^T; the asymmetric one removes the
    # part a linear map of x_q can explain, which with a linear error is almost all of it.
    assert err_asym < 0.6 * err_plain, (err_asym, err_plain)


def test_identical_float_inputs_change_nothing():
    x = correlated_inputs(1024, 128)
    w = make_layer(64, 128)
    plain = _asym_solve(w, x, x, False, group_size=32, desc_act=True)
    same = _asym_solve(w, x, x, True, group_size=32, desc_act=True)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)


def test_float_inputs_must_come_with_every_batch_and_match():
    x_f, x_q, w = _asymmetric_case(256)
    gptq = GPTQ(w, name="l")
    gptq.add_batch(x_q[:128], x_f[:128])
    with pytest.raises(ValueError, match="every batch or with none"):
        gptq.add_batch(x_q[128:])
    with pytest.raises(ValueError, match="do not match"):
        gptq.add_batch(x_q[128:], x_f[128:200])


def test_gptaq_is_a_gptq_option():
    from qserve.quantize.config import QuantConfig

    with pytest.raises(ConfigError, match="gptaq is a GPTQ option"):
        QuantConfig(model="m", output="o", method="awq", group_size=64, gptaq=True)
    cfg = QuantConfig(model="m", output="o", method="gptq", sym=True, gptaq=True)
    assert cfg.fingerprint_dict()["gptaq"] is True


# --- how a symmetric group's scale covers its range -------------------------------------------------


def test_signed_sym_scale_puts_both_extremes_on_the_grid():
    from qserve.kernels.packing import compute_qparams, dequantize_tensor, quantize_tensor

    g = torch.Generator().manual_seed(7)
    w = torch.randn(256, 64, generator=g)
    for bits in (4, 8):
        half = 2 ** (bits - 1)
        s_abs, z_abs = compute_qparams(w, bits, True, sym_scale="absmax")
        s_sig, z_sig = compute_qparams(w, bits, True, sym_scale="signed")
        assert torch.equal(z_sig, z_abs) and (z_sig == half).all()  # same layout: zero point 2^(b-1)
        codes = quantize_tensor(w, s_sig[:, None], z_sig[:, None], bits)
        err = (dequantize_tensor(codes, s_sig[:, None], z_sig[:, None]) - w).abs()
        # nothing is clipped: every weight is within half a step of the grid
        assert (err <= s_sig[:, None] / 2 + 1e-6).all()
        pos = w.amax(1) >= -w.amin(1)  # rows whose largest magnitude is positive
        # a negative extreme that needs level -2^(b-1) gets a finer grid than absmax's
        neg = w.amax(1) / (half - 1) < -w.amin(1) / half
        assert neg.sum() > 20 and (s_sig[neg] < s_abs[neg]).all()
        # a positive extreme is no longer clipped: absmax's reaches only (half - 1) / (half - 0.5) of it
        codes_abs = quantize_tensor(w, s_abs[:, None], z_abs[:, None], bits)
        top = dequantize_tensor(codes_abs, s_abs[:, None], z_abs[:, None]).amax(1)
        assert (top[pos] < w.amax(1)[pos] - s_abs[pos] / 4).all()
        top_sig = dequantize_tensor(codes, s_sig[:, None], z_sig[:, None]).amax(1)
        assert torch.allclose(top_sig[pos], w.amax(1)[pos])
    with pytest.raises(ValueError, match="sym_scale"):
        compute_qparams(w, 4, True, sym_scale="max")


@pytest.mark.parametrize(("desc_act", "static_groups"), MODES)
@pytest.mark.parametrize("mse", [False, True])
def test_signed_sym_scale_solves_consistently_and_beats_rtn(desc_act, static_groups, mse):
    x = correlated_inputs(2048, 128)
    w = make_layer(64, 128)
    res = solve(
        w, x, group_size=32, desc_act=desc_act, static_groups=static_groups, mse=mse, sym_scale="signed"
    )
    ref = solve(w, x, group_size=32, desc_act=desc_act, static_groups=static_groups, mse=mse)
    q = res.qweight
    assert not torch.equal(q.scales, ref.qweight.scales)
    assert (q.zeros == 8).all()  # still the symmetric GPTQ layout
    p = pack_gptq(q)
    back = unpack_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, 4, 32)
    assert torch.equal(back.intweight, q.intweight) and torch.equal(back.zeros, q.zeros)
    # the solve's loss is the objective of what it stores (fails if the scales and codes disagree)
    h = 2.0 / x.shape[0] * x.t() @ x
    h += res.damp * torch.diag(h).mean() * torch.eye(128)
    e = q.dequantize() - w
    assert res.loss == pytest.approx(0.5 * float(torch.einsum("oi,ij,oj->", e, h, e)), rel=2e-3)
    rtn = rtn_quantize(w, 4, 32, sym=True, sym_scale="signed").dequantize()
    assert output_error(x, w, q.dequantize()) < 0.7 * output_error(x, w, rtn)


def test_sym_scale_config():
    from qserve.kernels.packing import SYM_SCALES
    from qserve.quantize import config as qc
    from qserve.quantize.config import QuantConfig

    assert qc.SYM_SCALES == SYM_SCALES  # restated in the torch-free config module
    assert QuantConfig(model="m", output="o", method="gptq", sym=True).sym_scale == qc.DEFAULT_SYM_SCALE
    # GPTQ's automatic grid gets the default scale once it resolves to symmetric (test_gptq_auto_grid.py).
    assert QuantConfig(model="m", output="o", method="gptq").sym_scale is None
    assert QuantConfig(model="m", output="o", method="rtn", sym=True).sym_scale == qc.DEFAULT_SYM_SCALE
    assert QuantConfig(model="m", output="o", method="gptq", sym=False).sym_scale is None
    assert QuantConfig(model="m", output="o", method="awq", group_size=64).sym_scale is None
    cfg = QuantConfig(model="m", output="o", method="gptq", sym_scale="signed")
    assert cfg.fingerprint_dict()["sym_scale"] == "signed"
    with pytest.raises(ConfigError, match="--asym"):
        QuantConfig(model="m", output="o", method="gptq", sym=False, sym_scale="signed")
    with pytest.raises(ConfigError, match="AWQ"):
        QuantConfig(model="m", output="o", method="awq", sym=True, group_size=64, sym_scale="signed")
    with pytest.raises(ConfigError, match="sym_scale"):
        QuantConfig(model="m", output="o", method="gptq", sym_scale="max")


def test_add_batch_leaves_the_float_inputs_untouched():
    # asymmetric calibration: the float inputs may be the caller's tensor (fp32 on the device already);
    # the cross term must not be formed by subtracting in place from it
    gen = torch.Generator().manual_seed(0)
    gptq = GPTQ(torch.randn(8, 16, generator=gen))
    x = torch.randn(2, 5, 16, generator=gen)
    xf = torch.randn(2, 5, 16, generator=gen)
    before = xf.clone()
    gptq.add_batch(x, xf)
    torch.testing.assert_close(xf, before, rtol=0, atol=0)
    rows, rows_f = x.reshape(-1, 16), xf.reshape(-1, 16)
    torch.testing.assert_close(gptq.cross, 2.0 / 10 * (rows_f - rows).t() @ rows)
