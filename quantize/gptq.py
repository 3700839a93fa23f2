"""GPTQ for one Linear: a running Hessian of its inputs, then the column-by-column solve.

Follows Frantar et al. (2022) and its reference implementation (IST-DASLab/gptq): the damped
inverse Hessian is factored once (upper Cholesky of H^-1), columns are quantized left to right and
each column's error is spread onto the not-yet-quantized columns, with those updates applied lazily
one block of columns at a time so the big matrix is touched only once per block.

Every quantize/dequantize step goes through `kernels.packing`, so the codes, scales and zeros this
produces are exactly what the packed checkpoint holds.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from qserve.errors import ConfigError
from qserve.kernels import cpu_ext
from qserve.kernels.packing import (
    SYM_SCALES,
    QuantizedWeight,
    compute_qparams,
    dequantize_tensor,
    effective_group_size,
    num_groups,
    quantize_tensor,
)

# The MSE search over clipping ranges (GPTQ reference quantizer's `mse` option): shrink each group's
# [min, max] by p = 1, 1 - 1/grid, ... down to 1 - max_shrink and keep, per output row, the p with the
# least sum |w - q(w)|^norm (norm 2.4 weights large errors a little more than squared error does).
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8

# Cholesky retries double the damping up to this fraction of mean(diag(H)); past it the problem is
# not conditioning but bad inputs (caught earlier as non-finite).
_MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQResult:
    """The solve's output for one Linear.

    `qweight.dequantize()` is exactly the weight the solve settled on (columns in original order).
    `loss` is sum_i (w_i - q_i)^2 / (2 [U]_ii^2) over columns, the reference's "error"; it equals
    0.5 * trace((W' - W) H (W' - W)^T) for the damped H actually used, with H = 2/n sum x x^T
    averaged over n input *rows* (tokens), not sequences.
    """

    qweight: QuantizedWeight
    loss: float
    seconds: float
    damp: float  # fraction of mean(diag(H)) added to the diagonal; larger than asked if Cholesky failed
    n_samples: int  # input rows accumulated into H
    dead_columns: int  # input channels never active (diag(H) == 0), zeroed in the result


class GPTQ:
    """Accumulates H = 2/n * sum x x^T for one Linear's inputs, then solves."""

    def __init__(self, weight: torch.Tensor, name: str = "linear"):
        if weight.dim() != 2:
            raise ValueError(
                f"{name}: GPTQ expects a Linear weight [out, in], got shape {tuple(weight.shape)}"
            )
        self.name = name
        self.weight = weight.detach().float().clone()  # [out, in]
        in_f = weight.shape[1]
        self.hessian = torch.zeros(in_f, in_f, dtype=torch.float32, device=weight.device)
        # 2/n sum (x_float - x) x^T, when add_batch is given the float model's inputs (GPTAQ).
        self.cross: torch.Tensor | None = None
        self.n_samples = 0

    def add_batch(self, inp: torch.Tensor, float_inp: torch.Tensor | None = None) -> None:
        """Fold the rows of `inp` [..., in] into the running mean of 2 x x^T.

        `float_inp`: the same rows as the float model computes them (asymmetric calibration). The solve
        then targets the float layer's output on those, W x_float, instead of W x. Either every batch
        has it or none does."""
        gram = _amx_gram(inp, self.hessian)
        x = inp.detach().reshape(-1, inp.shape[-1]) if gram else _rows(inp, self.hessian.device)  # [rows, in]
        rows = x.shape[0]
        if (float_inp is None) != (self.cross is None) and self.n_samples > 0:
            raise ValueError(f"{self.name}: float inputs must be given with every batch or with none")
        if rows == 0:
            return
        total = self.n_samples + rows
        # Rescale the old mean before adding, so no term ever holds an un-normalised sum over all
        # batches (which loses fp32 precision and can overflow with many long sequences).
        self.hessian.mul_(self.n_samples / total)
        if gram:  # bf16 inputs on AMX: exact products, fp32 sums (kernels/csrc/calib_ops.cpp)
            self.hessian.add_(torch.ops.qserve_cpu.bf16_gram(x, x), alpha=2.0 / total)
        else:
            self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        if float_inp is not None:
            fx = float_inp.detach().reshape(-1, float_inp.shape[-1])
            if fx.shape != x.shape:
                raise ValueError(
                    f"{self.name}: float inputs {tuple(fx.shape)} do not match the inputs {tuple(x.shape)}"
                )
            if self.cross is None:
                self.cross = torch.zeros_like(self.hessian)
            self.cross.mul_(self.n_samples / total)
            # The cross term stays an fp32 product of the exact difference dX = X_f - X: through the bf16
            # Gram it needs either X_f^T X - X^T X, which cancels most of X^T X where one token dominates
            # H (the attention sink in SmolLM2's down_proj: 3.5e-5 relative error and a measurably worse
            # model), or dX split into two bf16 parts, two Gram calls no faster than this product.
            fx = _rows(fx, self.hessian.device)
            xf = x if x.dtype == torch.float32 else x.float()
            # out of place: `_rows` may return the caller's own tensor (fp32 on the device already)
            self.cross.addmm_((fx - xf).t(), xf, alpha=2.0 / total)
        self.n_samples = total

    def take_hessian(self, other: GPTQ) -> None:
        """Adopt `other`'s accumulated Hessian (and cross term): for a Linear that reads the same inputs
        (k/v next to q, up next to gate), which saves a second in x in^2 accumulation over every token.
        The tensors are shared, not copied (quantize() never modifies them): add no batches to either
        solver afterwards."""
        if other.hessian.shape != self.hessian.shape:
            raise ValueError(
                f"{self.name}: cannot take the Hessian of {other.name}: in_features "
                f"{other.hessian.shape[0]} != {self.hessian.shape[0]}"
            )
        self.hessian, self.cross, self.n_samples = other.hessian, other.cross, other.n_samples

    def quantize(
        self,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        damp: float = 0.01,
        desc_act: bool = False,
        static_groups: bool = False,
        block_size: int = 128,
        mse: bool = False,
        sym_scale: str = "absmax",
    ) -> GPTQResult:
        """Solve for the quantized weight. Does not consume the Hessian: it may be called again.

        `mse`: choose each group's scale/zero by the clipping search of `mse_qparams` instead of from
        the group's min/max. `sym_scale`: how a symmetric group's scale covers its range
        (`qserve.kernels.packing.SYM_SCALES`)."""
        tick = time.perf_counter()
        if self.n_samples == 0:
            raise ConfigError(
                f"{self.name}: GPTQ has no calibration inputs (add_batch was never called); "
                "check that the calibration data reaches this layer"
            )
        if not torch.isfinite(self.hessian).all():
            raise ConfigError(
                f"{self.name}: the calibration activations of this layer contain NaN or inf, so its "
                "Hessian is not finite; quantize with --dtype float32 or bfloat16 (float16 overflows)"
            )
        in_f = self.weight.shape[1]
        gs = effective_group_size(in_f, group_size)
        w = self.weight.clone()
        h = self.hessian.clone()

        # A channel that never fires carries no information: pin its Hessian row so the factorization
        # stays regular, and zero its weight so it quantizes to exactly 0.
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        if self.cross is not None:
            w = asymmetric_target(w, h, self.cross, damp)
        w[:, dead] = 0.0

        # Static groups: qparams fixed up front on the (un-updated) weights, in original column order.
        qparams = functools.partial(mse_qparams if mse else compute_qparams, sym_scale=sym_scale)
        static = None
        if static_groups and group_size != -1:
            static = [qparams(w[:, c : c + gs], bits, sym) for c in range(0, in_f, gs)]

        perm = None
        if desc_act:
            # Largest diag(H) first: the most sensitive columns are quantized while the most
            # remaining columns can still absorb their error. Stable sort keeps ties reproducible.
            perm = torch.argsort(torch.diag(h), descending=True, stable=True)
            w = w[:, perm]
            h = h[perm][:, perm]

        hinv, used_damp = self._inverse_factor(h, damp)
        codes, scales, zeros, loss = _solve(w, hinv, bits, sym, gs, block_size, static, perm, qparams)

        g_idx = torch.arange(in_f, device=w.device, dtype=torch.int32) // gs
        if perm is not None:
            invperm = torch.argsort(perm)
            codes = codes[:, invperm]
            if static is None:
                # Groups were formed over permuted positions: column c belongs to the group of its
                # position in the quantization order. With static groups g_idx stays c // gs.
                g_idx = g_idx[invperm]
        qweight = QuantizedWeight(
            intweight=codes.to(torch.int32),
            scales=scales,
            zeros=zeros.to(torch.int32),
            g_idx=g_idx,
            bits=bits,
            group_size=group_size,
        )
        return GPTQResult(
            qweight=qweight,
            loss=loss,
            seconds=time.perf_counter() - tick,
            damp=used_damp,
            n_samples=self.n_samples,
            dead_columns=int(dead.sum()),
        )

    def _inverse_factor(self, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
        """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, retrying with more damping."""
        mean_diag = torch.diag(h).mean()
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        frac = damp
        while True:
            chol, info = torch.linalg.cholesky_ex(h + (frac * mean_diag) * eye)
            if info.item() == 0:
                upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
                if info.item() == 0:
                    return upper, frac
            if frac >= _MAX_DAMP:
                raise ConfigError(
                    f"{self.name}: the GPTQ Hessian is not positive definite even with damping "
                    f"{frac:g} x mean(diag(H)); the calibration inputs are degenerate - use more or "
                    "more varied calibration samples"
                )
            # Rank-deficient H (few samples, duplicated channels) fails in fp32 with small damping.
            frac = min(max(frac * 2.0, 1e-4), _MAX_DAMP)


def _amx_gram(inp: torch.Tensor, hessian: torch.Tensor) -> bool:
    """Whether bf16 inputs accumulate through the AMX Gram kernel: QSERVE_GPTQ_AMX=1, bf16 on the CPU
    beside a CPU Hessian, the compiled kernels built and AMX-BF16 present.

    Opt-in: on SmolLM2 at 128 x 512 it cut the default GPTQ run from 465 s to 347 s but scored 23.81 and
    23.85 against 23.30 with the fp32 product (bench/RESULTS.md section 3), although on synthetic data it
    is closer to an fp64 reference than sgemm. A suspect: each C tile sums all of a chunk's tokens in one
    fp32 accumulator, after every window's first (attention-sink) token, whose products are orders of
    magnitude larger than the rest."""
    if inp.dtype != torch.bfloat16 or inp.device.type != "cpu" or hessian.device.type != "cpu":
        return False
    if os.environ.get("QSERVE_GPTQ_AMX", "0") != "1":
        return False
    return cpu_ext.available() and _has_amx()


@functools.cache
def _has_amx() -> bool:
    return bool(torch.ops.qserve_cpu.has_amx_bf16())


def _rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).to(device, torch.float32)


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight whose output on the quantized inputs X best matches W on the float inputs X_f.

    min_Q |Q X - W X_f|^2 = |Q X - W' X|^2 + const with W' = W X_f X^T (X X^T)^-1 = W + W (dX X^T) H^-1
    (the cross term vanishes), so running the ordinary GPTQ solve on W' with the same H minimises the
    asymmetric objective. H gets the solve's damping, which also keeps W' from over-fitting directions
    the calibration inputs barely span. `cross` = 2/n sum dX X^T, scaled like `h`.
    """
    damped = h + (damp * torch.diag(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:  # not positive definite even damped: leave the target as it is
        return w
    # (W C) H^-1 = (H^-1 (W C)^T)^T for symmetric H.
    return w + torch.cholesky_solve((w @ cross).t(), chol).t()


def _solve(
    w: torch.Tensor,
    hinv: torch.Tensor,
    bits: int,
    sym: bool,
    gs: int,
    block_size: int,
    static: list[tuple[torch.Tensor, torch.Tensor]] | None,
    perm: torch.Tensor | None,
    qparams=compute_qparams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The column loop over W [out, in] (already permuted) with U = chol(H^-1, upper).

    Returns codes [out, in] (quantization order), scales [G, out], zeros [G, out], summed loss.
    """
    out_f, in_f = w.shape
    n_groups = num_groups(in_f, gs)
    scales = torch.zeros(n_groups, out_f, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(n_groups, out_f, dtype=torch.float32, device=w.device)
    if static is not None:
        for g, (s, z) in enumerate(static):
            scales[g], zeros[g] = s, z
    codes = torch.zeros_like(w)
    losses = torch.zeros(out_f, dtype=torch.float32, device=w.device)
    # Original group of each quantization position (static groups follow the original columns).
    orig_group = None if perm is None else (perm // gs).tolist()
    scale = zero = None

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()  # [out, count], receives this block's updates eagerly
        err1 = torch.zeros_like(w1)
        u1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = orig_group[col] if orig_group is not None else col // gs
                scale, zero = scales[g], zeros[g]
            elif col % gs == 0:
                # A group's qparams come from its columns as they stand now, after every update
                # from earlier columns. The reference reads the global W here, which misses this
                # block's pending updates when a group starts mid-block; this reads current values.
                cur = _current_columns(w, w1, err1, hinv, i1, i2, i, min(col + gs, in_f))
                scale, zero = qparams(cur, bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            wcol = w1[:, i]
            q = quantize_tensor(wcol, scale, zero, bits)
            dq = dequantize_tensor(q, scale, zero)
            codes[:, col] = q
            d = u1[i, i]
            err = (wcol - dq) / d
            losses += err.square()
            w1[:, i:].sub_(err[:, None] * u1[i, i:][None, :])
            err1[:, i] = err
        # Lazy update: this block's errors reach all later columns in one matmul.
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    return codes, scales, zeros, float(losses.sum()) / 2.0


def _current_columns(w, w1, err1, hinv, i1: int, i2: int, i: int, end: int) -> torch.Tensor:
    """Columns [i1 + i, end) of W with every update so far applied, including pending ones.

    Inside the block they live in w1; past the block they still lack this block's first i errors.
    """
    inside = w1[:, i : min(end - i1, i2 - i1)]
    if end <= i2:
        return inside
    beyond = w[:, i2:end] - err1[:, :i] @ hinv[i1 : i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=1)


def mse_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    *,
    norm: float = MSE_NORM,
    grid: int = MSE_GRID,
    max_shrink: float = MSE_MAX_SHRINK,
    sym_scale: str = "absmax",
    kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `compute_qparams` (one group per row of w [rows, cols]), but each row's range is the
    min/max shrunk by the factor p in {1, 1 - 1/grid, ...} (down to 1 - max_shrink) that minimises
    sum |w - dequant(quant(w))|^norm over the row. p = 1 is always a candidate, so the chosen error is
    never above min/max's.

    On the CPU (unless `kernel` is False) the search runs as one C++ pass per row
    (kernels/csrc/calib_ops.cpp: the same fp32 operations, 5-6x faster); elsewhere, or without the
    compiled kernels, as the torch loop below, the definition the C++ search is tested against."""
    w = w.float()
    if kernel and w.device.type == "cpu" and w.dim() == 2 and cpu_ext.available():
        if sym and sym_scale not in SYM_SCALES:  # as compute_qparams: only a symmetric grid reads it
            raise ValueError(f"sym_scale={sym_scale!r}: expected one of {', '.join(SYM_SCALES)}")
        return torch.ops.qserve_cpu.mse_qparams(
            w.contiguous(), bits, sym, float(norm), grid, float(max_shrink), int(sym_scale == "signed")
        )
    best_scale, best_zero = compute_qparams(w, bits, sym, sym_scale=sym_scale)
    best_err = _lp_error(w, best_scale, best_zero, bits, norm)
    for i in range(1, int(max_shrink * grid)):
        # Shrinking w by p shrinks its min and max by p, which is exactly the shrunk range.
        scale, zero = compute_qparams(w * (1.0 - i / grid), bits, sym, sym_scale=sym_scale)
        err = _lp_error(w, scale, zero, bits, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _lp_error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, norm: float
) -> torch.Tensor:
    dq = dequantize_tensor(
        quantize_tensor(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None]
    )
    return (dq - w).abs_().pow_(norm).sum(dim=1)
