"""The engine's own Llama-family model, loader and quantized linears against transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import (
    quantize_checkpoint,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
    varied_model,
)
from transformers import AutoModelForCausalLM

from qserve.errors import CheckpointError, ConfigError
from qserve.kernels import packing
from qserve.serve.loader import SafetensorsWeights, load_model, read_quant_spec
from qserve.serve.outputs import ScheduledChunk
from qserve.serve.quant_linear import CpuQuantLinear, PackedLinear, QuantLinear, QuantSpec, build_linear
from qserve.serve.runner import ModelRunner
from qserve.serve.sampler import Sampler

CPU = torch.device("cpu")
BLOCK = 4


def engine_logits(model_dir, prompts: list[list[int]], split: int | None = None) -> list[torch.Tensor]:
    """Logits [len, vocab] for every prompt position, all prompts in one flat batch per step.

    Blocks are handed out in a shuffled order so that a block-table or slot-mapping error cannot
    hide behind contiguous ids. With `split`, each prompt is computed in two chunks (two steps), the
    second reading the first chunk's KV from the paged cache (chunked prefill).
    """
    loaded = load_model(model_dir, CPU, torch.float32, max_positions=256, validate=False)
    need = [math.ceil(len(p) / BLOCK) for p in prompts]
    order = torch.randperm(sum(need), generator=torch.Generator().manual_seed(0)).tolist()
    tables, start = [], 0
    for n in need:
        tables.append(tuple(order[start : start + n]))
        start += n
    runner = ModelRunner(loaded.model, sum(need), BLOCK, CPU, torch.float32, Sampler(CPU))
    bounds = [(0, len(p)) if split is None else (0, split) for p in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(1 if split is None else 2):
        chunks = []
        for i, p in enumerate(prompts):
            lo, hi = bounds[i] if step == 0 else (split, len(p))
            chunks.append(ScheduledChunk(i, tuple(p[lo:hi]), lo, tables[i], True))
        batch = runner._prepare(tuple(chunks))
        with torch.inference_mode():
            hidden = loaded.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
            logits = loaded.model.compute_logits(hidden)
        loc = batch.meta.query_start_loc.tolist()
        for i in range(len(prompts)):
            rows[i].append(logits[loc[i] : loc[i + 1]])
    return [torch.cat(r) for r in rows]


def hf_logits(model_dir, prompt: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0]


PROMPTS = [[5, 17, 99, 3, 250, 61, 7, 8, 120, 44, 13], [300, 2, 9, 77, 150, 33, 21]]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("split", [None, 3])
def test_logits_match_transformers(tmp_path, family, split):
    model_dir = varied_model(tmp_path / family, family)
    ours = engine_logits(model_dir, PROMPTS, split)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        torch.testing.assert_close(got, hf_logits(model_dir, prompt), atol=1e-4, rtol=1e-4)


def test_tied_head_matches_transformers(tmp_path):
    model_dir = varied_model(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    torch.testing.assert_close(engine_logits(model_dir, PROMPTS[:1])[0], hf_logits(model_dir, PROMPTS[0]))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    ],
)  # fmt: skip
def test_rope_scaling_matches_transformers(tmp_path, rope):
    model_dir = varied_model(
        tmp_path / rope["rope_type"], rope_parameters=rope, head_dim=32, num_attention_heads=2
    )
    # Positions well past the original context, where the scaled frequencies differ from the default.
    prompt = [(7 * i + 3) % 380 for i in range(70)]
    torch.testing.assert_close(
        engine_logits(model_dir, [prompt])[0], hf_logits(model_dir, prompt), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    ("method", "act_order", "fmt"),
    [("gptq", False, "gptq"), ("gptq", True, "gptq"), ("gptq", False, "gptq_v2"), ("awq", False, "gptq")],
)
def test_quantized_checkpoint_matches_dequantized_reference(tmp_path, method, act_order, fmt):
    src = varied_model(tmp_path / "src")
    qdir, dense_dir = quantize_checkpoint(
        src, tmp_path / "q", method, act_order=act_order, checkpoint_format=fmt
    )
    spec = read_quant_spec(qdir, json.loads((qdir / "config.json").read_text()))
    assert spec == QuantSpec(method, 4, 32, fmt if method == "gptq" else "gptq", act_order)
    ours = engine_logits(qdir, PROMPTS)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        torch.testing.assert_close(got, hf_logits(dense_dir, prompt), atol=1e-4, rtol=1e-4)
    # The quantization must actually change the model, or the comparison above proves nothing.
    assert not torch.allclose(ours[0], hf_logits(src, PROMPTS[0]), atol=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_loader_drops_trivial_g_idx(tmp_path, act_order):
    # g_idx = i // group_size carries no information: the loader passes None so the fused kernel
    # reads scales per tile; an act-order g_idx must reach the kernel unchanged.
    src = varied_model(tmp_path / "src")
    qdir, _ = quantize_checkpoint(src, tmp_path / "q", "gptq", act_order=act_order)
    spec = read_quant_spec(qdir, json.loads((qdir / "config.json").read_text()))
    weights = SafetensorsWeights(qdir)
    prefix = "model.layers.0.self_attn.q_proj"
    part = weights.linear_part(prefix, spec)
    if act_order:
        torch.testing.assert_close(part.g_idx, weights.get(f"{prefix}.g_idx"))
    else:
        assert part.g_idx is None


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    model_dir = varied_model(tmp_path / "m")
    expected = engine_logits(model_dir, PROMPTS[:1])[0]
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(engine_logits(model_dir, PROMPTS[:1])[0], expected)


def test_quant_metadata_is_found_in_every_place_and_alias(tmp_path):
    (tmp_path / "quant_config.json").write_text(
        json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    )
    assert read_quant_spec(tmp_path, {}) == QuantSpec("awq", 4, 64)
    (tmp_path / "quant_config.json").unlink()
    (tmp_path / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 128, "desc_act": True})
    )
    assert read_quant_spec(tmp_path, {}) == QuantSpec("gptq", 4, 128, "gptq", True)
    (tmp_path / "quantize_config.json").unlink()
    assert read_quant_spec(tmp_path, {}) is None
    gemv = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}}
    with pytest.raises(CheckpointError, match="gemv"):
        read_quant_spec(tmp_path, gemv)
    # two sources that disagree: loaders reading different files would build different models
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    conflicting = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64}}
    with pytest.raises(CheckpointError, match=r"group_size.*disagrees"):
        read_quant_spec(tmp_path, conflicting)


def test_loader_errors_name_what_is_wrong(tmp_path):
    model_dir = varied_model(tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir, CPU, torch.float32, 64, validate=False)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="yarn"):
        load_model(model_dir, CPU, torch.float32, 64, validate=False)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "nowhere", CPU, torch.float32, 64, validate=False)


def _packed(
    w: torch.Tensor, perm: torch.Tensor | None, group_size: int = 16
) -> tuple[PackedLinear, torch.Tensor]:
    qw = packing.rtn_quantize(w if perm is None else w[:, perm], bits=4, group_size=group_size, sym=False)
    if perm is not None:  # act-order: columns were quantized in `perm` order
        inv = torch.argsort(perm)
        qw = packing.QuantizedWeight(qw.intweight[:, inv], qw.scales, qw.zeros, qw.g_idx[inv], 4, group_size)
    p = packing.pack_gptq(qw)
    return PackedLinear(p.qweight, p.qzeros, p.scales, p.g_idx), packing.dequantize_gptq(
        p.qweight, p.qzeros, p.scales, p.g_idx, 4, group_size
    )


@pytest.mark.parametrize("act_order", [False, True])
def test_quant_linear_fuses_parts_and_matches_dense(act_order, monkeypatch):
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "0")  # exact fp32 activations (int8: tests/kernels/test_cpu_packed_q8.py)
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(out, 64, generator=gen) for out in (32, 16, 16)]
    perms = [torch.randperm(64, generator=gen) if act_order else None for _ in ws]
    parts, dense = zip(*(_packed(w, p) for w, p in zip(ws, perms, strict=True)), strict=True)
    bias = torch.randn(64, generator=gen)
    spec = QuantSpec("gptq", 4, 16, desc_act=act_order)
    quant = QuantLinear(list(parts), bias, spec)
    # Same grouping -> one packed tensor and one kernel launch; per-part act-order keeps them apart.
    assert len(quant.parts) == (3 if act_order else 1)
    x = torch.randn(5, 64, generator=gen)
    expected = x @ torch.cat(dense).t() + bias
    torch.testing.assert_close(quant(x), expected, atol=1e-4, rtol=1e-4)
    # On CPU the engine repacks once at load into the C++ kernels' 4-bit layout (fused unless act-order).
    cpu_layer = build_linear(list(parts), [bias[:32], bias[32:48], bias[48:]], spec, CPU, torch.float32)
    assert isinstance(cpu_layer, CpuQuantLinear) and len(cpu_layer.weights) == (3 if act_order else 1)
    torch.testing.assert_close(cpu_layer(x), expected, atol=1e-4, rtol=1e-4)
