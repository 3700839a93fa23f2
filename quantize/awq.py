"""AWQ for one decoder block: search scales and clips (plain data), then fold the scales in.

Order of operations, as in llm-awq (`run_awq`) and AutoAWQ (`AwqQuantizer.quantize`): every scale
group is searched on the *original* block with activations captured from one float forward, and all
scales are applied together afterwards; the clip search then runs on the weights as they will be
once scaled (computed here without touching the block) with inputs divided by the same scales.
Applying groups one by one before searching the next would give the same result up to rounding:
folding another group's scales leaves this group's float inputs unchanged and only rescales whole
rows of its weights, which per-row-group RTN (and the duo-scaling weight statistic) follow exactly.
So the references' order costs nothing and keeps the search a pure function of the block.

Activations are reduced while the forward runs: per-channel mean |x| over every token, a strided
subset of token rows (for token-wise modules, Linear Grams and the clip search) and a few whole
sequences (for attention). `search_tokens` sets that budget; see the module docs of awq_scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qserve.quantize.arch import ArchSpec, ScaleGroup
from qserve.quantize.awq_clip import gram_blocks, search_clip
from qserve.quantize.awq_scale import InspectLoss, accepted_kwargs, batch_index, float32_tree, search_scale
from qserve.quantize.moe import needs_fallback

# The references do not clip the query/key projections: their error reaches the output through
# the softmax of q.k, which the per-linear output MSE of the clip search does not measure.
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AwqScale:
    prev_op: str
    linears: tuple[str, ...]
    scales: torch.Tensor  # [in_features of the linears], fp32 on CPU


@dataclass(frozen=True)
class AwqClip:
    linear: str
    max_val: torch.Tensor  # [out, G], fp32 on CPU, bounds |w| of the *scaled* weight


@dataclass(frozen=True)
class AwqBlockResult:
    scales: tuple[AwqScale, ...]
    clips: tuple[AwqClip, ...]
    log: tuple[dict, ...]  # per searched group: prev_op, linears, best_ratio, loss, rtn_loss, seconds

    def state_dict(self) -> dict:
        """Tensors under "scales.{i}" / "clips.{i}" (safetensors) and JSON-able "meta" (json)."""
        d: dict = {f"scales.{i}": s.scales.contiguous() for i, s in enumerate(self.scales)}
        d.update({f"clips.{i}": c.max_val.contiguous() for i, c in enumerate(self.clips)})
        d["meta"] = {
            "scales": [{"prev_op": s.prev_op, "linears": list(s.linears)} for s in self.scales],
            "clips": [c.linear for c in self.clips],
            "log": [dict(entry) for entry in self.log],
        }
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> AwqBlockResult:
        meta = d["meta"]
        scales = tuple(
            AwqScale(m["prev_op"], tuple(m["linears"]), d[f"scales.{i}"].float().cpu())
            for i, m in enumerate(meta["scales"])
        )
        clips = tuple(AwqClip(name, d[f"clips.{i}"].float().cpu()) for i, name in enumerate(meta["clips"]))
        log = tuple({**e, "linears": list(e["linears"])} for e in meta["log"])
        return cls(scales=scales, clips=clips, log=log)


@dataclass(frozen=True)
class LinearInputs:
    """What the search keeps of the input x of a Linear (fp32, on the compute device)."""

    abs_mean: torch.Tensor  # [in] mean |x| over every token
    rows: torch.Tensor  # [N, in] a strided subset of the tokens
    seqs: torch.Tensor | None  # [k, seq, in] whole sampled sequences, if a token-mixing module needs them
    count: int = 0  # tokens seen (a MoE expert's: those routed to it)


@dataclass(frozen=True)
class AwqActivations:
    inputs: dict[str, LinearInputs]  # by the name of the linear whose input it is
    sample_index: torch.Tensor  # [k] samples held in `seqs`, to select the matching block_kwargs
    n_samples: int


def applicable_groups(block: nn.Module, spec: ArchSpec) -> tuple[list[ScaleGroup], list[ScaleGroup]]:
    """(groups to search, groups skipped): a group whose `requires_same_shape` pair differs in
    shape cannot fold (v_proj -> o_proj under GQA: v has fewer output rows than o has inputs)."""
    keep, skip = [], []
    for g in spec.scale_groups:
        pair = g.requires_same_shape
        same = (
            pair is None
            or block.get_submodule(pair[0]).weight.shape == block.get_submodule(pair[1]).weight.shape
        )
        (keep if same else skip).append(g)
    return keep, skip


def input_sources(groups: list[ScaleGroup], spec: ArchSpec) -> dict[str, str]:
    """Each linear -> the linear whose captured input it reads (a group's linears share one input)."""
    src = {name: name for name in spec.linears}
    for g in groups:
        src.update({name: g.input_of for name in g.linears})
    return src


@torch.no_grad()
def collect_awq_activations(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict,
    spec: ArchSpec,
    *,
    search_tokens: int = 2048,
    max_chunk_tokens: int = 16384,
) -> tuple[AwqActivations, torch.Tensor]:
    """Run the float block over `inputs` [n, seq, hidden] in chunks, reducing the activations the
    search needs. Returns them and the block's float outputs (same shape/device as `inputs`): the
    references feed the next block with exactly these, so a driver can skip its own forward."""
    if inputs.dim() != 3:
        raise ValueError(f"AWQ expects block inputs [n_samples, seqlen, hidden], got {tuple(inputs.shape)}")
    n, seq, _ = inputs.shape
    groups, _ = applicable_groups(block, spec)
    sources = sorted(set(input_sources(groups, spec).values()))
    # A MoE block (input_module) takes [batch, seq, hidden] whole, like a token-mixing module.
    needs_seqs = {
        g.input_of
        for g in groups
        if g.input_module or _mixes_tokens(block.get_submodule(g.inspect), block_kwargs)
    }
    sample_index = torch.linspace(0, n - 1, min(n, math.ceil(search_tokens / seq))).round().long().unique()
    stride = _coprime_stride(math.ceil(n * seq / min(search_tokens, n * seq)), seq)
    device = next(block.parameters()).device
    recorder = {name: _Recorder(seq, stride, sample_index, name in needs_seqs) for name in sources}
    handles = [block.get_submodule(name).register_forward_hook(recorder[name].hook) for name in sources]
    chunk = max(1, max_chunk_tokens // seq)
    outputs = torch.empty_like(inputs)
    try:
        for a in range(0, n, chunk):
            for r in recorder.values():
                r.first_sample = a
            kwargs = batch_index(block_kwargs, slice(a, a + chunk), n)
            y = block(inputs[a : a + chunk].to(device), **kwargs)
            outputs[a : a + chunk] = (y[0] if isinstance(y, tuple) else y).to(outputs.device)
    finally:
        for h in handles:
            h.remove()
    acts = {name: r.result() for name, r in recorder.items()}
    return AwqActivations(inputs=acts, sample_index=sample_index, n_samples=n), outputs


@torch.no_grad()
def awq_search_block(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict,
    spec: ArchSpec,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    n_grid: int = 20,
    duo_scaling: bool = True,
    clip: bool = True,
    max_chunk_tokens: int = 16384,
    search_tokens: int = 2048,
    activations: AwqActivations | None = None,
) -> AwqBlockResult:
    """Search AWQ scales (and clips) for one block; the block is left as it was.

    `activations` from `collect_awq_activations` (same block, inputs and spec) skip the forward.
    """
    if activations is None:
        activations, _ = collect_awq_activations(
            block, inputs, block_kwargs, spec, search_tokens=search_tokens, max_chunk_tokens=max_chunk_tokens
        )
    groups, _ = applicable_groups(block, spec)
    kwargs = float32_tree(batch_index(block_kwargs, activations.sample_index, activations.n_samples))
    scales, log = [], []
    for g in groups:
        acts = activations.inputs[g.input_of]
        in_f = block.get_submodule(g.linears[0]).in_features
        if acts is None or needs_fallback(g.input_of, acts.count, in_f):
            # A MoE expert the router starved: no scale (its Linears are rounded as they are)
            log.append({"prev_op": g.prev_op, "linears": list(g.linears), "tokens": 0 if acts is None else acts.count,
                        "fallback": "no scale"})  # fmt: skip
            continue
        inspect_module = block.get_submodule(g.inspect)
        if isinstance(inspect_module, nn.Linear) and g.linears != (g.inspect,):
            raise ValueError(
                f"scale group {g.prev_op}: a Linear inspect module must be the group's only linear"
            )
        x = acts.seqs if acts.seqs is not None else acts.rows
        # Token-wise modules (seqs is None) score sampled rows, which match no per-sequence kwargs.
        loss_fn = InspectLoss(
            block, g.inspect, g.linears, x, kwargs if acts.seqs is not None else {}, max_chunk_tokens
        )
        weights = [block.get_submodule(name).weight for name in g.linears]
        s, entry = search_scale(
            weights,
            acts.abs_mean,
            loss_fn,
            bits=bits,
            group_size=group_size,
            sym=sym,
            n_grid=n_grid,
            duo_scaling=duo_scaling,
        )
        scales.append(AwqScale(g.prev_op, g.linears, s))
        log.append({"prev_op": g.prev_op, "linears": list(g.linears), **entry})
    clips = _search_clips(block, spec, activations, groups, scales, bits, group_size, sym) if clip else []
    return AwqBlockResult(scales=tuple(scales), clips=tuple(clips), log=tuple(log))


@torch.no_grad()
def awq_apply_block(block: nn.Module, result: AwqBlockResult, spec: ArchSpec) -> None:
    """Fold each scale in: prev_op's output divided by s, the linears' input columns times s.

    An identity on the float block. Clips are not applied here: they are passed to
    `rtn_quantize(..., clip_max=)` when each linear is quantized.
    """
    tails = {g.prev_op for g in spec.scale_groups if g.prev_tail}
    for sc in result.scales:
        prev = block.get_submodule(sc.prev_op)
        s = sc.scales
        if isinstance(prev, nn.Linear):
            rows = prev.weight.shape[0]
            if rows != s.numel() and not (sc.prev_op in tails and rows > s.numel()):
                raise ValueError(
                    f"AWQ scales for {sc.linears} have {s.numel()} entries but {sc.prev_op} has {rows} "
                    "output rows; fix the family's scale_groups (prev_tail for a fused Linear)"
                )
            # A fused prev_op (prev_tail) feeds the group from its last rows only.
            _scale_param(prev.weight[rows - s.numel() :], 1.0 / s[:, None])  # output rows
        elif getattr(prev, "weight", None) is not None and prev.weight.dim() == 1 and spec.norm_offset:
            # Gemma: y = (offset + w) * norm(x), so (offset + w) / s = offset + w'
            off = spec.norm_offset
            prev.weight.copy_(((prev.weight.float() + off) / s.to(prev.weight.device) - off).to(prev.weight.dtype))
        elif getattr(prev, "weight", None) is not None and prev.weight.dim() == 1:
            _scale_param(prev.weight, 1.0 / s)  # RMSNorm / LayerNorm: y = w * norm(x) (+ b)
        else:
            raise TypeError(
                f"AWQ cannot fold scales into {sc.prev_op} ({type(prev).__name__}): "
                "expected a Linear or a norm with a 1-D weight; fix the family's scale_groups"
            )
        if getattr(prev, "bias", None) is not None:
            _scale_param(prev.bias[prev.bias.numel() - s.numel() :], 1.0 / s)
        for name in sc.linears:
            _scale_param(block.get_submodule(name).weight, s[None, :])


def folded_weight(block: nn.Module, name: str, scales: list[AwqScale]) -> torch.Tensor:
    """fp32 weight of linear `name` as `awq_apply_block` with `scales` would leave it."""
    w = block.get_submodule(name).weight.detach().float()
    for sc in scales:
        s = sc.scales.to(w.device)
        if name in sc.linears:
            w = w * s[None, :]
        if name == sc.prev_op:  # a fused prev_op (prev_tail): only its last rows feed the group
            w = torch.cat([w[: w.shape[0] - s.numel()], w[w.shape[0] - s.numel() :] / s[:, None]])
    return w


def _search_clips(block, spec, activations, groups, scales, bits, group_size, sym) -> list[AwqClip]:
    sources = input_sources(groups, spec)
    scale_of = {name: sc.scales for sc in scales for name in sc.linears}
    grams: dict[tuple[str, bool], torch.Tensor] = {}
    clips = []
    for name in spec.linears:
        if name.rsplit(".", 1)[-1] in NO_CLIP or ".experts." in f".{name}":
            continue  # q/k (as AutoAWQ); MoE experts, whose captured inputs are not their routed tokens
        acts = activations.inputs[sources[name]]
        key = (sources[name], name in scale_of)
        if key not in grams:
            # The linear will see x / s once the scales are folded in.
            rows = acts.rows / scale_of[name].to(acts.rows.device) if name in scale_of else acts.rows
            grams[key] = gram_blocks(rows, group_size)
        w = folded_weight(block, name, scales)
        max_val, _, _ = search_clip(
            w, grams[key], acts.rows.shape[0], bits=bits, group_size=group_size, sym=sym
        )
        clips.append(AwqClip(name, max_val.cpu()))
    return clips


class _Recorder:
    """Forward hook reducing one Linear's inputs chunk by chunk (see collect_awq_activations)."""

    def __init__(self, seq: int, stride: int, sample_index: torch.Tensor, keep_seqs: bool):
        self.seq, self.stride, self.keep_seqs = seq, stride, keep_seqs
        self.sample_index = sample_index.tolist()
        self.first_sample = 0
        self.abs_sum = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.seqs: list[torch.Tensor] = []

    def hook(self, module, args, output) -> None:
        x = args[0].detach()  # [b, seq, in]
        b = x.shape[0]
        flat = x.reshape(-1, x.shape[-1]).float()  # [b * seq, in]
        part = flat.abs().sum(dim=0)
        self.abs_sum = part if self.abs_sum is None else self.abs_sum + part
        self.count += flat.shape[0]
        offset = (-self.first_sample * self.seq) % self.stride  # first strided token in this chunk
        self.rows.append(flat[offset :: self.stride].clone())
        if self.keep_seqs:
            local = [
                i - self.first_sample
                for i in self.sample_index
                if self.first_sample <= i < self.first_sample + b
            ]
            if local:
                self.seqs.append(x[local].float())

    def result(self) -> LinearInputs | None:
        if self.count == 0:
            return None  # a MoE expert no calibration token was routed to
        seqs = torch.cat(self.seqs) if self.keep_seqs and self.seqs else None
        return LinearInputs(abs_mean=self.abs_sum / self.count, rows=torch.cat(self.rows), seqs=seqs, count=self.count)


def _coprime_stride(stride: int, seq: int) -> int:
    # A stride sharing a factor with seqlen samples the same few positions of every sequence
    # (e.g. always position 0, whose activations are atypically large); coprime visits all of them.
    while stride > 1 and math.gcd(stride, seq) != 1:
        stride += 1
    return stride


def _mixes_tokens(module: nn.Module, block_kwargs: dict) -> bool:
    """A module whose forward takes the block's per-sequence kwargs (attention) mixes tokens; one
    that takes only the hidden states (an MLP, a Linear) treats each token independently."""
    return bool(accepted_kwargs(module, block_kwargs))


def _scale_param(p: nn.Parameter, factor: torch.Tensor) -> None:
    # Multiply in fp32 and round once, rather than rounding the factor to a 16-bit dtype first.
    p.copy_((p.float() * factor.to(p.device)).to(p.dtype))
