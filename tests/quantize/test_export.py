"""The exported checkpoints match docs/formats.md: tensor names, shapes, dtypes, bits, metadata, files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from quant_helpers import (
    awq_dequant,
    dense_state_dict,
    gptq_dequant,
    logits,
    make_model,
    quantize_tiny,
    read_tensors,
    rel_err,
    write_calib_text,
)

from qserve.kernels.packing import dequantize_awq, dequantize_gptq, rtn_quantize
from qserve.quantize.arch import ArchSpec, arch_for_config
from qserve.quantize.export import TensorEntry, plan_shards, write_checkpoint
from qserve.quantize.lazy_model import LazyCheckpoint

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync latency on a shared machine

GPTQ_KEYS = {
    "bits",
    "group_size",
    "damp_percent",
    "desc_act",
    "static_groups",
    "sym",
    "true_sequential",
    "model_name_or_path",
    "model_file_base_name",
    "quant_method",
    "checkpoint_format",
}
AWQ_KEYS = {"quant_method", "zero_point", "group_size", "bits", "version", "modules_to_not_convert"}


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models"))


def _linears(spec: ArchSpec, n_blocks: int) -> list[str]:
    return [f"{spec.blocks}.{i}.{name}" for i in range(n_blocks) for name in spec.linears]


def _source(model_dir):
    ckpt = LazyCheckpoint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    return ckpt, arch_for_config(config), config


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_rtn_layout_matches_format_doc_and_source_weights(tmp_path, llama, calib, layout):
    out = tmp_path / "out"
    quantize_tiny(llama, out, calib, "rtn", format=layout, group_size=32)
    t = read_tensors(out)
    ckpt, spec, config = _source(llama)
    for prefix in _linears(spec, config["num_hidden_layers"]):
        w = ckpt.load([f"{prefix}.weight"])[f"{prefix}.weight"]
        out_f, in_f = w.shape
        G = in_f // 32
        assert f"{prefix}.weight" not in t
        assert t[f"{prefix}.scales"].dtype == torch.float16 and t[f"{prefix}.scales"].shape == (G, out_f)
        assert t[f"{prefix}.qzeros"].dtype == torch.int32
        assert t[f"{prefix}.qweight"].dtype == torch.int32
        if layout == "gptq":
            assert t[f"{prefix}.qweight"].shape == (in_f // 8, out_f)
            assert t[f"{prefix}.qzeros"].shape == (G, out_f // 8)
            assert t[f"{prefix}.g_idx"].dtype == torch.int32
            assert torch.equal(t[f"{prefix}.g_idx"], torch.arange(in_f, dtype=torch.int32) // 32)
            mine = gptq_dequant(t, prefix, 4)
            shared = dequantize_gptq(
                *(t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), 4, 32
            )
        else:
            assert t[f"{prefix}.qweight"].shape == (in_f, out_f // 8)
            assert t[f"{prefix}.qzeros"].shape == (G, out_f // 8)
            assert f"{prefix}.g_idx" not in t
            mine = awq_dequant(t, prefix, 32)
            shared = dequantize_awq(*(t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales")), 32)
        # The independent reader and the shared format code agree ...
        torch.testing.assert_close(mine, shared, rtol=0, atol=0)
        # ... and both give RTN of the source weight, with the fp16 scales the file holds.
        qw = rtn_quantize(w.float(), 4, 32, sym=(layout == "gptq"))
        expected = dataclasses.replace(qw, scales=qw.scales.half()).dequantize()
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)


def test_gptq_v1_zero_offset_is_stored(tmp_path, llama, calib):
    """Symmetric 4-bit has true zero 8; v1 stores 7 in every nibble."""
    out = tmp_path / "out"
    quantize_tiny(llama, out, calib, "rtn", format="gptq", sym=True)
    qzeros = read_tensors(out)["model.layers.0.self_attn.q_proj.qzeros"]
    assert torch.all(qzeros == 0x77777777)


@pytest.mark.parametrize("layout, keys", [("gptq", GPTQ_KEYS), ("awq", AWQ_KEYS)])
def test_metadata_key_sets_and_copied_files(tmp_path, llama, calib, layout, keys):
    out = tmp_path / "out"
    quantize_tiny(llama, out, calib, "rtn", format=layout)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qcfg) == keys
    assert qcfg["quant_method"] == layout and qcfg["bits"] == 4 and qcfg["group_size"] == 32
    if layout == "gptq":
        assert qcfg["checkpoint_format"] == "gptq" and qcfg["sym"] is True
        assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    else:
        assert qcfg["version"] == "gemm" and qcfg["zero_point"] is True
        assert not (out / "quantize_config.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (llama / name).read_bytes()
    assert not (tmp_path / ".out.incomplete").exists() and not (tmp_path / "out.partial").exists()


def test_bf16_untied_qwen2_keeps_model_dtype_lm_head_and_fp16_bias(tmp_path, calib):
    src = make_model(tmp_path, "qwen2", dtype="bfloat16", tie_word_embeddings=False)
    out = tmp_path / "out"
    quantize_tiny(src, out, calib, "gptq")
    t = read_tensors(out)
    source = read_tensors(src)
    assert t["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(t["lm_head.weight"], source["lm_head.weight"])
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.norm.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    bias = t["model.layers.0.self_attn.q_proj.bias"]
    assert bias.dtype == torch.float16
    torch.testing.assert_close(
        bias.float(), source["model.layers.0.self_attn.q_proj.bias"].float(), rtol=1e-2, atol=1e-3
    )
    assert t["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16


def test_tied_embeddings_write_no_lm_head(tmp_path, llama, calib):
    out = tmp_path / "out"
    quantize_tiny(llama, out, calib, "rtn")
    assert "lm_head.weight" not in read_tensors(out)


def test_act_order_g_idx_is_read_back_by_the_independent_reader(tmp_path, llama, calib):
    out = tmp_path / "out"
    quantize_tiny(llama, out, calib, "gptq", desc_act=True)
    t = read_tensors(out)
    g_idx = t["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.sort(g_idx).values), "act-order without static groups permutes g_idx"
    assert torch.bincount(g_idx.long()).tolist() == [32] * 4  # every group still holds group_size channels
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = logits(llama, None, ids)
    assert rel_err(logits(llama, dense_state_dict(out), ids), ref) < 0.2


def test_sharded_write_splits_with_index_and_keeps_every_tensor(tmp_path, llama, calib):
    out = tmp_path / "one"
    quantize_tiny(llama, out, calib, "rtn")
    tensors = read_tensors(out)
    entries = [TensorEntry(k, v.numel() * v.element_size(), lambda v=v: v) for k, v in tensors.items()]
    limit = sum(e.nbytes for e in entries) // 4
    shards = plan_shards(entries, limit)
    assert len(shards) >= 2 and all(sum(e.nbytes for e in s) <= limit or len(s) == 1 for s in shards)
    from qserve.quantize.config import QuantConfig

    cfg = QuantConfig(model=str(llama), output=str(tmp_path / "sharded"), method="rtn", group_size=32)
    dest = write_checkpoint(tmp_path / "sharded", llama, entries, cfg, max_shard_bytes=limit)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert not (dest / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in entries)
    back = read_tensors(dest)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
