"""What a family changes in transformers' module tree before qserve fills it block by block.

Calibration (quantize/pipeline.py) and evaluation of quantized checkpoints (qserve/evaluate.py) build
the model on the meta device and fill it tensor by tensor from checkpoint names. `prepare_skeleton` makes
that tree match the checkpoint: a mixture-of-experts block gets one Linear per expert projection
(quantize/moe.py), a child that checkpoints name differently is registered under their name
(Mixtral's `mlp` as `block_sparse_moe`), and Gemma 3's scaled embedding, whose scale is a non-persistent buffer that no
checkpoint stores, becomes an embedding that holds the scale as a number.
"""

from __future__ import annotations

import torch
from torch import nn

from qserve.quantize.arch import ArchSpec
from qserve.quantize.moe import unfuse_experts


class ScaledEmbedding(nn.Embedding):
    """Embedding times a constant, as transformers' Gemma3TextScaledWordEmbedding computes it (the
    scale cast to the weight's dtype), with the scale kept as a float instead of a buffer."""

    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None, scale: float) -> None:
        super().__init__(num_embeddings, dim, padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


def prepare_skeleton(model: nn.Module, spec: ArchSpec) -> None:
    for block in model.get_submodule(spec.blocks) if spec.renamed else ():
        for attr, stored in spec.renamed:
            # Registered under the checkpoint's name (state_dict, get_submodule, materialize); the
            # block's forward still finds it under transformers' attribute, kept as a plain reference.
            child = block._modules.pop(attr)
            block.add_module(stored, child)
            object.__setattr__(block, attr, child)
    if spec.experts:
        unfuse_experts(model, spec.blocks, spec.experts, spec.expert_linears)
    embed = model.get_submodule(spec.embed)
    scale = getattr(embed, "scalar_embed_scale", None)
    if scale is not None:
        with torch.device(embed.weight.device):
            new = ScaledEmbedding(embed.num_embeddings, embed.embedding_dim, embed.padding_idx, float(scale))
        new.to(embed.weight.dtype)
        model.set_submodule(spec.embed, new)
