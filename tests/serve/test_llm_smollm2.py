"""SmolLM2-135M end to end (slow): greedy identical to transformers, and a sensible chat answer."""

from __future__ import annotations

import pytest
import torch

from qserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there"]


@pytest.fixture(scope="module")
def smollm2():
    from qserve.hub import resolve_model

    torch.set_num_threads(1)
    model_dir = resolve_model("smollm2-135m", progress=False)
    # 8 blocks of 16 slots cannot hold the three sequences (3 blocks each at 32 outputs) side by
    # side, so the run also exercises preemption on the real model.
    per_block = 2 * 30 * 16 * 3 * 64 * 4  # (K, V) x layers x slots x kv heads x head_dim x fp32
    llm = LLM(str(model_dir), dtype="float32", max_model_len=96, max_num_batched_tokens=64,
              kv_cache_memory=8 * per_block)  # fmt: skip
    return model_dir, llm


def test_greedy_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, llm = smollm2
    outs = llm.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), prompt
    assert llm.engine.stats().num_preemptions > 0


def test_chat_answers_the_capital_of_france(smollm2):
    _, llm = smollm2
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
