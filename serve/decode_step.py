"""All decoder layers of a decode step in one C++ call, for a 4-bit model on the CPU.

At batch 1 a decode step of SmolLM2 (30 layers) runs ~330 small kernels; through the modules, each costs
a Python call, a wrapper's checks and a dispatcher trip, and at that size the interpreter's share rivals
the 4-bit GEMVs'. `qserve_cpu::decode_step` (kernels/csrc/decode_step.cpp) runs the same kernels in the
same order from C++, so its hidden states are bit-identical to the module path's.

It takes a step when every row is a decode (one new token per sequence) and the model is one it knows:
Llama-shaped decoder layers (pre-norm, fused qkv and gate|up, SiLU MLP, Qwen3's q/k norms or none, no
sliding window, one RoPE) whose linears are all resident 4-bit (`CpuQuantLinear`). Anything else (prefill and mixed
steps, MoE, Gemma's sandwich norms, dense or act-order-split linears, tensor-parallel shards) takes the
module path unchanged. `QSERVE_CPU_FUSED_DECODE=0` turns it off (for side-by-side runs).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from qserve.kernels import cpu_ext, cpu_packed

log = logging.getLogger(__name__)


class DecodeStep:
    """The flattened weights of a model the C++ decode step can run, and the per-step checks."""

    def __init__(self, model, params: list[torch.Tensor], dims: list[int]) -> None:
        cfg = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = float(model.layers[0].self_attn.scale)
        self.eps = float(model.layers[0].input_layernorm.eps)
        self.norm_dtype = model.layers[0].input_layernorm.weight.dtype
        # the kernel path is the same for every layer (checked in `_refusal`): the first linear decides it
        self.first = model.layers[0].self_attn.qkv_proj
        self.params, self.dims = params, dims
        self.op = torch.ops.qserve_cpu.decode_step.default
        self.calls = 0

    def applies(self, x: torch.Tensor, rope, kv_caches, meta) -> bool:
        """Whether this step can take the C++ path: every row a decode, and dtypes the kernels take."""
        return (
            x.dim() == 2
            and 0 < x.shape[0] == meta.seq_lens.shape[0]
            and x.dtype == self.norm_dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.device.type == "cpu"
            and kv_caches[0][0].dtype == x.dtype
            and rope[0].dtype in (torch.float32, x.dtype)
        )

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_caches, meta) -> torch.Tensor:
        n = x.shape[0]
        cos, sin = rope
        linear = self.first
        if linear.plan is None:
            linear.plan = cpu_packed.current_plan()
        plan = linear.plan
        x = x.contiguous()
        path, isa, tiles = cpu_packed.kernel_args(x, linear.weights[0], plan)
        self.calls += 1
        return self.op(
            x,
            self.params,
            self.dims,
            [kv[0] for kv in kv_caches],
            [kv[1] for kv in kv_caches],
            cos.reshape(n, -1).contiguous(),
            sin.reshape(n, -1).contiguous(),
            meta.slot_mapping.long().contiguous(),
            meta.block_tables.to(torch.int32).contiguous(),
            meta.seq_lens.to(torch.int32).contiguous(),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.scale,
            self.eps,
            path,
            isa,
            tiles,
        )


def build(model) -> DecodeStep | None:
    """A DecodeStep for `model` (a CausalLM), or None where its layers are not all of the kind the C++ step
    runs (logged at debug level with the reason)."""
    why = _refusal(model)
    if why is not None:
        log.debug("qserve: decode steps run through the modules (%s)", why)
        return None
    empty = torch.empty(0)
    params: list[torch.Tensor] = []
    dims: list[int] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        params.append(layer.input_layernorm.weight)
        for i, lin in enumerate((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
            w = lin.weights[0]
            params += [w.qdata, w.scales, w.zeros, empty if w.perm is None else w.perm]
            params.append(empty if lin.bias is None else lin.bias)
            dims += [w.out_features, w.group_size]
            if i == 1:
                params.append(layer.post_attention_layernorm.weight)
        params += [attn.q_norm.weight, attn.k_norm.weight] if attn.qk_norm else [empty, empty]
    return DecodeStep(model, params, dims)


def _refusal(model) -> str | None:
    """Why the C++ decode step cannot run `model`, or None when it can."""
    from qserve.serve.model import MLP, Attention, DecoderLayer
    from qserve.serve.quant_linear import CpuQuantLinear

    if os.environ.get("QSERVE_CPU_FUSED_DECODE", "1") == "0":
        return "QSERVE_CPU_FUSED_DECODE=0"
    if not cpu_ext.available():
        return "the C++ kernels are not built"
    if model.rotary_local is not None:
        return "two RoPE tables"
    if len(model.layers) == 0:
        return "no layers"
    eps = model.layers[0].input_layernorm.eps
    norm_dtype = model.layers[0].input_layernorm.weight.dtype
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if type(layer) is not DecoderLayer or layer.sandwich:
            return f"layer {i} is not a pre-norm decoder layer"
        if type(attn) is not Attention or attn.permute or attn.window is not None:
            return f"layer {i}'s attention has a partial rotary or a sliding window"
        if attn.qk_norm and not all(
            n.eps == eps and n.weight.dtype == norm_dtype for n in (attn.q_norm, attn.k_norm)
        ):
            return f"layer {i}'s q/k norms differ from its layer norms in eps or dtype"
        if type(mlp) is not MLP or mlp.act is not F.silu:
            return f"layer {i}'s MLP is not a SiLU MLP"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.eps != eps or norm.weight.dtype != norm_dtype or norm.weight.device.type != "cpu":
                return f"layer {i}'s norms differ from layer 0's"
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if type(lin) is not CpuQuantLinear or len(lin.weights) != 1:
                return f"layer {i} has a linear that is not one resident 4-bit weight"
            w = lin.weights[0]
            # every linear then takes the kernel path the first one does (kernel_path looks at K % 32 for
            # AMX and the group size % 4 for int8 activations)
            if w.in_features % 32 or w.group_size % 4:
                return f"layer {i} has a linear with {w.in_features} inputs and groups of {w.group_size}"
            if lin.bias is not None and lin.bias.dtype != norm_dtype:
                return f"layer {i} has a bias in {lin.bias.dtype}"
    return None
