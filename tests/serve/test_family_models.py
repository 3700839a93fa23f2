"""The engine on the families beyond Llama's layout, with the checks test_model.py and test_engine.py make
for Llama, Mistral and Qwen2: Qwen3 (per-head q/k RMSNorm before RoPE) and Phi-3 (fused qkv_proj and
gate_up_proj). Quantize -> validate -> serve for them is in tests/quantize/test_family_quantize.py."""

from __future__ import annotations

import pytest
import torch
from test_engine import assert_matches_hf, small_llm
from test_model import PROMPTS, engine_logits, hf_logits
from tiny_checkpoints import single_thread, varied_model  # noqa: F401  (autouse fixture: one torch thread)

from qserve.errors import ConfigError
from qserve.serve.loader import load_model

FAMILIES = ["qwen3", "phi3", "qwen3_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: varied_model(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", [None, 3])
def test_logits_match_transformers(models, family, split):
    ours = engine_logits(models[family], PROMPTS, split)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        torch.testing.assert_close(got, hf_logits(models[family], prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_with_preemption_and_chunked_prefill(models, family):
    assert_matches_hf(small_llm(models[family]), models[family])


def test_qwen3_head_norms_are_what_makes_the_match(models, monkeypatch):
    """Without the q/k norm switch the engine computes a Llama block on Qwen3's weights: the
    logits test above must then fail, or it would not be testing the switch."""
    reference = hf_logits(models["qwen3"], PROMPTS[0])
    loaded = load_model(models["qwen3"], torch.device("cpu"), torch.float32, 64, validate=False)
    assert all(layer.self_attn.qk_norm for layer in loaded.model.layers)
    monkeypatch.setattr("qserve.serve.model.Attention._norm_heads", lambda self, qkv: qkv)
    off = engine_logits(models["qwen3"], PROMPTS[:1])[0]
    assert not torch.allclose(off, reference, atol=1e-2)


def test_partial_rotary_is_refused_with_the_reason(models, tmp_path):
    import json
    import shutil

    model_dir = shutil.copytree(models["phi3"], tmp_path / "partial")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.75}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        load_model(model_dir, torch.device("cpu"), torch.float32, 64, validate=False)
