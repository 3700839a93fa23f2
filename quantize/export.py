"""Writing GPTQ v1 and AWQ-GEMM checkpoints exactly as docs/formats.md lays them out.

Packing goes through `kernels.packing` (the one definition of both layouts). A checkpoint is written to
a hidden sibling directory and renamed into place as the last step, so an interrupted export never
leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qserve.errors import ConfigError
from qserve.kernels.packing import QuantizedWeight, pack_awq, pack_gptq
from qserve.quantize.config import QuantConfig

MAX_SHARD_BYTES = 2 * 1024**3  # above this the weights are split into shards with an index, as HF does
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it
# Files that make a checkpoint usable besides the weights: tokenizer in its several spellings, chat
# template, generation defaults.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def quantization_config(cfg: QuantConfig) -> dict:
    """The metadata dict, with exactly the key set docs/formats.md gives for the layout."""
    if cfg.format == "awq":
        return {
            "quant_method": "awq",
            "zero_point": not cfg.sym,
            "group_size": cfg.group_size,
            "bits": cfg.bits,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    return {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "damp_percent": cfg.damp,
        "desc_act": cfg.desc_act,
        "static_groups": cfg.static_groups,
        "sym": cfg.sym,
        "true_sequential": cfg.true_sequential,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def pack_linear(prefix: str, qw: QuantizedWeight, layout: str) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one quantized Linear, named `prefix.qweight` etc., on CPU."""
    if layout == "awq":
        p = pack_awq(qw)
        tensors = {"qweight": p.qweight, "qzeros": p.qzeros, "scales": p.scales}
    else:
        g = pack_gptq(qw, checkpoint_format="gptq")
        tensors = {"qweight": g.qweight, "qzeros": g.qzeros, "scales": g.scales, "g_idx": g.g_idx}
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def block_tensors(
    block: nn.Module,
    prefix: str,
    qweights: dict[str, QuantizedWeight],
    layout: str,
    model_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Everything a finished block contributes to the checkpoint.

    Quantized Linears become packed tensors (+ fp16 bias); every other parameter (norms, which AWQ may
    have rescaled) is written as it now is in the block, in the model's dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for name, qw in qweights.items():
        out.update(pack_linear(f"{prefix}.{name}", qw, layout))
    quantized = {f"{name}.weight" for name in qweights}
    biases = {f"{name}.bias" for name in qweights}
    for name, param in block.named_parameters():
        if name in quantized:
            continue
        dtype = torch.float16 if name in biases else model_dtype
        out[f"{prefix}.{name}"] = param.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the output checkpoint, loaded only when its shard is written."""

    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_checkpoint(
    dest: Path,
    source: Path,
    entries: list[TensorEntry],
    cfg: QuantConfig,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write weights + metadata + tokenizer files into a staging sibling of `dest`, then rename it."""
    staging = dest.parent / f".{dest.name}.incomplete"
    if staging.exists():  # left by an export that was killed; it is ours and never complete
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _write_weights(staging, entries, max_shard_bytes)
    qcfg = quantization_config(cfg)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = qcfg
    write_json_durable(staging / "config.json", config)
    if cfg.format == "gptq":
        write_json_durable(staging / "quantize_config.json", qcfg)
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    fsync_dir(staging)
    if dest.exists():
        if not dest.is_dir() or any(dest.iterdir()):
            raise ConfigError(
                f"{dest} appeared while quantizing and is not empty; the result is in {staging}"
            )
        dest.rmdir()
    os.rename(staging, dest)
    fsync_dir(dest.parent)
    return dest


def _write_weights(root: Path, entries: list[TensorEntry], max_shard_bytes: int) -> None:
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards, strict=True):
        tensors = {e.name: e.load() for e in shard}
        save_file(tensors, root / file, metadata=SAFETENSORS_METADATA)
        fsync_path(root / file)
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        total = sum(e.nbytes for e in entries)
        write_json_durable(
            root / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )


def write_json_durable(path: Path, data: dict) -> None:
    """Write JSON and flush it to disk (not atomic: callers write into a staging directory or rename)."""
    path.write_text(json.dumps(data, indent=2) + "\n")
    fsync_path(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the entry is synced.
    fsync_path(path)
