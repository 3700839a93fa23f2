"""Quantized checkpoints built in-process with kernels.packing, plus helpers to break them.

`build_ckpt(dst, method=..., ...)` quantizes a tiny random Llama (4 blocks, hidden 64, intermediate 128)
with round-to-nearest and writes it the way qserve, AutoGPTQ or AutoAWQ would, so each test starts
from a checkpoint known to be valid and mutates exactly one thing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qserve.kernels import packing
from qserve.kernels.packing import QuantizedWeight, rtn_quantize
from qserve.quantize.arch import ARCHS

LINEARS = ARCHS[0].linears
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class Spec:
    method: str = "gptq"  # gptq | awq
    bits: int = 4
    group_size: int = 32
    sym: bool = True
    act_order: bool = False
    pack_format: str = "gptq"  # how GPTQ zeros are stored: gptq (z - 1) | gptq_v2 (z)
    declared_format: str | None = None  # what the metadata says; defaults to pack_format
    style: str = "qserve"  # qserve | autogptq | autoawq
    shards: int = 1


def act_order_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, seed: int) -> QuantizedWeight:
    """RTN over a random column order, as GPTQ with desc_act (no static groups) lays it out."""
    in_f = w.shape[1]
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    qw = rtn_quantize(w[:, perm], bits, group_size, sym)  # groups of consecutive permuted columns
    intweight = torch.empty_like(qw.intweight)
    intweight[:, perm] = qw.intweight
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // group_size
    return QuantizedWeight(intweight, qw.scales, qw.zeros, g_idx, bits, group_size)


def quantize_state(state: dict, spec: Spec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        prefix = name.rpartition(".")[0]
        if name.endswith(".weight") and any(prefix.endswith(lin) for lin in LINEARS):
            seed = len(out)
            if spec.act_order:
                qw = act_order_quantize(t.float(), spec.bits, spec.group_size, spec.sym, seed)
            else:
                qw = rtn_quantize(t.float(), spec.bits, spec.group_size, spec.sym)
            if spec.method == "gptq":
                p = packing.pack_gptq(qw, spec.pack_format)
                out.update({f"{prefix}.qweight": p.qweight, f"{prefix}.qzeros": p.qzeros})
                out.update({f"{prefix}.scales": p.scales, f"{prefix}.g_idx": p.g_idx})
            else:
                p = packing.pack_awq(qw)
                out.update({f"{prefix}.qweight": p.qweight, f"{prefix}.qzeros": p.qzeros})
                out[f"{prefix}.scales"] = p.scales
        else:
            out[name] = t.to(dtype)
    return out


def metadata(spec: Spec) -> tuple[dict, dict[str, dict]]:
    """(config.json quantization_config or None, {extra metadata file: content})."""
    declared = spec.declared_format or spec.pack_format
    if spec.method == "gptq":
        gptq = {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "damp_percent": 0.01,
            "desc_act": spec.act_order,
            "static_groups": False,
            "sym": spec.sym,
            "true_sequential": True,
        }
        if spec.style == "autogptq":  # legacy AutoGPTQ: no quant_method, no checkpoint_format
            gptq["model_name_or_path"] = None
            gptq["model_file_base_name"] = f"gptq_model-{spec.bits}bit-{spec.group_size}g"
            return None, {"quantize_config.json": gptq}
        gptq.update(quant_method="gptq", checkpoint_format=declared)
        return gptq, {"quantize_config.json": gptq}
    awq = {
        "quant_method": "awq",
        "zero_point": not spec.sym,
        "group_size": spec.group_size,
        "bits": spec.bits,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    if spec.style == "autoawq":  # AutoAWQ also leaves its legacy quant_config.json
        legacy = {
            "zero_point": not spec.sym,
            "q_group_size": spec.group_size,
            "w_bit": spec.bits,
            "version": "GEMM",
            "modules_to_not_convert": None,
        }
        return awq, {"quant_config.json": legacy}
    return awq, {}


def write_tensors(dst: Path, tensors: dict[str, torch.Tensor], shards: int, base_name: str = "model") -> None:
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dst / f"{base_name}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        file = f"{base_name}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / f"{base_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    from qserve.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("validate-base"), num_hidden_layers=4, dtype="float16")


@pytest.fixture(scope="session")
def build_ckpt(base_model):
    state = load_file(str(base_model / "model.safetensors"))
    base_config = json.loads((base_model / "config.json").read_text())

    def build(dst: Path, **fields) -> Path:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
        try:
            return write(dst, **fields)
        finally:
            torch.set_num_threads(previous)

    def write(dst: Path, **fields) -> Path:
        spec = Spec(**fields)
        if spec.style == "autoawq" and spec.method == "awq":
            spec = Spec(**{**fields, "sym": False, "shards": fields.get("shards", 2)})
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        tensors = quantize_state(state, spec, torch.float16)
        quant_config, files = metadata(spec)
        config = dict(base_config)
        if quant_config is not None:
            config["quantization_config"] = quant_config
        if spec.style == "autoawq":
            config.pop("dtype", None)
            config["torch_dtype"] = "float16"
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        for name, content in files.items():
            (dst / name).write_text(json.dumps(content, indent=2))
        for name in TOKENIZER_FILES:
            shutil.copy(base_model / name, dst / name)
        base_name = f"gptq_model-{spec.bits}bit-{spec.group_size}g" if spec.style == "autogptq" else "model"
        write_tensors(dst, tensors, spec.shards, base_name)
        return dst

    return build


@pytest.fixture(scope="session")
def valid_gptq(build_ckpt, tmp_path_factory) -> Path:
    """A read-only valid GPTQ checkpoint; copy it (`clone`) before mutating."""
    return build_ckpt(tmp_path_factory.mktemp("valid-gptq"))


@pytest.fixture(scope="session")
def valid_awq(build_ckpt, tmp_path_factory) -> Path:
    return build_ckpt(tmp_path_factory.mktemp("valid-awq"), method="awq", sym=False)


@pytest.fixture
def clone(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}-{src.name}"
        shutil.copytree(src, dst, symlinks=True)
        return dst

    return copy


@pytest.fixture(scope="session")
def edit_tensors():
    def edit(ckpt: Path, fn, file: str = "model.safetensors") -> None:
        """Load one weight file, let `fn(dict)` mutate it in place, and write it back."""
        tensors = load_file(str(ckpt / file))
        fn(tensors)
        save_file(tensors, str(ckpt / file), metadata={"format": "pt"})

    return edit


@pytest.fixture(scope="session")
def edit_json():
    def edit(path: Path, fn) -> None:
        """Load a JSON file, let `fn(data)` mutate it in place, and write it back."""
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return edit
