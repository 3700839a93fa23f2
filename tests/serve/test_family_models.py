"""The engine on the families beyond Llama's layout, with the checks test_model.py and test_engine.py make
for Llama, Mistral and Qwen2: Qwen3 (per-head q/k RMSNorm before RoPE), Phi-3 (fused qkv_proj and
gate_up_proj), Qwen3-MoE (routed experts) and Gemma 3 (sandwich (1 + w) norms, scaled embeddings, GELU,
local/global RoPE). Quantize -> validate -> serve for them is in tests/quantize/test_family_quantize.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import assert_matches_hf, small_llm
from test_model import PROMPTS, engine_logits, hf_logits
from tiny_checkpoints import single_thread, varied_model  # noqa: F401  (autouse fixture: one torch thread)

from qserve.errors import ConfigError
from qserve.serve.loader import load_model

FAMILIES = ["qwen3", "phi3", "qwen3_moe", "gemma3", "mixtral", "glm4", "qwen2_moe"]
MOE = ["qwen3_moe", "mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # seed 2 for GLM-4: seed 1's tiny GLM-4 repeats one token for some prompts (a degenerate reference)
    return {family: varied_model(root / family, family, seed=2 if family == "glm4" else 1) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", [None, 3])
def test_logits_match_transformers(models, family, split):
    ours = engine_logits(models[family], PROMPTS, split)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        torch.testing.assert_close(got, hf_logits(models[family], prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_with_preemption_and_chunked_prefill(models, family):
    # small_llm sizes its cache in blocks of a 2-layer model: 24 blocks of this model's own
    layers = json.loads((models[family] / "config.json").read_text())["num_hidden_layers"]
    assert_matches_hf(small_llm(models[family], num_blocks=24 * layers // 2), models[family])


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
    import shutil

    model_dir = shutil.copytree(models["phi3"], tmp_path / "partial")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.75}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        load_model(model_dir, torch.device("cpu"), torch.float32, 64, validate=False)


@pytest.mark.parametrize("family", MOE)
def test_moe_one_token_routing_equals_the_batched_path(models, family):
    """Batch-1 decode routes in Python floats (SparseMoE._one_token); the grouped batched path must
    give the same output for the same token, with and without renormalised top-k weights."""
    loaded = load_model(models[family], torch.device("cpu"), torch.float32, 64, validate=False)
    moe = loaded.model.layers[0].mlp
    x = torch.randn(5, loaded.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for renormalize in (True, False):
            moe.renormalize = renormalize
            batched = moe(x)
            for i in range(x.shape[0]):
                torch.testing.assert_close(moe(x[i : i + 1]), batched[i : i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_moe_greedy_one_sequence_matches_transformers(models, family):
    """One sequence: every decode step runs the batch-1 routing."""
    from test_engine import PROMPTS as TEXTS
    from test_engine import greedy, hf_greedy

    llm = small_llm(models[family], num_blocks=64)
    out = llm.generate([TEXTS[1]], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    assert out == hf_greedy(models[family], TEXTS[1], 24)


def test_hub_style_configs_are_read_like_transformers_5_ones():
    """Configs as the hub ships them (older transformers keys) select the same switches."""
    from qserve.quantize.arch import arch_for_config
    from qserve.serve.model import ModelConfig, RopeConfig

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512)  # fmt: skip
    moe = {**base, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "norm_topk_prob": True, "sliding_window": None, "use_sliding_window": False}  # fmt: skip
    cfg = ModelConfig.from_hf(moe)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.expert_intermediate_size) == (4, 2, 32)
    assert cfg.renormalize_topk and cfg.qk_norm and cfg.sliding_window is None
    assert len(arch_for_config(moe).linears) == 4 + 3 * 4
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        arch_for_config({**moe, "mlp_only_layers": [0]})
    with pytest.raises(ConfigError, match="expert count"):
        arch_for_config({**moe, "num_experts": 0})
    mixtral = {**base, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 2}
    assert ModelConfig.from_hf(mixtral).renormalize_topk  # Mixtral always renormalises
    gemma = {**base, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "rope_theta": 1e6,
             "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
             "query_pre_attn_scalar": 256, "sliding_window_pattern": 2, "hidden_activation": "gelu_pytorch_tanh"}  # fmt: skip
    cfg = ModelConfig.from_hf(gemma)
    assert cfg.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
    assert cfg.local_rope == RopeConfig(theta=10000.0) and cfg.sliding_layers == (True, False)
    assert cfg.attn_scale == 256**-0.5 and cfg.embed_scale == 8.0 and cfg.norm_offset == 1.0
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        ModelConfig.from_hf({**gemma, "final_logit_softcapping": 30.0})
