"""Linear layers of the engine: dense, or 4-bit GPTQ / AWQ holding the packed checkpoint tensors.

The model fuses q/k/v and gate/up into one layer each, so a layer is built from several checkpoint
Linears ("parts") whose outputs are concatenated.

On CUDA a quantized layer keeps the packed tensors and calls `qserve.kernels.dequant_gemm` (fused
dequantize + GEMM: the 4-bit weights are what is read from memory); a MoE block's experts are stacked
(`fuse_experts`) and run by `qserve.kernels.fused_moe`, one launch per projection for all experts. On CPU a 4-bit layer is repacked
once at load into the CPU kernels' own 4-bit layout (`qserve.kernels.cpu_packed`: still 4-bit, groups
made contiguous, act-order folded into an input permutation) and runs qserve's C++ kernels: a fused
dequant-GEMV for decode-sized batches, tile-by-tile dequantization into a GEMM for prefill. Only
where those kernels cannot run (no C++ compiler, or QSERVE_CPU_EXT=0; `cpu_ext` warns once), for
8-/2-bit layers, or when QSERVE_CPU_PACKED=0 asks for it (benchmarks compare the two) is the layer
dequantized at load into a dense weight in the compute dtype.

Embeddings and the LM head of a quantized checkpoint stored in bf16 stay bf16 on the CPU
(`HalfEmbedding`, `Bf16Linear`): the head's GEMV reads bf16 and accumulates in fp32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from qserve import kernels
from qserve.kernels import cpu_ext, cpu_gemm, cpu_packed, packing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's Linears are packed (read from its metadata by the loader)."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    checkpoint_format: str = "gptq"  # GPTQ zero convention: "gptq" (v1, stores z - 1) or "gptq_v2"
    desc_act: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "awq"):
            raise ValueError(f"QuantSpec.method must be 'gptq' or 'awq', got {self.method!r}")
        if self.method == "awq" and self.bits != 4:
            raise ValueError(f"AWQ GEMM exists only at 4 bits, got bits={self.bits}")


@dataclass(frozen=True)
class PackedLinear:
    """One checkpoint Linear's packed tensors, as stored (see kernels/packing.py for the layouts)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None  # GPTQ only; None means contiguous groups

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def dequantize(self, spec: QuantSpec) -> torch.Tensor:
        """W' [out, in] float32 through the shared format code."""
        if spec.method == "awq":
            return packing.dequantize_awq(self.qweight, self.qzeros, self.scales, spec.group_size)
        return packing.dequantize_gptq(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            spec.bits,
            spec.group_size,
            spec.checkpoint_format,
        )


class DenseLinear(nn.Module):
    """An unquantized Linear (or a 4-bit one dequantized at load where no packed kernel takes it).

    A bf16 weight on a CPU whose oneDNN has bf16 GEMMs (AVX512-BF16/AMX) is reordered once, at load, into
    oneDNN's blocked layout (`cpu_gemm.onednn_bf16_packing`) and held only in that form: every GEMM then
    skips the per-call reorder of the plain weight that `F.linear` pays. `weight` stays as a meta tensor
    with the shape and dtype, so code that asks for them still can."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed: torch.Tensor | None = None  # oneDNN's opaque blocked weight, or None
        self.packed_bytes = 0
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and cpu_gemm.onednn_bf16_packing():
            self.packed = cpu_gemm.onednn_pack(weight)
            self.packed_bytes = weight.numel() * weight.element_size()
            weight = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return cpu_gemm.onednn_linear(x, self.packed, self.bias, self.weight.shape[0])
        return cpu_gemm.linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """Packed 4-bit Linear(s) computed with the fused dequant-GEMM kernel (CUDA)."""

    def __init__(self, parts: list[PackedLinear], bias: torch.Tensor | None, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        # Plain attributes, not buffers: the loader places tensors on their device once, and a
        # Module.to(dtype) must never cast the fp16 scales.
        self.parts = _concat_parts(parts, spec)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [
            kernels.dequant_gemm(
                x,
                p.qweight,
                p.qzeros,
                p.scales,
                p.g_idx,
                None,
                fmt=self.spec.method,
                bits=self.spec.bits,
                group_size=self.spec.group_size,
                checkpoint_format=self.spec.checkpoint_format,
            )
            for p in self.parts
        ]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias


class CpuQuantLinear(nn.Module):
    """4-bit Linear(s) on the CPU in the resident layout of `qserve.kernels.cpu_packed`.

    Fused parts share one packed weight unless act-order gave them different input permutations;
    then each keeps its own and the outputs are concatenated.
    """

    def __init__(self, weights: list[cpu_packed.CpuPackedWeight], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weights = weights  # plain attribute: Module.to(dtype) must not touch the packed tensors
        self.bias = bias
        self.plan: cpu_packed.Plan | None = None  # the kernel settings, read at the first call

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            self.plan = cpu_packed.current_plan()
        if len(self.weights) == 1:
            y = cpu_packed.linear(x, self.weights[0], self.plan)
        else:
            y = torch.cat([cpu_packed.linear(x, w, self.plan) for w in self.weights], dim=-1)
        return y if self.bias is None else y + self.bias


class Bf16Linear(nn.Module):
    """A dense Linear whose weight stays bf16 on the CPU (a quantized model's LM head): C++ GEMV with fp32
    accumulation, output in the activations' dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, self.weight, self.bias)


class HalfEmbedding(nn.Module):
    """Token embedding kept in its 16-bit checkpoint dtype; looked-up rows come out in `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.out_dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight).to(self.out_dtype)


def _cpu_packed_linear(
    parts: list[PackedLinear], bias: torch.Tensor | None, spec: QuantSpec
) -> CpuQuantLinear | None:
    """The resident 4-bit form of a layer, or None (with the reason logged) where it cannot hold it."""
    if spec.bits != 4:
        log.info(
            "qserve: %d-bit layers run dequantized on the CPU (the packed CPU kernels are 4-bit)", spec.bits
        )
        return None
    if os.environ.get("QSERVE_CPU_PACKED", "1") == "0":  # the old dense path, for side-by-side benchmarks
        return None
    if not cpu_ext.available():  # warned once by cpu_ext; raises under QSERVE_REQUIRE_CPU_EXT=1
        return None
    logical = [
        cpu_packed.from_checkpoint(
            p.qweight,
            p.qzeros,
            p.scales,
            p.g_idx,
            fmt=spec.method,
            group_size=spec.group_size,
            checkpoint_format=spec.checkpoint_format,
        )
        for p in parts
    ]
    same_order = all(
        (g is None and logical[0][3] is None)
        or (g is not None and logical[0][3] is not None and torch.equal(g, logical[0][3]))
        for _, _, _, g in logical
    )
    groups = [logical] if same_order else [[one] for one in logical]
    try:
        weights = [
            cpu_packed.repack(
                torch.cat([q for q, _, _, _ in group]),
                torch.cat([s for _, s, _, _ in group], dim=1),
                torch.cat([z for _, _, z, _ in group], dim=1),
                group[0][3],
                spec.group_size,
            )
            for group in groups
        ]
    except ValueError as exc:
        log.warning("qserve: a 4-bit layer runs dequantized on the CPU: %s", exc)
        return None
    return CpuQuantLinear(weights, bias)


def _concat_parts(parts: list[PackedLinear], spec: QuantSpec) -> list[PackedLinear]:
    """Merge parts into one packed Linear when their layouts allow it, so a fused layer is one launch.

    Both layouts pack the output dim in whole words of 32 / bits columns and share the input grouping
    unless act-order gave each part its own g_idx; then the parts stay separate.
    """
    per_word = 32 // spec.bits
    same_groups = all(
        (p.g_idx is None and parts[0].g_idx is None)
        or (p.g_idx is not None and parts[0].g_idx is not None and torch.equal(p.g_idx, parts[0].g_idx))
        for p in parts
    )
    if len(parts) == 1 or not same_groups or any(p.out_features % per_word for p in parts):
        return parts
    return [
        PackedLinear(
            qweight=torch.cat([p.qweight for p in parts], dim=1),  # GPTQ [in/8, out], AWQ [in, out/8]
            qzeros=torch.cat([p.qzeros for p in parts], dim=1),  # [G, out/8]
            scales=torch.cat([p.scales for p in parts], dim=1),  # [G, out]
            g_idx=parts[0].g_idx,
        )
    ]


def build_linear(
    parts: list[torch.Tensor | PackedLinear],
    biases: list[torch.Tensor | None],
    spec: QuantSpec | None,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """One engine Linear from checkpoint parts (dense weights [out, in] or packed), outputs concatenated.

    A bias that some parts have and others lack is zero-filled for the latter.
    """
    out_sizes = [p.shape[0] if isinstance(p, torch.Tensor) else p.out_features for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [torch.zeros(n) if b is None else b.float() for b, n in zip(biases, out_sizes, strict=True)]
        ).to(device=device, dtype=dtype)
    packed = [p for p in parts if isinstance(p, PackedLinear)]
    if device.type == "cuda" and spec is not None and len(packed) == len(parts):
        moved = [
            PackedLinear(
                p.qweight.to(device),
                p.qzeros.to(device),
                p.scales.to(device),
                None if p.g_idx is None else p.g_idx.to(device),
            )
            for p in packed
        ]
        return QuantLinear(moved, bias, spec)
    if device.type == "cpu" and spec is not None and packed and len(packed) == len(parts):
        layer = _cpu_packed_linear(packed, bias, spec)
        if layer is not None:
            return layer
    dense = [p if isinstance(p, torch.Tensor) else p.dequantize(spec) for p in parts]
    weight = torch.cat([w.float() for w in dense], dim=0) if len(dense) > 1 else dense[0]
    return DenseLinear(weight.to(device=device, dtype=dtype).contiguous(), bias)


class FusedExperts(nn.Module):
    """Every routed expert of a MoE block as stacked packed tensors, computed by `kernels.fused_moe`:
    on CUDA one Triton launch per projection for all experts (no per-expert loop, no host read).

    Built from the experts' `QuantLinear`s by `fuse_experts`, which then points each expert's parts at
    views of the stacks, so the weights are held once. `backend` None picks by device; tests set
    "triton" to run the CUDA path's kernels on CPU tensors under TRITON_INTERPRET=1."""

    def __init__(self, gate_up: list[kernels.StackedPacked], down: kernels.StackedPacked, spec: QuantSpec,
                 activation) -> None:  # fmt: skip
        super().__init__()
        self.gate_up, self.down, self.spec, self.activation = gate_up, down, spec, activation
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return kernels.fused_moe(
            x, self.gate_up, self.down, topk_weights, topk_ids, fmt=self.spec.method, bits=self.spec.bits,
            group_size=self.spec.group_size, checkpoint_format=self.spec.checkpoint_format,
            activation=self.activation, backend=self.backend,
        )  # fmt: skip


def _split_columns(p: PackedLinear, n0: int, spec: QuantSpec) -> list[PackedLinear]:
    """A concatenated gate|up packed Linear cut back into gate (its first n0 outputs) and up."""
    per_word = 32 // spec.bits
    qcut = n0 if spec.method == "gptq" else n0 // per_word  # GPTQ qweight [in/8, out], AWQ [in, out/8]
    return [
        PackedLinear(p.qweight[:, :qcut], p.qzeros[:, : n0 // per_word], p.scales[:, :n0], p.g_idx),
        PackedLinear(p.qweight[:, qcut:], p.qzeros[:, n0 // per_word :], p.scales[:, n0:], p.g_idx),
    ]


def _stack(parts: list[PackedLinear], group_size: int) -> kernels.StackedPacked:
    """One projection of every expert stacked on a new leading dim. When some experts have act-order
    g_idx and others contiguous groups (None: e.g. a starved expert rounded to nearest), the latter get
    their explicit i // group_size, so one kernel variant serves all."""
    g_idx = None
    if any(p.g_idx is not None for p in parts):
        in_features = next(p.g_idx.numel() for p in parts if p.g_idx is not None)
        gs = in_features if group_size == -1 else group_size
        device = parts[0].scales.device
        trivial = torch.arange(in_features, device=device, dtype=torch.int32) // gs
        g_idx = torch.stack([trivial if p.g_idx is None else p.g_idx.to(torch.int32) for p in parts])
    return kernels.StackedPacked(
        torch.stack([p.qweight for p in parts]),
        torch.stack([p.qzeros for p in parts]),
        torch.stack([p.scales for p in parts]),
        g_idx,
    )


def fuse_experts(experts: list[nn.Module]) -> FusedExperts | None:
    """The stacked form of a MoE block's experts (each an MLP with `gate_up_proj`, `down_proj` and
    `act`), or None unless every expert's Linears are bias-free `QuantLinear`s (the CUDA layout) with
    one spec; CPU layers (`CpuQuantLinear`, `DenseLinear`) are never fused, so the CPU path is unchanged.

    Each expert's QuantLinear is then re-pointed at views of the stacks: it still computes the same
    thing (tests compare the two) and the packed weights are held once."""
    layers = [(m.gate_up_proj, m.down_proj) for m in experts]
    if not layers or not all(isinstance(q, QuantLinear) and q.bias is None for pair in layers for q in pair):
        return None
    spec = layers[0][0].spec
    if any(q.spec != spec for pair in layers for q in pair) or any(len(d.parts) != 1 for _, d in layers):
        return None
    gate_ups = [list(g.parts) for g, _ in layers]
    if len({len(parts) for parts in gate_ups}) > 1 or len(gate_ups[0]) > 2:
        # some experts' gate and up were concatenated and others' not (different act-order g_idx):
        # cut the concatenated ones so every expert has a gate and an up stack
        gate_ups = [parts if len(parts) == 2 else _split_columns(parts[0], parts[0].out_features // 2, spec)
                    for parts in gate_ups]  # fmt: skip
        if any(len(parts) != 2 for parts in gate_ups):
            return None
    gate_up = [_stack([parts[i] for parts in gate_ups], spec.group_size) for i in range(len(gate_ups[0]))]
    down = _stack([d.parts[0] for _, d in layers], spec.group_size)
    for e, (g, d) in enumerate(layers):
        g.parts = [_expert_view(s, e, gate_ups[e][i].g_idx is not None) for i, s in enumerate(gate_up)]
        d.parts = [_expert_view(down, e, d.parts[0].g_idx is not None)]
    return FusedExperts(gate_up, down, spec, experts[0].act)


def _expert_view(s: kernels.StackedPacked, e: int, act_order: bool) -> PackedLinear:
    return PackedLinear(s.qweight[e], s.qzeros[e], s.scales[e], s.g_idx[e] if act_order else None)


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy in memory: its parameters (each storage once) plus the packed
    tensors and biases that quantized layers hold as plain attributes. RoPE tables and the KV cache
    are not weights and are not counted."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        total += storage.nbytes()

    for t in model.parameters():
        add(t)
    total += getattr(model, "packed_head_bytes", 0)  # CausalLM's oneDNN copy of a tied bf16 head
    for module in model.modules():
        if isinstance(module, DenseLinear):
            total += module.packed_bytes  # 0 unless the weight lives in oneDNN's layout (its meta one adds 0)
        elif isinstance(module, CpuQuantLinear):
            for w in module.weights:
                for t in (w.qdata, w.scales, w.zeros, w.perm):
                    add(t)
            add(module.bias)
        elif isinstance(module, FusedExperts):
            for st in (*module.gate_up, module.down):
                for t in (st.qweight, st.qzeros, st.scales, st.g_idx):
                    add(t)
        elif isinstance(module, QuantLinear):
            for p in module.parts:
                for t in (p.qweight, p.qzeros, p.scales, p.g_idx):
                    add(t)
            add(module.bias)
    return total
