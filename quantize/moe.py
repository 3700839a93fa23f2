"""Mixture-of-experts blocks for calibration: one nn.Linear per expert projection.

transformers 5 holds a MoE block's experts as fused 3-D parameters (`mlp.experts.gate_up_proj
[E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), while checkpoints (the originals on the hub and the
GPTQ/AWQ ones vLLM reads) name each expert's Linears: `mlp.experts.{e}.gate_proj.weight`. Before the
block-by-block driver materialises anything, `unfuse_experts` swaps each fused experts module of the
skeleton for `ExpertLinears`, whose parameter names are the checkpoint's. The driver then treats every
expert projection as an ordinary Linear of the family's table: a forward hook on an expert's Linear sees
exactly the tokens the (full-precision) router sends that expert, so GPTQ's Hessian of each expert is
accumulated over its own tokens. An expert Linear that receives fewer calibration tokens than
`min_expert_tokens` (the smaller of its input features and 512) is rounded to nearest instead
(`needs_fallback`), and the quant report records tokens and fallback per expert Linear. Below its input
features the Hessian is rank-deficient and GPTQ fits the few tokens it saw rather than the expert; the cap
at 512 keeps wide experts (Mixtral's down projection reads 14,336 features) on GPTQ once they have seen
a few hundred tokens, where damping covers the directions they did not reach. The threshold is a stated
choice, not a measured optimum. AWQ (quantize/awq.py) searches one scale for every expert's gate/up on
the MoE block's input, and one up -> down scale per expert on its routed tokens; an expert below the same
minimum gets no scale and is rounded as it is.
"""

from __future__ import annotations

import torch
from torch import nn

FALLBACK = "rtn"


MAX_MIN_EXPERT_TOKENS = 512


def min_expert_tokens(in_features: int) -> int:
    """Calibration tokens an expert Linear needs for a GPTQ solve: one per input feature (a full-rank
    Hessian), capped at MAX_MIN_EXPERT_TOKENS for wide Linears."""
    return min(in_features, MAX_MIN_EXPERT_TOKENS)


def needs_fallback(name: str, n_tokens: int, in_features: int) -> bool:
    """True for an expert Linear (`...experts.{e}...`) that saw too few tokens for GPTQ."""
    return ".experts." in f".{name}" and n_tokens < min_expert_tokens(in_features)


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with the checkpoint's Linear names."""

    def __init__(self, hidden: int, inter: int, act: nn.Module, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, inter, bias=False))
        setattr(self, up, nn.Linear(hidden, inter, bias=False))
        setattr(self, down, nn.Linear(inter, hidden, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """Drop-in for transformers' fused experts module: forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H], each expert run on the tokens routed to it only."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue  # its hooks never fire: a starved expert is seen by the driver as 0 tokens
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, blocks: str, experts: str, names: tuple[str, str, str]) -> None:
    """Replace the fused experts module at `experts` (relative to each block of `blocks`) by
    ExpertLinears on the same device (meta for a skeleton)."""
    for block in model.get_submodule(blocks):
        fused = block.get_submodule(experts)
        if isinstance(fused, ExpertLinears):
            continue
        gate_up = getattr(fused, "gate_up_proj", None)
        if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3:
            raise TypeError(
                f"{experts}: expected transformers' fused experts (gate_up_proj [E, 2I, H]), found "
                f"{type(fused).__name__}; this transformers version lays experts out differently"
            )
        n_experts, two_inter, hidden = gate_up.shape
        with torch.device(gate_up.device):
            new = ExpertLinears(
                ExpertMLP(hidden, two_inter // 2, fused.act_fn, names) for _ in range(n_experts)
            )
        new.to(gate_up.dtype)
        block.set_submodule(experts, new)


def check_family_options(spec, cfg) -> None:
    """ConfigError for a method or option the family's table does not support (before anything loads)."""
    from qserve.errors import ConfigError

    if cfg.method not in spec.methods:
        raise ConfigError(
            f"--method {cfg.method} is not implemented for {spec.family} models; use one of "
            f"{', '.join(spec.methods)}"
        )
    if spec.experts is None:
        return
    # Expert inputs are routed token rows, not [sample, position] windows, so GPTQ's first-token options
    # reach the attention Linears only (the method's default weighting included); asking for them
    # explicitly on a MoE model is refused rather than half applied. The float model routes tokens
    # differently from the quantized one, so asymmetric calibration has no per-expert pairing.
    unsupported = [
        flag
        for flag, on in (
            ("--gptaq", cfg.gptaq),
            ("--skip-first", cfg.skip_first),
            ("--first-token-weight", cfg.first_token_weight is not None),
        )
        if on
    ]
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} is not supported for mixture-of-experts models ({spec.family}); "
            "drop it"
        )
