"""AWQ's scale search for one scale group: s = x_mean^r (duo: x_mean^r / w_mean^(1-r)) over a grid.

Candidates are scored as in llm-awq / AutoAWQ: the mean squared error between the `inspect`
module's float output and its output with the group's linears replaced by Q(W * s) / s, which is
what the model computes once s is folded into the previous op and the linears are quantized.

Three ways to score, by what the inspect module is (all exact for the tokens they see):
- a Linear (o_proj, down_proj): the error is linear in the weight, so with G = X^T X over the
  sampled rows, MSE = sum_o e_o^T G e_o / (N * out): one Gram, then each candidate costs out*in^2;
- a token-wise module (the MLP: its forward takes only x): forward the sampled rows;
- a module that mixes tokens (attention: its forward takes the block's per-sequence kwargs):
  forward whole sampled sequences with those kwargs.
Nothing is written into the block: candidates run through `torch.func.functional_call`.
"""

from __future__ import annotations

import inspect
import time

import torch
from torch import nn
from torch.func import functional_call

from qserve.kernels.packing import effective_group_size, rtn_quantize


def scale_candidate(
    x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo_scaling: bool
) -> torch.Tensor:
    """One grid point's per-input-channel scale [in], normalised so sqrt(max * min) = 1."""
    if duo_scaling:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    # An all-zero channel can send the normalisation to inf/nan; such channels are left unscaled.
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over rows of |w| relative to its group's max |w|, per input channel: [in]."""
    w = torch.cat([wi.float() for wi in weights], dim=0)  # [sum_out, in]
    gs = effective_group_size(w.shape[1], group_size)
    wg = w.abs().reshape(-1, gs)  # one quantization group per row
    rel = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return rel.reshape(w.shape).mean(dim=0)


def fake_quantize_scaled(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Q(W * s) / s for W [out, in], s [in]: the weight the model effectively uses after folding."""
    return rtn_quantize(w * s[None, :], bits, group_size, sym).dequantize() / s[None, :]


class InspectLoss:
    """Scores replacement weights for some linears by the MSE of the inspect module's output."""

    def __init__(
        self,
        block: nn.Module,
        inspect: str,
        linears: tuple[str, ...],
        x: torch.Tensor,
        kwargs: dict,
        max_chunk_tokens: int,
    ):
        self.module = block.get_submodule(inspect)
        prefix = f"{inspect}." if inspect else ""
        self.keys = [
            f"{name.removeprefix(prefix)}.weight" if inspect != name else "weight" for name in linears
        ]
        # Float32 copies of the inspect module's parameters: the search runs in fp32 whatever the
        # model dtype, and functional_call leaves the module itself untouched.
        self.params = {k: p.detach().float() for k, p in self.module.named_parameters()}
        self.gram = None
        if isinstance(self.module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1]).float()
            self.gram = rows.t() @ rows  # [in, in]
            self.n_rows = rows.shape[0]
            return
        self.kwargs = accepted_kwargs(self.module, kwargs)
        # x is [k, seq, in] (sequences) or [N, in] (tokens); chunk along dim 0 to bound memory.
        per_row = x.shape[1] if x.dim() == 3 else 1
        self.chunk = max(1, max_chunk_tokens // per_row)
        self.x = x.float()
        self.reference = self._forward({})

    def __call__(self, weights: list[torch.Tensor]) -> float:
        if self.gram is not None:
            e = weights[0] - self.params["weight"]  # [out, in]
            return float(((e @ self.gram) * e).sum()) / (self.n_rows * e.shape[0])
        out = self._forward(dict(zip(self.keys, weights, strict=True)))
        return float((out - self.reference).square().mean())

    def _forward(self, overrides: dict) -> torch.Tensor:
        params = {**self.params, **overrides}
        outs = []
        for a in range(0, self.x.shape[0], self.chunk):
            kwargs = batch_index(self.kwargs, slice(a, a + self.chunk), self.x.shape[0])
            y = functional_call(self.module, params, (self.x[a : a + self.chunk],), kwargs)
            outs.append(y[0] if isinstance(y, tuple) else y)
        return torch.cat(outs)


def search_scale(
    weights: list[torch.Tensor],
    x_mean: torch.Tensor,
    loss_fn: InspectLoss,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int,
    duo_scaling: bool,
) -> tuple[torch.Tensor, dict]:
    """Grid search of one group's scale. Returns (best s [in] fp32 on CPU, log entry)."""
    tick = time.perf_counter()
    weights = [w.float() for w in weights]
    x_mean = x_mean.float()
    w_mean = weight_mean(weights, group_size)
    best = (float("inf"), -1.0, None)
    for i in range(n_grid):
        ratio = i / n_grid
        s = scale_candidate(x_mean, w_mean, ratio, duo_scaling)
        loss = loss_fn([fake_quantize_scaled(w, s, bits, group_size, sym) for w in weights])
        if loss < best[0]:
            best = (loss, ratio, s)
    ones = torch.ones_like(x_mean)
    rtn_loss = loss_fn([fake_quantize_scaled(w, ones, bits, group_size, sym) for w in weights])
    loss, ratio, s = best
    if s is None:
        raise FloatingPointError(
            f"AWQ scale search produced no finite loss (losses are NaN) over {n_grid} ratios"
        )
    log = {"best_ratio": ratio, "loss": loss, "rtn_loss": rtn_loss, "seconds": time.perf_counter() - tick}
    return s.cpu(), log


def batch_index(obj, index, n: int):
    """Index tensors whose leading dim is the batch (size n) with `index` (slice or index tensor);
    tensors with a broadcast batch dim (1) and non-tensors pass through, inside tuples/dicts too."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] != n or n == 1:
            return obj
        return obj[index.to(obj.device) if isinstance(index, torch.Tensor) else index]
    if isinstance(obj, (tuple, list)):
        return type(obj)(batch_index(o, index, n) for o in obj)
    if isinstance(obj, dict):
        return {k: batch_index(v, index, n) for k, v in obj.items()}
    return obj


def accepted_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """The entries of `kwargs` that `module.forward` names as parameters (as AutoAWQ sanitizes them)."""
    params = inspect.signature(module.forward).parameters
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in named and k != "hidden_states"}


def float32_tree(obj):
    """Floating tensors to fp32 (the search computes in fp32), recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(float32_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: float32_tree(v) for k, v in obj.items()}
    return obj
