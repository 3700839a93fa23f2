"""Shared by the driver/export/resume/CLI tests: tiny runs and readers written from docs/formats.md alone.

The readers below deliberately do NOT use `qserve.kernels.packing`: they decode the files bit by bit
as the format document describes, so a packing bug cannot hide behind a matching unpack bug.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open

from qserve.quantize.config import QuantConfig
from qserve.quantize.pipeline import quantize_model
from qserve.testing import make_tiny_model

_WORDS = [
    "the",
    "capital",
    "of",
    "france",
    "is",
    "paris",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "quantization",
    "maps",
    "weights",
    "to",
    "few",
    "bits",
    "calibration",
    "data",
    "decides",
    "which",
    "errors",
    "matter",
    "paged",
    "key",
    "value",
    "cache",
    "stores",
    "attention",
    "state",
    "in",
    "blocks",
]


def write_calib_text(path: Path, n_docs: int = 24, words: int = 80, seed: int = 0) -> Path:
    """Plain-text calibration source: paragraphs (documents) of seeded random words."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def tiny_run_config(model: Path, output: Path, calib: Path, method: str, **overrides) -> QuantConfig:
    fields = dict(
        model=str(model),
        output=str(output),
        method=method,
        group_size=32,
        calib=str(calib),
        n_samples=4,
        seqlen=32,
        device="cpu",
        eval=False,
        quiet=True,
    )
    fields.update(overrides)
    return QuantConfig(**fields)


def quantize_tiny(model: Path, output: Path, calib: Path, method: str, **overrides):
    return quantize_model(tiny_run_config(model, output, calib, method, **overrides), log=lambda _m: None)


def make_model(root: Path, family: str = "llama", **overrides) -> Path:
    return make_tiny_model(root / f"{family}-src", family=family, **overrides)


def read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    index = ckpt / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(ckpt / f, framework="pt") as h:
            for k in list(h.keys()):
                out[k] = h.get_tensor(k)
    return out


def _nibbles(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> [..., W, 32/bits]: field k holds bits [bits*k, bits*k + bits) of each word."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def gptq_dequant(t: dict[str, torch.Tensor], prefix: str, bits: int) -> torch.Tensor:
    """W' [out, in] of a GPTQ v1 Linear, read as docs/formats.md says: qweight rows packed along `in`
    (word r field k = input row (32/bits)*r + k), qzeros along `out`, stored zero = z - 1, g_idx per row."""
    qweight, qzeros = t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"]
    scales, g_idx = t[f"{prefix}.scales"].float(), t[f"{prefix}.g_idx"].long()
    per = 32 // bits
    q = _nibbles(qweight, bits)  # [in/per, out, per]
    q = q.permute(0, 2, 1).reshape(qweight.shape[0] * per, qweight.shape[1])  # [in, out]
    z = _nibbles(qzeros, bits).reshape(qzeros.shape[0], -1)  # [G, out]
    z = (z + 1) & ((1 << bits) - 1)  # v1 stores z - 1 (wrapping), readers add 1 back
    w = scales[g_idx] * (q.float() - z[g_idx].float())  # [in, out]
    return w.t().contiguous()


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + AWQ_ORDER[i]


def awq_dequant(t: dict[str, torch.Tensor], prefix: str, group_size: int) -> torch.Tensor:
    """W' [out, in] of an AWQ-GEMM Linear: qweight [in, out/8] and qzeros [G, out/8] interleaved,
    true zero points, groups contiguous along `in`."""
    qweight, qzeros, scales = t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"], t[f"{prefix}.scales"].float()

    def unpack(words: torch.Tensor) -> torch.Tensor:
        nib = _nibbles(words, 4)  # [R, C, 8] in nibble order
        cols = torch.empty_like(nib)
        for i, col in enumerate(AWQ_ORDER):
            cols[..., col] = nib[..., i]
        return cols.reshape(words.shape[0], -1)  # [R, C*8] in column order

    q, z = unpack(qweight), unpack(qzeros)  # [in, out], [G, out]
    in_f = q.shape[0]
    gs = in_f if group_size == -1 else group_size
    g = torch.arange(in_f) // gs
    return (scales[g] * (q.float() - z[g].float())).t().contiguous()


def dense_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """A plain HF state dict from a qserve checkpoint via the independent readers above."""
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    t = read_tensors(ckpt)
    out = {}
    for name, tensor in t.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            if cfg["quant_method"] == "gptq":
                out[f"{prefix}.weight"] = gptq_dequant(t, prefix, cfg["bits"])
            else:
                out[f"{prefix}.weight"] = awq_dequant(t, prefix, cfg["group_size"])
        elif leaf not in ("qzeros", "scales", "g_idx"):
            out[name] = tensor.float()
    return out


def logits(model_dir: Path, state: dict[str, torch.Tensor] | None, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of the model at `model_dir`, optionally with its weights replaced by `state`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in m for m in missing), missing  # tied head comes from the embedding
    with torch.no_grad():
        return model(ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
