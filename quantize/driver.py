"""The block-by-block driver shared by RTN, GPTQ and AWQ.

For each decoder block, in order: load its weights from disk, collect what the method needs from the
calibration activations entering it, solve, write the dequantized weights back (so the activations
handed to the next block are those of the quantized model), re-run the block to produce the next
block's inputs, save the block durably, free it. Only one block is ever materialised.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qserve.kernels.packing import QuantizedWeight, rtn_quantize
from qserve.quantize.arch import ArchSpec
from qserve.quantize.capture import BlockInputs, capture_block_inputs, run_block, swapped
from qserve.quantize.config import QuantConfig
from qserve.quantize.export import block_tensors
from qserve.quantize.lazy_model import LazyCheckpoint, materialize, rebuild, release
from qserve.quantize.moe import FALLBACK, min_expert_tokens, needs_fallback
from qserve.quantize.resume import PartialState

CHUNK_TOKENS = 8192  # tokens per block forward: bounds attention/MLP scratch, keeps matmuls large
DIAG_SAMPLES = 8  # samples on which each block's output error vs the float block is measured
FLOAT_INPUTS = "float_hidden"  # the float model's activations, saved for resume beside "hidden"


@dataclass(frozen=True)
class BlockOutcome:
    """What quantizing one block produced: the quantized Linears, its log, and the method's search data."""

    qweights: dict[str, QuantizedWeight]
    log: list[dict[str, Any]]
    extra: dict[str, torch.Tensor]  # search tensors (AWQ scales/clips), saved beside the block
    search: dict[str, Any] | None = None  # what names those tensors (JSON), so the search can be re-applied
    # The float block's outputs (the float model's activations entering the next block), when the method
    # computed them anyway (GPTQ's asymmetric calibration)
    float_next: torch.Tensor | None = None


def samples_per_chunk(seqlen: int) -> int:
    return max(1, CHUNK_TOKENS // seqlen)


def served_weight(qw: QuantizedWeight) -> torch.Tensor:
    """W' [out, in] exactly as a reader of the checkpoint reconstructs it: the file stores fp16 scales,
    so later blocks calibrate against the rounded scales the served model will use."""
    return dataclasses.replace(qw, scales=qw.scales.to(torch.float16)).dequantize()


def _write_back(linear: nn.Linear, qw: QuantizedWeight) -> None:
    with torch.no_grad():
        linear.weight.copy_(served_weight(qw))


def quantize_block(
    block: nn.Module,
    inputs: BlockInputs | None,
    spec: ArchSpec,
    cfg: QuantConfig,
    prefix: str = "block",
    float_side: FloatSide | None = None,
) -> BlockOutcome:
    """Quantize every Linear of `block` in place (weights become their dequantized values).

    `float_side`: the float model beside it, for GPTQ's asymmetric calibration (`cfg.gptaq`)."""
    if cfg.sym is None:
        raise ValueError("cfg.sym is still automatic; resolve it first (quantize.config.resolve_gptq_grid)")
    if cfg.method == "rtn":
        return _rtn_block(block, spec, cfg)
    if inputs is None:
        raise ValueError(f"method {cfg.method} needs calibration inputs")
    if cfg.method == "gptq":
        return _gptq_block(block, inputs, spec, cfg, prefix, float_side)
    return _awq_block(block, inputs, spec, cfg)


def _rtn_block(block: nn.Module, spec: ArchSpec, cfg: QuantConfig) -> BlockOutcome:
    qweights, log = {}, []
    for name in spec.linears:
        start = time.perf_counter()
        linear = block.get_submodule(name)
        w = linear.weight.detach().float()
        qw = rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym, sym_scale=cfg.sym_scale)
        _write_back(linear, qw)
        err = (linear.weight.float() - w).norm() / w.norm().clamp(min=1e-12)
        qweights[name] = qw
        log.append({"layer": name, "weight_rel_err": err.item(), "seconds": time.perf_counter() - start})
    return BlockOutcome(qweights, log, {})


@dataclass(frozen=True)
class RowCut:
    """Which rows of a Linear's input [samples, seqlen, in] reach GPTQ's Hessian, and with what weight.

    `skip_first` leading tokens of each window are left out; the first token kept is weighted by
    `first_weight` (its rows scaled by sqrt(first_weight), so its x x^T term counts first_weight times:
    see QuantConfig.first_token_weight)."""

    skip_first: int = 0
    first_weight: float = 1.0

    @classmethod
    def of(cls, cfg: QuantConfig) -> RowCut:
        return cls(cfg.skip_first, cfg.resolved_first_token_weight())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:  # a MoE expert's routed token rows [tokens, in] carry no window position
            return x.detach()
        x = x.detach()[:, self.skip_first :] if self.skip_first else x.detach()
        if self.first_weight != 1.0 and x.shape[1] > 0:
            x = x.clone()  # never scale the activation the forward pass goes on with
            x[:, 0] *= self.first_weight**0.5
        return x


class _Collector(nn.Module):
    """Stands in for a Linear during a GPTQ collection pass: hands its input to a feeder (if any) and
    returns zeros, since nothing computed after it in that pass is used."""

    def __init__(self, out_features: int, feed: Any | None) -> None:
        super().__init__()
        self.out_features = out_features
        self.feed = feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feed is not None:
            self.feed(x)
        return x.new_zeros(*x.shape[:-1], self.out_features)


# Collection passes replace the collected Linears and every Linear quantized after them by
# _Collector stubs. False runs the plain block with hooks instead (the tests compare the two).
STUB_COLLECTION_PASSES = True


def _collection_pass(
    block: nn.Module,
    inputs: BlockInputs,
    chunk: int,
    feeds: dict[str, Any],
    unneeded: list[str],
) -> torch.Tensor:
    """One block forward that hands each Linear named in `feeds` its input; returns the block output
    (meaningful only when nothing was stubbed).

    The Linears in `unneeded` (this group and every later one) produce nothing this pass needs:
    their inputs are final once the earlier groups are quantized, so they are stubbed out, and a
    q/k/v pass costs an attention over zeros instead of a whole block (about a third of the FLOPs
    of the four passes together).
    """
    stubbed = set(unneeded) if STUB_COLLECTION_PASSES else set()
    stubs = {n: _Collector(block.get_submodule(n).out_features, feeds.get(n)) for n in stubbed}
    handles = [
        block.get_submodule(n).register_forward_hook(lambda _m, args, _out, f=f: f(args[0]))
        for n, f in feeds.items()
        if n not in stubbed
    ]
    try:
        with swapped(block, stubs):
            return run_block(block, inputs, chunk)
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class FloatSide:
    """The float model beside the quantized one, for GPTQ's asymmetric calibration (`cfg.gptaq`)."""

    block: nn.Module  # an unquantized copy of the block
    inputs: BlockInputs  # the float model's activations entering it
    # True: one whole float forward per block, holding every true-sequential group's float Linear
    # inputs until that group is collected (about n_tokens x sum of in_features; the caller checks it
    # fits). False: one float pass per group, each stubbed like the quantized one, holding a chunk.
    hold_all: bool = True


def _float_pass(
    side: FloatSide, start: int, chunk: int, names: list[str], cut: RowCut, unneeded: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The float block on samples [start, start + chunk): the inputs of the Linears `names`, and the
    block output (meaningful only when `unneeded` is empty)."""
    held: dict[str, torch.Tensor] = {}
    record = {n: (lambda x, n=n: held.__setitem__(n, cut(x))) for n in names}
    piece = BlockInputs(side.inputs.hidden[start : start + chunk], side.inputs.kwargs)
    return held, _collection_pass(side.block, piece, chunk, record, unneeded)


def _handed_over(
    held_all: dict[str, dict[int, torch.Tensor]], names: list[str]
) -> Callable[[int], dict[str, torch.Tensor]]:
    """Float inputs from one whole pass, each chunk released as it is handed over."""
    return lambda start: {n: held_all[n].pop(start) for n in names}


def _float_passes(
    side: FloatSide,
    chunk: int,
    names: list[str],
    cut: RowCut,
    unneeded: list[str],
    outs: list | None,
) -> Callable[[int], dict[str, torch.Tensor]]:
    """Float inputs from a float pass per chunk (block outputs appended to `outs`, if given)."""

    def float_inputs(start: int) -> dict[str, torch.Tensor]:
        held, out = _float_pass(side, start, chunk, names, cut, unneeded)
        if outs is not None:
            outs.append(out)
        return held

    return float_inputs


def _collect(
    block: nn.Module,
    inputs: BlockInputs,
    chunk: int,
    solvers: dict[str, Any],
    unneeded: list[str],
    cut: RowCut,
    float_inputs: Callable[[int], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Feed `solvers` their Linears' inputs over every calibration sample.

    `float_inputs(start)`: the float model's inputs of those Linears for the chunk of samples starting
    at `start`; each solver then gets them next to the quantized model's inputs of the same tokens
    (asymmetric calibration).
    """
    if float_inputs is None:
        feeds = {n: (lambda x, s=s: s.add_batch(cut(x))) for n, s in solvers.items()}
        _collection_pass(block, inputs, chunk, feeds, unneeded)
        return
    held: dict[str, torch.Tensor] = {}  # one chunk's float inputs, by Linear, until its pair arrives
    feeds = {
        n: (lambda x, n=n, s=s: s.add_batch(cut(x), held.pop(n))) for n, s in solvers.items()
    }
    for start in range(0, inputs.hidden.shape[0], chunk):
        held.update(float_inputs(start))
        piece = BlockInputs(inputs.hidden[start : start + chunk], inputs.kwargs)
        _collection_pass(block, piece, chunk, feeds, unneeded)


def _gptq_block(
    block: nn.Module,
    inputs: BlockInputs,
    spec: ArchSpec,
    cfg: QuantConfig,
    prefix: str,
    float_side: FloatSide | None = None,
) -> BlockOutcome:
    from qserve.quantize.gptq import GPTQ

    # True-sequential: each group is calibrated on inputs produced with the earlier groups already
    # quantized (q/k/v, then o, then gate/up, then down), one block forward per group.
    extra: dict[str, torch.Tensor] = {}
    search = None
    if cfg.awq_scales:
        extra, search = _prescale_block(block, inputs, spec, cfg, float_side)
    groups = spec.solve_groups(cfg.true_sequential)
    owners = spec.input_owners
    collected = [spec.collected(group) for group in groups]  # the others share their owner's Hessian
    qweights, log = {}, []
    chunk = samples_per_chunk(inputs.hidden.shape[1])
    float_next = None
    held_all: dict[str, dict[int, torch.Tensor]] = {}
    if float_side is not None and float_side.hold_all:
        # The float block never changes, so one whole forward gives every group's float inputs and
        # the float model's next-block inputs; each is handed over (and freed) when its group runs.
        outs: list[torch.Tensor] = []
        whole = _float_passes(
            float_side, chunk, [n for cols in collected for n in cols], RowCut.of(cfg), [], outs
        )
        for start in range(0, inputs.hidden.shape[0], chunk):
            for name, x in whole(start).items():
                held_all.setdefault(name, {})[start] = x
        float_next = torch.cat(outs)
    for index, group in enumerate(groups):
        linears = {name: block.get_submodule(name) for name in group}
        solvers = {
            name: GPTQ(linear.weight.detach(), name=f"{prefix}.{name}") for name, linear in linears.items()
        }
        collectors = collected[index]
        # True-sequential groups are in data-flow order and read only earlier groups' outputs, so
        # this group and all later ones are not needed to produce this group's inputs. In one-pass
        # mode every Linear must run for real (o_proj reads what q/k/v produce).
        later = [n for g in groups[index + 1 :] for n in g]
        unneeded = [*group, *later] if cfg.true_sequential else []
        last = index == len(groups) - 1
        float_inputs, outs = None, []
        if float_side is not None and float_side.hold_all:
            float_inputs = _handed_over(held_all, collectors)
        elif float_side is not None:
            # A float pass per chunk, stubbed like the quantized one; the last group's runs the whole
            # float block, whose output is the float model's next-block input.
            stubbed, keep = ([], outs) if last else (unneeded, None)
            float_inputs = _float_passes(float_side, chunk, collectors, RowCut.of(cfg), stubbed, keep)
        _collect(
            block, inputs, chunk, {n: solvers[n] for n in collectors}, unneeded, RowCut.of(cfg), float_inputs
        )
        if outs:
            float_next = torch.cat(outs)
        for name in group:
            if name not in collectors:
                solvers[name].take_hessian(solvers[owners[name]])
        for name in group:
            tokens, in_f = solvers[name].n_samples, linears[name].in_features
            if needs_fallback(name, tokens, in_f):  # a MoE expert the router starved (quantize/moe.py)
                qw = rtn_quantize(
                    linears[name].weight.detach().float(), cfg.bits, cfg.group_size, cfg.sym,
                    sym_scale=cfg.sym_scale,
                )  # fmt: skip
                _write_back(linears[name], qw)
                qweights[name] = qw
                log.append({"layer": name, "tokens": tokens, "min_tokens": min_expert_tokens(in_f),
                            "fallback": FALLBACK})  # fmt: skip
                continue
            res = solvers[name].quantize(
                bits=cfg.bits,
                group_size=cfg.group_size,
                sym=cfg.sym,
                damp=cfg.damp,
                desc_act=cfg.desc_act,
                static_groups=cfg.static_groups,
                block_size=cfg.block_size,
                mse=cfg.mse,
                sym_scale=cfg.sym_scale,
            )
            _write_back(linears[name], res.qweight)
            qweights[name] = res.qweight
            log.append(
                {
                    "layer": name,
                    "loss": float(res.loss),
                    "damp": float(res.damp),
                    "seconds": float(res.seconds),
                    **({"tokens": tokens} if ".experts." in name else {}),
                }
            )
        del solvers
    return BlockOutcome(qweights, log, extra, search, float_next=float_next)


def _prescale_block(
    block: nn.Module, inputs: BlockInputs, spec: ArchSpec, cfg: QuantConfig, float_side: FloatSide | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`cfg.awq_scales`: AWQ's scale search on this block (no clipping: GPTQ chooses the ranges), folded
    into the block (and into the float copy GPTAQ fits against, so both see the same Linear inputs).
    Returns the scales as saved tensors and the search log, like an AWQ block."""
    from qserve.quantize.awq import awq_apply_block

    result = _awq_search(block, inputs, spec, cfg, clip=False)
    awq_apply_block(block, result, spec)
    if float_side is not None:
        awq_apply_block(float_side.block, result, spec)
    state = result.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state["meta"].items() if k != "log"}
    meta["log"] = [_plain(entry) for entry in result.log]
    return tensors, meta


def _awq_block(block: nn.Module, inputs: BlockInputs, spec: ArchSpec, cfg: QuantConfig) -> BlockOutcome:
    from qserve.quantize.awq import awq_apply_block

    result = _awq_search(block, inputs, spec, cfg, clip=cfg.clip)
    awq_apply_block(block, result, spec)
    clips = {c.linear: c.max_val for c in result.clips}
    qweights = {}
    for name in spec.linears:
        linear = block.get_submodule(name)
        clip = clips.get(name)
        clip = None if clip is None else clip.to(linear.weight.device)
        qw = rtn_quantize(linear.weight.detach().float(), cfg.bits, cfg.group_size, cfg.sym, clip_max=clip)
        _write_back(linear, qw)
        qweights[name] = qw
    state = result.state_dict()
    extra = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # The log lives in the record's "layers"; the rest of the metadata names the saved tensors.
    search = {k: v for k, v in state["meta"].items() if k != "log"}
    return BlockOutcome(qweights, [_plain(entry) for entry in result.log], extra, search)


def _awq_search(block: nn.Module, inputs: BlockInputs, spec: ArchSpec, cfg: QuantConfig, clip: bool):
    """AWQ's scale (and, with `clip`, clipping) search on one block with the run's grid settings."""
    from qserve.quantize.awq import awq_search_block

    return awq_search_block(
        block,
        inputs.hidden,
        inputs.kwargs,
        spec,
        bits=cfg.bits,
        group_size=cfg.group_size,
        sym=cfg.sym,
        n_grid=cfg.n_grid,
        duo_scaling=cfg.duo_scaling,
        clip=clip,
    )


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    """A log entry made JSON-safe (tensors and tuples to numbers and lists)."""
    out = {}
    for k, v in entry.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()


def quantize_blocks(
    model: nn.Module,
    ckpt: LazyCheckpoint,
    spec: ArchSpec,
    cfg: QuantConfig,
    calib_ids: torch.Tensor | None,
    state: PartialState,
    device: torch.device,
    model_dtype: torch.dtype,
    hold_float_inputs: bool = True,
) -> list[dict[str, Any]]:
    """Quantize every block not yet committed in `state`; returns every block's record, in order.

    `hold_float_inputs`: for `cfg.gptaq`, see `FloatSide.hold_all` (the memory estimate decides)."""
    blocks = model.get_submodule(spec.blocks)
    n_blocks = len(blocks)
    start = state.done
    inputs = None
    if calib_ids is not None and start < n_blocks:
        inputs = _block0_inputs(model, ckpt, spec, calib_ids, device)
        if start > 0:  # the saved activations entering block `start`, bit-identical to the killed run's
            inputs = dataclasses.replace(inputs, hidden=state.load_inputs(device))
    # Asymmetric calibration follows the float model's activations too: same start, float blocks.
    float_hidden = None
    if inputs is not None and cfg.method == "gptq" and cfg.gptaq:
        float_hidden = inputs.hidden if start == 0 else state.load_inputs(device, FLOAT_INPUTS)
    bar = tqdm(
        range(start, n_blocks), initial=start, total=n_blocks, desc=f"{cfg.method} blocks", disable=cfg.quiet
    )
    for i in bar:
        prefix = f"{spec.blocks}.{i}"
        block = blocks[i]
        if inputs is not None:
            inputs = inputs.for_block(i)  # this block's keyword args (RoPE per layer type: Gemma 3)
        materialize(block, prefix, ckpt, device)
        t0 = time.perf_counter()
        ref = None
        if inputs is not None:
            diag = BlockInputs(inputs.hidden[:DIAG_SAMPLES], inputs.kwargs)
            ref = run_block(block, diag, samples_per_chunk(cfg.seqlen))
        float_side = None
        if float_hidden is not None:
            float_side = FloatSide(
                copy.deepcopy(block), BlockInputs(float_hidden, inputs.kwargs), hold_float_inputs
            )
        outcome = quantize_block(block, inputs, spec, cfg, prefix, float_side)
        record: dict[str, Any] = {"block": i, "layers": outcome.log}
        if outcome.search is not None:
            record["search"] = outcome.search
        last = i == n_blocks - 1
        next_hidden = None
        if inputs is not None:
            # Nothing follows the last block: run only the samples the error is measured on.
            next_hidden = run_block(block, diag if last else inputs, samples_per_chunk(cfg.seqlen))
            record["out_rel_err"] = _rel_err(next_hidden[:DIAG_SAMPLES], ref)
        record["seconds"] = time.perf_counter() - t0
        tensors = block_tensors(block, prefix, outcome.qweights, cfg.format, model_dtype)
        next_inputs = {}
        if not last and next_hidden is not None:
            next_inputs["hidden"] = next_hidden
            if float_side is not None:
                float_hidden = outcome.float_next
                next_inputs[FLOAT_INPUTS] = float_hidden
        float_side = None
        state.commit_block(i, tensors, record, outcome.extra, next_inputs)
        release(block)
        if next_hidden is not None:
            inputs = dataclasses.replace(inputs, hidden=next_hidden)
        bar.set_postfix(
            {
                "sec": f"{record['seconds']:.1f}",
                **({"err": f"{record['out_rel_err']:.3g}"} if "out_rel_err" in record else {}),
            }
        )
    return [state.block_record(i) for i in range(n_blocks)]


def _block0_inputs(
    model: nn.Module, ckpt: LazyCheckpoint, spec: ArchSpec, calib_ids: torch.Tensor, device: torch.device
) -> BlockInputs:
    embed = model.get_submodule(spec.embed)
    materialize(embed, spec.embed, ckpt, device)
    for name in spec.pre_blocks:
        rebuild(model, name, device)
    try:
        return capture_block_inputs(model, spec, calib_ids, device, samples_per_chunk(calib_ids.shape[1]))
    finally:
        release(embed)  # the exporter copies the embedding from the source files, not from here
