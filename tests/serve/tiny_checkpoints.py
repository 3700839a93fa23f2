"""Tiny checkpoints for the engine-runtime tests: random models HF can run, and quantized twins.

`make_tiny_model`'s tied embedding makes every family repeat its input token under greedy decoding;
untied heads (or larger linear weights) give varied tokens, which a token-for-token test needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qserve.kernels import packing
from qserve.testing import make_tiny_model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls gain nothing from threads, and on a shared, loaded CPU OpenMP's barriers make
    them ~30x slower; import this fixture into a test module to run it on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def compiled_kernels():
    """For tests of the C++ CPU paths: skip without the kernels, fail where they are required (CI)."""
    from qserve.kernels import cpu_ext

    if cpu_ext.required():
        assert cpu_ext.available(), cpu_ext.unavailable_reason()
    elif not cpu_ext.available():
        pytest.skip(f"qserve's C++ CPU kernels are unavailable: {cpu_ext.unavailable_reason()}")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """An untied tiny Llama with varied greedy output, one per test module."""
    return varied_model(tmp_path_factory.mktemp("llama") / "m", "llama")


def model_of(llm):
    return llm.engine.runner.model


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def varied_model(path: Path, family: str = "llama", seed: int = 1, **overrides) -> Path:
    """An untied tiny model whose greedy output varies; Qwen2 gets non-zero q/k/v biases."""
    overrides.setdefault("tie_word_embeddings", False)
    path = make_tiny_model(path, family, seed=seed, **overrides)
    if family == "qwen2":
        tensors = load_file(path / "model.safetensors")
        gen = torch.Generator().manual_seed(seed)
        for name, t in tensors.items():
            if name.endswith(".bias"):
                tensors[name] = torch.randn(t.shape, generator=gen) * 0.5
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _act_order(w: torch.Tensor, group_size: int, gen: torch.Generator) -> packing.QuantizedWeight:
    """RTN in a random column order: the same shape of result as GPTQ act-order (non-monotonic g_idx)."""
    perm = torch.randperm(w.shape[1], generator=gen)
    qw = packing.rtn_quantize(w[:, perm], bits=4, group_size=group_size, sym=False)
    inverse = torch.argsort(perm)
    return packing.QuantizedWeight(
        intweight=qw.intweight[:, inverse],
        scales=qw.scales,
        zeros=qw.zeros,
        g_idx=qw.g_idx[inverse],
        bits=4,
        group_size=group_size,
    )


def quantize_checkpoint(
    src: Path,
    dst: Path,
    method: str,
    group_size: int = 32,
    act_order: bool = False,
    checkpoint_format: str = "gptq",
) -> tuple[Path, Path]:
    """Write `dst` (a GPTQ or AWQ checkpoint of `src`, packed per docs/formats.md) and `dst`-dequant (the
    same model with the dequantized weights, unquantized, for transformers to run as the reference)."""
    tensors = load_file(src / "model.safetensors")
    packed, dense = dict(tensors), dict(tensors)
    gen = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if not (name.endswith(".weight") and name.split(".")[-2] in LINEARS):
            continue
        prefix = name[: -len(".weight")]
        if act_order:
            qw = _act_order(w, group_size, gen)
        else:
            qw = packing.rtn_quantize(w, bits=4, group_size=group_size, sym=method == "gptq")
        del packed[name]
        # The file stores fp16 scales: the reference dequantizes with the same rounding, but through
        # QuantizedWeight (unpacked), so a packing or loading bug still shows up as a mismatch.
        stored = packing.QuantizedWeight(
            qw.intweight, qw.scales.half().float(), qw.zeros, qw.g_idx, 4, group_size
        )
        dense[name] = stored.dequantize().to(w.dtype).contiguous()
        if method == "gptq":
            p = packing.pack_gptq(qw, checkpoint_format)
            packed.update(
                {
                    f"{prefix}.{k}": getattr(p, k).contiguous()
                    for k in ("qweight", "qzeros", "scales", "g_idx")
                }
            )
        else:
            p = packing.pack_awq(qw)
            packed.update(
                {f"{prefix}.{k}": getattr(p, k).contiguous() for k in ("qweight", "qzeros", "scales")}
            )
    dense_dir = Path(f"{dst}-dequant")
    for out_dir, out_tensors in ((dst, packed), (dense_dir, dense)):
        shutil.copytree(src, out_dir, dirs_exist_ok=True)
        save_file(out_tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    if method == "gptq":
        meta = {"bits": 4, "group_size": group_size, "desc_act": act_order, "sym": not act_order, "quant_method": "gptq",
                "checkpoint_format": checkpoint_format, "static_groups": False, "true_sequential": True}  # fmt: skip
    else:
        meta = {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": group_size,
            "bits": 4,
            "version": "gemm",
        }
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = meta
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dense_dir
