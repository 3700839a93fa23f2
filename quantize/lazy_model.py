"""A model whose weights stay on disk until a block asks for them.

The skeleton is built on the meta device (no storage), then the driver materialises the embedding and
ONE decoder block at a time straight from the safetensors files (single file or sharded index), so
peak memory is one block plus the calibration activations, whatever the model's size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qserve.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class LazyCheckpoint:
    """Tensor name -> safetensors file of a Hugging Face checkpoint directory; reads tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file_of = self._weight_map()
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file, names in self._names_by_file(self._file_of).items():
            with safe_open(self.path / file, framework="pt") as f:
                for name in names:
                    sl = f.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map'): {exc}") from exc
        if (self.path / SINGLE_FILE).exists():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                return dict.fromkeys(f.keys(), SINGLE_FILE)
        found = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        raise CheckpointError(
            f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (found: {', '.join(found) or 'nothing'}); "
            "qserve reads safetensors weights only - re-save the model with save_pretrained(safe_serialization=True)"
        )

    @staticmethod
    def _names_by_file(file_of: dict[str, str]) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, file in file_of.items():
            by_file[file].append(name)
        return by_file

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    @property
    def files(self) -> list[Path]:
        return sorted({self.path / f for f in self._file_of.values()})

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._require(name)][0]

    def nbytes(self, name: str) -> int:
        return stored_nbytes(*self._meta[self._require(name)])

    def load(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors (as stored: dtype unchanged), opening each file once."""
        names = [self._require(n) for n in names]
        out: dict[str, torch.Tensor] = {}
        for file, group in self._names_by_file({n: self._file_of[n] for n in names}).items():
            with safe_open(self.path / file, framework="pt", device=str(device)) as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def _require(self, name: str) -> str:
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint's weights")
        return name


def stored_nbytes(shape: Iterable[int], st_dtype: str) -> int:
    """Bytes of a tensor from its safetensors header entry (shape, dtype string such as "BF16")."""
    n = 1
    for d in shape:
        n *= d
    return n * _ST_DTYPE_BYTES[st_dtype]


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal-LM module tree on the meta device: every parameter has a shape and no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def materialize(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, device: torch.device) -> None:
    """Give `module` (a submodule of a skeleton named `prefix`) real storage filled from the checkpoint."""
    state = module.state_dict(keep_vars=True)
    orphans = [n for n, _ in module.named_buffers() if n not in state]
    if orphans:
        # Non-persistent buffers (e.g. rotary inv_freq) are not in the checkpoint: such modules must be
        # rebuilt from the config (`rebuild`), not filled.
        raise CheckpointError(
            f"{prefix}: buffers {orphans} are not stored in checkpoints; rebuild the module"
        )
    tensors = ckpt.load([f"{prefix}.{n}" for n in state], device)
    module.to_empty(device=device)
    with torch.no_grad():
        for name, target in module.state_dict(keep_vars=True).items():
            src = tensors[f"{prefix}.{name}"]
            if tuple(src.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{ckpt.path}: tensor {prefix}.{name} has shape {tuple(src.shape)}, the config implies "
                    f"{tuple(target.shape)}; config.json and the weights disagree"
                )
            target.copy_(src)  # casts to the skeleton's compute dtype


def rebuild(model: nn.Module, name: str, device: torch.device) -> nn.Module:
    """Re-create a weightless submodule (rotary embedding) from the config on `device`."""
    old = model.get_submodule(name)
    with torch.device(device):  # the init computes its buffers (inv_freq) from the config here
        new = type(old)(config=model.config)
    model.set_submodule(name, new)
    return new


def release(module: nn.Module) -> None:
    """Drop the module's storage (back to meta) once its block is done."""
    module.to(device="meta")
