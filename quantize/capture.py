"""What enters decoder block 0, captured without running (or even loading) any decoder block.

The model's own forward builds the block inputs (embedding, rotary cos/sin, causal mask, position
ids); a forward pre-hook with kwargs records them on a pass-through stand-in that replaces the block
list for the duration of the capture, so the forward finishes normally and no block weights are read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qserve.quantize.arch import ArchSpec

# Keyword arguments a block is called with that must not be replayed: the KV cache belongs to one
# forward, and calibration never caches.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


@dataclass
class BlockInputs:
    """The calibration activations entering a block and the keyword args every block is called with.

    `hidden` [n_samples, seqlen, hidden]. `kwargs` come from a batch-1 forward (position embeddings
    [1, seqlen, head_dim], causal mask or None, position ids [1, seqlen]): every calibration sample has
    the same length and no padding, so they broadcast over any chunk of samples.
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    # The keyword args of every block, where they differ by block (Gemma 3's sliding and global layers
    # get different RoPE tables and masks); the driver sets `kwargs` from it for each block.
    block_kwargs: list[dict[str, Any]] | None = None

    def for_block(self, index: int) -> BlockInputs:
        """These inputs with block `index`'s keyword args."""
        if self.block_kwargs is None:
            return self
        return BlockInputs(self.hidden, self.block_kwargs[index], self.block_kwargs)


class _PassThrough(nn.Module):
    """Stands in for the decoder blocks during capture: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def capture_block_inputs(
    model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, device: torch.device, samples_per_chunk: int
) -> BlockInputs:
    """Run `input_ids` [n, seqlen] through everything before block 0; the embedding and rotary modules
    must already be materialised on `device`, the blocks and final norm may stay on meta."""
    backbone = model.get_submodule(spec.blocks.rsplit(".", 1)[0])  # e.g. model.model (LlamaModel)
    # One pass-through per block: each records the keyword args its block would get (the same objects
    # for every block of most families; per layer type for Gemma 3).
    probes = nn.ModuleList(_PassThrough() for _ in model.get_submodule(spec.blocks))
    seen: list[tuple[torch.Tensor, dict[str, Any]]] = []
    block_kwargs: list[dict[str, Any]] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden, {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}))

    def record_kwargs(_module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        block_kwargs.append({k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS})

    handles = [probes[0].register_forward_pre_hook(record, with_kwargs=True)]
    # The final norm's weights are not loaded; the pass-through output skips it via Identity.
    swaps = {spec.blocks: probes, spec.final_norm: nn.Identity()}
    try:
        with swapped(model, swaps), torch.no_grad():
            kw_handles = [p.register_forward_pre_hook(record_kwargs, with_kwargs=True) for p in probes]
            backbone(input_ids=input_ids[:1].to(device), use_cache=False)
            for h in kw_handles:
                h.remove()
            seen.clear()
            for chunk in input_ids.split(samples_per_chunk):
                backbone(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.cat([h for h, _ in seen])  # [n_samples, seqlen, hidden]
    differ = any(_differs(kw, block_kwargs[0]) for kw in block_kwargs[1:])
    return BlockInputs(hidden=hidden, kwargs=block_kwargs[0], block_kwargs=block_kwargs if differ else None)


def _differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two blocks' keyword args differ (transformers hands most families one set for all)."""
    if a.keys() != b.keys():
        return True
    for key in a:
        xs, ys = _leaves(a[key]), _leaves(b[key])
        if len(xs) != len(ys) or not all(_same(x, y) for x, y in zip(xs, ys, strict=True)):
            return True
    return False


def _same(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.shape == y.shape
            and x.dtype == y.dtype
            and torch.equal(x, y)
        )
    return x == y


def _leaves(v: Any) -> list[Any]:
    return [x for item in v for x in _leaves(item)] if isinstance(v, (tuple, list)) else [v]


def run_block(block: nn.Module, inputs: BlockInputs, samples_per_chunk: int) -> torch.Tensor:
    """The block's output [n, seqlen, hidden] on all calibration samples, computed chunk by chunk."""
    outs = []
    with torch.no_grad():
        for chunk in inputs.hidden.split(samples_per_chunk):
            out = block(chunk, **inputs.kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)  # transformers <5 returns a tuple
    return torch.cat(outs)
