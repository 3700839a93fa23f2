"""Sliding-window attention end to end: the engine's greedy tokens equal transformers' for models whose
window is shorter than the prompt (Gemma 3: local layers windowed, global ones not; Mistral: every
layer), through chunked prefill, batching and the paged cache, in fp32 on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import greedy
from tiny_checkpoints import single_thread, varied_model  # noqa: F401  (autouse fixture: one torch thread)
from transformers import AutoModelForCausalLM

from qserve.serve.llm import LLM
from qserve.serve.loader import load_model
from qserve.serve.model import ModelConfig

WINDOW, PROMPT_LEN, NEW = 8, 40, 20


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (PROMPT_LEN, PROMPT_LEN - 11)]


def hf_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=["gemma3", "mistral"])
def windowed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"window-{request.param}")
    wide = varied_model(root / "wide", request.param, seed=3, sliding_window=4096)
    narrow = varied_model(root / "narrow", request.param, seed=3, sliding_window=WINDOW)
    return request.param, wide, narrow


def test_engine_greedy_equals_transformers_past_the_window(windowed):
    _, wide, narrow = windowed
    vocab = json.loads((narrow / "config.json").read_text())["vocab_size"]
    ps = prompts(vocab)
    expected = [hf_greedy(narrow, p, NEW) for p in ps]
    # the window must matter for these prompts, or the comparison would prove nothing
    assert expected[0] != hf_greedy(wide, ps[0], NEW)
    # block 4 and a 16-token step budget: the prompts are prefilled in chunks whose windows start
    # blocks into the cache, next to the other sequence's decodes
    llm = LLM(str(narrow), device="cpu", dtype="float32", max_model_len=96, max_num_seqs=4,
              max_num_batched_tokens=16, block_size=4, validate=False)  # fmt: skip
    assert llm.engine.max_model_len == 96  # beyond the window: the engine no longer caps at it
    outs = llm.generate(ps, greedy(NEW), use_tqdm=False)
    for out, want in zip(outs, expected, strict=True):
        assert out.outputs[0].token_ids == want


def test_windows_per_layer(windowed):
    family, _, narrow = windowed
    loaded = load_model(narrow, torch.device("cpu"), torch.float32, 64, validate=False)
    windows = [layer.self_attn.window for layer in loaded.model.layers]
    if family == "gemma3":  # layer_types: sliding, full, sliding, full
        assert windows == [WINDOW, None, WINDOW, None]
    else:
        assert windows == [WINDOW] * len(windows)


def test_family_window_rules_follow_transformers():
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=32)  # fmt: skip
    qwen2 = {**base, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_window_layers": 2}
    assert ModelConfig.from_hf(qwen2).sliding_window is None  # use_sliding_window absent: off
    cfg = ModelConfig.from_hf({**qwen2, "use_sliding_window": True})
    assert [cfg.layer_window(i) for i in range(4)] == [None, None, 32, 32]  # from max_window_layers on
    moe = {**base, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 4,
           "num_experts_per_tok": 2, "moe_intermediate_size": 32, "use_sliding_window": True, "max_window_layers": 3}  # fmt: skip
    cfg = ModelConfig.from_hf(moe)
    assert [cfg.layer_window(i) for i in range(4)] == [32, None, 32, None]
    gemma = {
        **base,
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "sliding_window_pattern": 2,
    }
    cfg = ModelConfig.from_hf(gemma)
    assert [cfg.layer_window(i) for i in range(4)] == [32, None, 32, None]
    mistral = {**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert [ModelConfig.from_hf(mistral).layer_window(i) for i in range(4)] == [32] * 4
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).layer_window(0) is None
