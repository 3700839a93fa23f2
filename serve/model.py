"""qserve's Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3) over a flat token batch.

The engine packs every scheduled token of every sequence into one [num_tokens, hidden] batch with no
padding between sequences; attention finds each token's context through the paged KV cache
(`AttentionMetadata`). Attention and the KV write go through `qserve.kernels`, so the same model runs
the Triton kernels on CUDA and their torch paths on CPU. What a family changes is a named switch in
`ModelConfig`, read from its table in quantize/arch.py (`qk_norm`: Qwen3's per-head q/k RMSNorm;
`num_experts`: a mixture-of-experts MLP, `SparseMoE`, in every block: Qwen3-MoE, Mixtral, Qwen2-MoE, whose
quantized experts run the fused MoE kernel on CUDA; Gemma 3's (1 + w)
norms, sandwich norms, scaled embeddings, GELU MLP and local/global RoPE: `norm_offset`, `sandwich_norms`,
`embed_scale`, `hidden_act`, `local_rope` / `sliding_layers`). Sliding-window attention (Gemma 3's
local layers, Mistral, Mixtral, Phi-3, Qwen with use_sliding_window) is honoured per layer
(`ModelConfig.layer_window`): the attention kernels mask keys older than the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qserve import kernels
from qserve.errors import ConfigError
from qserve.kernels import cpu_ext, cpu_gemm
from qserve.quantize.arch import arch_for_config
from qserve.serve import decode_step as fused_decode
from qserve.serve.quant_linear import fuse_experts

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: the wavelength band that is interpolated smoothly between unscaled and scaled.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @classmethod
    def from_hf(cls, cfg: dict) -> RopeConfig:
        # transformers 5 writes `rope_parameters`; older configs (most hub checkpoints) `rope_theta`
        # plus an optional `rope_scaling` dict whose type key is `rope_type` or the legacy `type`.
        params = dict(cfg.get("rope_scaling") or {})
        params.update(cfg.get("rope_parameters") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"config.json rope type {rope_type!r} is not supported; qserve implements {', '.join(ROPE_TYPES)}"
            )
        return cls(
            theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face config.json that the decoder needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always, Llama with attention_bias
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None = None
    qk_norm: bool = False  # RMSNorm over each q and k head (weights [head_dim]) before RoPE: Qwen3
    # Mixture of experts (0: a dense MLP): experts per block, experts per token, an expert's
    # intermediate size, and whether the top-k routing weights are renormalised to sum to 1.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    renormalize_topk: bool = False
    hidden_act: str = "silu"  # the MLP's gate activation: silu, or gelu_pytorch_tanh (Gemma 3)
    # Gemma 3: every RMSNorm multiplies by (norm_offset + w) (the loader adds the offset to the stored
    # weights once); attention and MLP outputs are normalised again before their residual adds
    # (sandwich_norms: post_attention_layernorm on the attention output, pre_/post_feedforward_layernorm
    # around the MLP); embeddings are multiplied by embed_scale; q k^T is scaled by attn_scale instead
    # of head_dim^-0.5; layers marked in sliding_layers use local_rope (their own RoPE base).
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float | None = None
    local_rope: RopeConfig | None = None
    sliding_layers: tuple[bool, ...] = ()
    # GLM-4: RoPE on adjacent pairs of the first rotary_dim dims of each head (0: the whole head,
    # rotate-half). The engine permutes q and k so those pairs sit where the kernel rotates (i, i + D/2),
    # with the frequencies past rotary_dim / 2 zero (no rotation): q k^T is unchanged by the permutation.
    rotary_dim: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a gated dense expert beside the routed ones
    # Sliding-window attention: the layers that attend to only their last `sliding_window` positions
    # (empty: every layer, when sliding_window is set). From config.json's layer_types, else the
    # family's rule as transformers applies it (`_window_layers`).
    window_layers: tuple[bool, ...] = ()

    def layer_window(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer`, or None for full causal attention."""
        if self.sliding_window is None or (self.window_layers and not self.window_layers[layer]):
            return None
        return self.sliding_window

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        heads = cfg["num_attention_heads"]
        is_qwen2 = cfg.get("model_type") == "qwen2"
        attention_bias = bool(cfg.get("attention_bias", False))
        # The Qwen families declare a sliding window but only use it when use_sliding_window is set.
        qwen = cfg.get("model_type") in QWEN_WINDOW_FLAG
        window = (cfg.get("sliding_window") or None) if cfg.get("use_sliding_window", not qwen) else None
        spec = arch_for_config(cfg)
        rope_params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        partial = rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rotary_dim = int(head_dim * float(partial or 1.0)) if spec.rope_interleaved else 0
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ConfigError(f"config.json partial_rotary_factor={partial}: {rotary_dim} rotary dims of a "
                              f"{head_dim}-dim head; expected an even number <= {head_dim}")  # fmt: skip
        if partial not in (1, 1.0, None) and not spec.rope_interleaved:
            raise ConfigError(
                f"config.json partial_rotary_factor={partial} ({spec.family}) is not supported; qserve's "
                "engine rotates the whole head (partial_rotary_factor 1.0)"
            )
        fields = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=RopeConfig.from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias or (spec.qkv_bias and bool(cfg.get("qkv_bias", True))),
            o_bias=attention_bias and spec.o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
            window_layers=_window_layers(cfg) if window is not None else (),
            qk_norm=spec.qk_norm,
            hidden_act=_activation(cfg),
            sandwich_norms=spec.sandwich_norms,
            rotary_dim=rotary_dim,
            **(_moe_fields(cfg, spec) if spec.experts else {}),
        )
        if spec.family == "gemma3":
            fields.update(_gemma3_fields(cfg, spec))
        return cls(**fields)


QWEN_WINDOW_FLAG = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # sliding_window needs use_sliding_window


def _window_layers(cfg: dict) -> tuple[bool, ...]:
    """Which layers use the sliding window, as transformers decides: config.json's layer_types when it
    has them (transformers 5 writes them; Gemma 3's sliding_window_pattern is read in `_gemma3_fields`
    and here alike); Qwen2/Qwen3: layers from max_window_layers on; Qwen2-MoE: the even layers below
    max_window_layers; every other family (Mistral, Mixtral, Phi-3, Qwen3-MoE): every layer."""
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types:
        if len(types) != layers:
            raise ConfigError(f"config.json layer_types has {len(types)} entries for {layers} layers")
        return tuple(t == "sliding_attention" for t in types)
    model_type = cfg.get("model_type")
    if model_type in ("gemma3", "gemma3_text"):
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return tuple(bool((i + 1) % pattern) for i in range(layers))
    limit = int(cfg.get("max_window_layers", 28))
    if model_type in ("qwen2", "qwen3"):
        return tuple(i >= limit for i in range(layers))
    if model_type == "qwen2_moe":
        return tuple(bool((i + 1) % 2) and i < limit for i in range(layers))
    return ()


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _activation(cfg: dict) -> str:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json hidden activation {act!r} is not supported; qserve implements "
                          f"{', '.join(ACTIVATIONS)}")  # fmt: skip
    return act


def _gemma3_fields(cfg: dict, spec) -> dict:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ConfigError(f"config.json {key}={cfg[key]} ({spec.family}): logit soft-capping is not "
                              "implemented in qserve's engine (Gemma 3 ships without it)")  # fmt: skip
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError("config.json use_bidirectional_attention=true: qserve serves causal attention only")
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
        for i in range(layers)
    ]
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one RoPE dict per layer type
        rope = RopeConfig.from_hf({"rope_parameters": params["full_attention"]})
        local = RopeConfig.from_hf({"rope_parameters": params.get("sliding_attention", {})})
    else:  # hub configs: rope_theta (+ rope_scaling) global, rope_local_base_freq local
        rope = RopeConfig.from_hf({"rope_theta": cfg.get("rope_theta", 1e6), "rope_scaling": cfg.get("rope_scaling")})
        local = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10000.0)))
    scalar = cfg.get("query_pre_attn_scalar")
    return dict(
        rope=rope,
        local_rope=local,
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=float(cfg["hidden_size"]) ** 0.5,
        attn_scale=float(scalar) ** -0.5 if scalar else None,
    )


def _moe_fields(cfg: dict, spec) -> dict:
    n = next(cfg[k] for k in spec.num_experts_keys if cfg.get(k) is not None)  # arch_for_config checked it
    top_k = cfg.get("num_experts_per_tok")
    if not (isinstance(top_k, int) and 0 < top_k <= n):
        raise ConfigError(f"config.json num_experts_per_tok={top_k!r}: expected 1 .. {n} (the expert count)")
    return dict(
        num_experts=n,
        experts_per_token=top_k,
        expert_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
        if spec.shared_expert
        else 0,
        # Mixtral always renormalises; Qwen3-MoE only when the config says so (transformers' default: no)
        renormalize_topk=spec.renormalize_topk if spec.renormalize_topk is not None
        else bool(cfg.get("norm_topk_prob", False)),
    )


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of the flat batch reads and writes the paged KV cache (built by the runner)."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: cumulative query lengths
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this step's tokens
    max_query_len: int | None = None  # longest chunk, known on the host: CUDA attention needs no sync


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim / 2] in float32, with the config's scaling applied."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept,
        # the band between interpolated, so local attention patterns survive the context extension.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE with a cos/sin table precomputed up to `max_positions`.

    `rotary_dim` (< head_dim): only the first rotary_dim / 2 frequencies rotate, the rest are zero."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, rotary_dim: int = 0) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        if rotary_dim and rotary_dim < head_dim:
            inv_freq = torch.zeros(head_dim // 2)
            inv_freq[: rotary_dim // 2] = rope_inv_freq(rope, rotary_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_positions, head_dim / 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, 1, head_dim / 2] for the batch; looked up once per step, not per layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, device="meta"), requires_grad=False)  # loaded
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and cpu_ext.usable_low_precision(x, self.weight):
            # the same arithmetic in one C++ pass: bf16 ~7 ops less; fp32 8 us against 33 for F.rms_norm
            # at one 576-wide row (1 thread, 2026-12-03)
            return cpu_ext.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            # torch's fused kernel does the same float32 arithmetic in one op (~10 us less per call)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 like the reference implementation: bf16 variance loses too much.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_proj: nn.Module, o_proj: nn.Module) -> None:
        super().__init__()
        self.qkv_proj = qkv_proj  # fused q, k, v: one GEMM reads the activations once
        self.o_proj = o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        self.window: int | None = None  # this layer's sliding window; set by CausalLM from its index
        if cfg.qk_norm:  # weights loaded, like every norm
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.permute = bool(cfg.rotary_dim)
        if self.permute:
            self.register_buffer("perm", interleaved_rope_order(cfg.head_dim, cfg.rotary_dim), persistent=False)

    def _permute_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv with each q and k head's dims reordered (`interleaved_rope_order`), v untouched."""
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)[..., self.perm].reshape(n, self.q_size)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)[..., self.perm].reshape(n, self.kv_size)
        return torch.cat([q, k, v], dim=-1)

    def _norm_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [n, (H + 2 KVH) * D] with each q and k head RMS-normalised (Qwen3), v untouched."""
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # contiguous heads: the C++ norm takes them (a multi-row split is a strided view); the C++ decode
        # step (serve/decode_step.py) does the same
        q = self.q_norm(q.reshape(n, self.num_heads, self.head_dim).contiguous()).reshape(n, self.q_size)
        k = self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim).contiguous()).reshape(n, self.kv_size)
        return torch.cat([q, k, v], dim=-1)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n, heads = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x)  # [n, (heads + 2 * kv_heads) * head_dim]
        if self.qk_norm:
            qkv = self._norm_heads(qkv)
        if self.permute:
            qkv = self._permute_heads(qkv)
        key_cache, value_cache = kv_cache
        q = kernels.rope_and_write_kv(qkv, *rope, key_cache, value_cache, meta.slot_mapping, heads)
        out = kernels.paged_attention(
            q, key_cache, value_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, self.scale,
            max_query_len=meta.max_query_len, window=self.window,
        )
        return self.o_proj(out.reshape(n, self.q_size))  # [n, heads * head_dim]


def interleaved_rope_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """New order of a head's dims: the adjacent rotary pair (2i, 2i + 1) moves to (i, i + head_dim / 2),
    where rotate-half RoPE rotates it with frequency i; the unrotated dims fill the remaining pairs."""
    half = head_dim // 2
    perm = [0] * head_dim
    for i in range(rotary_dim // 2):
        perm[i], perm[i + half] = 2 * i, 2 * i + 1
    free = [*range(rotary_dim // 2, half), *range(half + rotary_dim // 2, head_dim)]
    for slot, source in zip(free, range(rotary_dim, head_dim), strict=True):
        perm[slot] = source
    return torch.tensor(perm)


class MLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj  # fused gate and up projections
        self.down_proj = down_proj
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act is F.silu and gate_up.dtype == torch.bfloat16 and cpu_ext.usable_low_precision(gate_up):
            return self.down_proj(cpu_ext.silu_mul(gate_up))  # one pass instead of chunk, silu and mul
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Router(nn.Module):
    """A MoE block's router: logits = x W^T over the experts; its weight [experts, hidden] is loaded
    unquantized and the logits are computed in float32."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class SparseMoE(nn.Module):
    """Top-k routed experts (softmax over all experts, top k, optionally renormalised).

    CPU (and unquantized experts): each expert an `MLP` run once over the tokens routed to it; the
    (token, slot) pairs are sorted by expert so that an expert's tokens are one contiguous gather and
    one GEMM per projection; experts that receive no token are skipped, so a step costs the active
    experts only. CUDA with quantized experts (`QuantLinear`): the experts are stacked at load
    (`fuse_experts`) and `FusedExperts` runs the fused MoE kernel, one launch per projection for every
    expert, with no read back to the host, so a CUDA graph capture of the decode step is not refused
    (scripts/gpu_check.py's moe stage compares graph and eager decoding on a GPU)."""

    def __init__(self, cfg: ModelConfig, experts: list[MLP], shared_expert: MLP | None = None) -> None:
        super().__init__()
        self.gate = Router(cfg.num_experts, cfg.hidden_size)  # the checkpoint's name: mlp.gate.weight
        self.experts = nn.ModuleList(experts)
        self.top_k, self.renormalize = cfg.experts_per_token, cfg.renormalize_topk
        self.shared_expert = shared_expert  # Qwen2-MoE: out += sigmoid(x . g) * shared_expert(x)
        if shared_expert is not None:
            self.shared_expert_gate = Router(1, cfg.hidden_size)
        self.fused = fuse_experts(experts)  # None unless the experts are CUDA-layout QuantLinears

    def _with_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)).to(x.dtype) * self.shared_expert(x)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (float32) and expert ids, [n, k] each."""
        probs = torch.softmax(self.gate(x), dim=-1)  # [n, experts] float32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [n, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self._with_shared(x, self.fused(x, *self._route(x)))
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # Routing reads expert counts on the host, which a CUDA graph cannot hold: stop the capture
            # here, before any illegal synchronisation, so the engine decodes eagerly (serve/cuda_graphs.py).
            raise RuntimeError("mixture-of-experts routing cannot be captured in a CUDA graph")
        if x.shape[0] == 1:
            return self._with_shared(x, self._one_token(x))
        weights, chosen = self._route(x)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host read per layer
        tokens = order // self.top_k
        pair_weights = weights.flatten()[order].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                t = tokens[start : start + count]
                out.index_add_(0, t, expert(x[t]) * pair_weights[start : start + count, None])
                start += count
        return self._with_shared(x, out)

    def _one_token(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-1 decode: the routing of one token in Python floats (one host read of its logits, no
        small tensor ops, whose fixed cost rivals a small expert's GEMV), then its k experts."""
        logits = self.gate(x)[0].tolist()
        top = sorted(range(len(logits)), key=lambda e: -logits[e])[: self.top_k]
        peak = logits[top[0]]
        exps = [math.exp(v - peak) for v in logits]
        total = sum(exps[e] for e in top) if self.renormalize else sum(exps)
        out = None
        for e in sorted(top):  # in expert order, as the batched path accumulates
            y = self.experts[e](x)
            if out is None:
                out = y.mul_(exps[e] / total)
            else:
                out.add_(y, alpha=exps[e] / total)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: Attention, mlp: MLP | SparseMoE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:  # Gemma 3
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, x, kv_cache, meta) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), kv_cache, meta))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; the loader fills in the weights."""

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        layers: list[DecoderLayer],
        lm_head: nn.Module | None,
        rotary_local: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = rotary
        self.rotary_local = rotary_local  # the sliding layers' RoPE (Gemma 3), else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")  # loaded
        self.layers = nn.ModuleList(layers)
        for i, layer in enumerate(layers):
            layer.self_attn.window = cfg.layer_window(i)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = lm_head  # None: tied to the embedding
        self.packed_head: torch.Tensor | None = None  # see pack_tied_head
        self.packed_head_bytes = 0
        self.decode_step: fused_decode.DecodeStep | None = None  # the layers in one C++ call (serve/decode_step.py)
        self._decode_step_checked = False  # built at the first CPU forward, once the weights are loaded

    def pack_tied_head(self) -> None:
        """A bf16 model with a tied head on a CPU whose oneDNN has bf16 GEMMs: keep a copy of the embedding
        in oneDNN's blocked layout for the LM-head GEMMs of batched steps (the lookup keeps the plain
        table), as vLLM's CPU backend does. Costs vocab x hidden x 2 bytes; SmolLM2's head at 64 rows,
        2 threads: 13.1 ms plain, 7.5 ms packed (2026-12-03, AMX machine)."""
        w = self.embed_tokens.weight
        if (
            self.lm_head is None
            and w.device.type == "cpu"
            and w.dtype == torch.bfloat16
            and cpu_gemm.onednn_bf16_packing()
        ):
            self.packed_head = cpu_gemm.onednn_pack(w)
            self.packed_head_bytes = w.numel() * w.element_size()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        rope = self.rotary(positions, x.dtype)
        if not self._decode_step_checked and x.device.type == "cpu":
            self.decode_step, self._decode_step_checked = fused_decode.build(self), True
        if self.decode_step is not None and self.decode_step.applies(x, rope, kv_caches, meta):
            x = self.decode_step(x, rope, kv_caches, meta)
        elif self.rotary_local is None:
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x = layer(rope, x, kv_cache, meta)
        else:
            local = self.rotary_local(positions, x.dtype)
            for layer, kv_cache, sliding in zip(self.layers, kv_caches, self.config.sliding_layers, strict=True):
                x = layer(local if sliding else rope, x, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [rows, hidden] -> float32 logits [rows, vocab]; called only on rows that sample."""
        if self.lm_head is None:
            w = self.embed_tokens.weight
            if (
                self.packed_head is not None
                and hidden.dtype == torch.bfloat16
                and hidden.shape[0] > cpu_gemm.BF16_KERNEL_MAX_ROWS  # fewer rows: the bf16 GEMV kernel
            ):
                return cpu_gemm.onednn_linear(hidden, self.packed_head, None, w.shape[0]).float()
            return cpu_gemm.linear(hidden, w).float()
        return self.lm_head(hidden).float()
