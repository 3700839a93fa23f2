"""Durable per-block state, so a killed run continues where it stopped and ends bit-identical.

`<output>.partial/` holds, per finished block, its exported tensors and its log, plus the activations
entering the next block (the previous block's are deleted once the next is committed) and a fingerprint of model files,
calibration tokens and config. Every file is written to a temporary name, fsynced and renamed;
`progress.json` is renamed last and is the commit point: a block counts as done only once it says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qserve import __version__
from qserve.errors import ConfigError
from qserve.quantize.config import QuantConfig
from qserve.quantize.export import SAFETENSORS_METADATA, fsync_dir, fsync_path, write_json_durable
from qserve.quantize.lazy_model import LazyCheckpoint, stored_nbytes

_HEAD_BYTES = 1 << 20  # the safetensors header plus the first tensors: changes whenever the weights do


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def fingerprint(
    model_dir: Path, ckpt: LazyCheckpoint, calib_ids: torch.Tensor | None, cfg: QuantConfig
) -> dict:
    """What must be unchanged for saved blocks to be reusable: model files, calibration tokens, config."""
    files = {}
    for path in [model_dir / "config.json", *ckpt.files]:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
        files[path.name] = {"size": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()}
    calib = None
    if calib_ids is not None:
        calib = hashlib.sha256(calib_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {
        "qserve": __version__,
        "model_files": files,
        "calibration_sha256": calib,
        "config": cfg.fingerprint_dict(),
    }


def _describe_mismatch(saved: dict, now: dict) -> str:
    reasons = []
    if saved.get("qserve") != now["qserve"]:
        reasons.append(f"qserve version {saved.get('qserve')} -> {now['qserve']}")
    if saved.get("model_files") != now["model_files"]:
        reasons.append("the model's files changed")
    if saved.get("calibration_sha256") != now["calibration_sha256"]:
        reasons.append("the calibration tokens differ (source, seed, n_samples, seqlen or the data changed)")
    old_cfg, new_cfg = saved.get("config", {}), now["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            reasons.append(f"{key}: saved {old_cfg.get(key)!r}, now {new_cfg.get(key)!r}")
    return "; ".join(reasons) or "unknown difference"


class PartialState:
    """The on-disk progress of one quantization run."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def open(cls, output: Path, fp: dict, resume: bool) -> PartialState:
        """Start fresh state, or (with `resume`) reattach to saved state whose fingerprint matches."""
        root = partial_dir(output)
        fp_file = root / "fingerprint.json"
        if root.exists():
            if not resume:
                raise ConfigError(
                    f"{root} holds the state of an interrupted run for {output}; pass --resume to continue "
                    f"it, or delete {root} to start over"
                )
            if not fp_file.exists():  # killed before the fingerprint was written: nothing usable inside
                shutil.rmtree(root)
            else:
                saved = json.loads(fp_file.read_text())
                if saved != fp:
                    raise ConfigError(
                        f"cannot resume from {root}: it was made by a different run ({_describe_mismatch(saved, fp)}). "
                        f"Rerun with the original settings, or delete {root} to start over"
                    )
                return cls(root)
        root.mkdir(parents=True)
        cls._atomic_json(fp_file, fp)
        return cls(root)

    # --- reading ----------------------------------------------------------------------------------

    @property
    def done(self) -> int:
        """Number of blocks committed (blocks 0 .. done-1 are final)."""
        f = self.root / "progress.json"
        return json.loads(f.read_text())["done"] if f.exists() else 0

    def block_file(self, index: int) -> Path:
        return self.root / f"block_{index:04d}.safetensors"

    def block_record(self, index: int) -> dict[str, Any]:
        return json.loads((self.root / f"block_{index:04d}.json").read_text())

    def block_extra(self, index: int) -> dict[str, torch.Tensor]:
        f = self.root / f"block_{index:04d}.extra.safetensors"
        return load_file(f) if f.exists() else {}

    def tensor_names(self, index: int) -> list[tuple[str, int]]:
        """(name, nbytes) of each tensor saved for a block, read from the header only."""
        out = []
        with safe_open(self.block_file(index), framework="pt") as f:
            for name in list(f.keys()):  # safe_open handles are not iterable
                sl = f.get_slice(name)
                out.append((name, stored_nbytes(sl.get_shape(), sl.get_dtype())))
        return out

    def load_tensor(self, index: int, name: str) -> torch.Tensor:
        with safe_open(self.block_file(index), framework="pt") as f:
            return f.get_tensor(name)

    def load_inputs(self, device: torch.device, name: str = "hidden") -> torch.Tensor:
        """The activations entering block `done` [n, seqlen, hidden], exactly as the last run left them
        ("hidden": the quantized model's; other names: what the run saved beside them)."""
        with safe_open(self._inputs_file(self.done), framework="pt", device=str(device)) as f:
            return f.get_tensor(name)

    def _inputs_file(self, index: int) -> Path:
        return self.root / f"inputs_{index:04d}.safetensors"

    # --- writing ----------------------------------------------------------------------------------

    def commit_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        record: dict[str, Any],
        extra: dict[str, torch.Tensor],
        next_inputs: dict[str, torch.Tensor],
    ) -> None:
        """Durably save block `index` and the inputs of block `index + 1` (none after the last block),
        then mark it done."""
        if index != self.done:
            raise RuntimeError(f"block {index} committed out of order; {self.done} blocks are done")
        self._atomic_tensors(self.block_file(index), tensors)
        if extra:
            self._atomic_tensors(self.root / f"block_{index:04d}.extra.safetensors", extra)
        self._atomic_json(self.root / f"block_{index:04d}.json", record)
        if next_inputs:
            # Named by block: until progress.json moves on, the inputs of block `index` must survive.
            self._atomic_tensors(self._inputs_file(index + 1), next_inputs)
        self._atomic_json(self.root / "progress.json", {"done": index + 1})
        self._inputs_file(index).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root)

    @staticmethod
    def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=SAFETENSORS_METADATA
        )
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @staticmethod
    def _atomic_json(path: Path, data: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write_json_durable(tmp, data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
