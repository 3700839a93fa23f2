"""Tiny random-weight models and a tiny tokenizer, built in-process for tests (no downloads).

`make_tiny_model(path, family="llama")` writes a complete Hugging Face checkpoint directory
(config, safetensors, tokenizer, generation config) small enough that a test can quantize, evaluate
and serve it in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
    "Quantization maps weights to a few bits; calibration data decides which errors matter. "
    "A paged key-value cache stores attention state in fixed-size blocks. "
    "Héllo wörld, naïve café, 東京, emoji 🙂 and other multi-byte text must round-trip. "
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" \n"
)


def make_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a fixed string (deterministic), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "gemma3", "mixtral", "glm4", "qwen2_moe")


def tiny_config(family: str = "llama", vocab_size: int = 384, **overrides):
    """A transformers config for a 2-layer model of the given family (one of TINY_FAMILIES)."""
    from transformers import (
        Gemma3TextConfig,
        Glm4Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family in ("qwen3", "qwen3_moe"):
        common["head_dim"] = 16  # Qwen3Config defaults to 128 whatever the hidden size
    if family == "qwen3_moe":  # 8 experts, top-2 renormalised (Qwen3-30B-A3B routes 8 of 128, renormalised)
        common.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    if family == "qwen2_moe":  # 8 routed experts, top-2 not renormalised (Qwen1.5-MoE), a shared expert
        common.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, norm_topk_prob=False)  # fmt: skip
    if family == "glm4":  # RoPE on adjacent pairs of half of each head, q/k/v biases (GLM-4 defaults)
        common.update(head_dim=16, partial_rotary_factor=0.5, attention_bias=True)
        common.pop("rope_theta")
    if family == "mixtral":  # 8 experts of intermediate 64, top-2 (Mixtral-8x7B: 8 of 14336, top-2)
        common.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64)
    if family == "gemma3":
        # 4 layers alternating sliding / global (own RoPE bases), q k^T scaled by 24^-0.5 rather than
        # head_dim^-0.5; window 128 (tests/serve/test_sliding_window_engine.py narrows it below the prompt).
        common.update(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=128,
                      layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
        common.pop("rope_theta")
    common.update(overrides)
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "phi3": Phi3Config, "qwen3_moe": Qwen3MoeConfig, "gemma3": Gemma3TextConfig,
               "mixtral": MixtralConfig, "glm4": Glm4Config, "qwen2_moe": Qwen2MoeConfig}  # fmt: skip
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    return classes[family](**common)


STARVED_EXPERT = -1  # the expert a tiny MoE model's router starves (see make_tiny_model)


def make_tiny_model(
    path: str | Path,
    family: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    **config_overrides,
) -> Path:
    """Write a random-weight model of `family` with the tiny tokenizer to `path`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    config = tiny_config(family, vocab_size=len(tok), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Random init of a tiny model gives near-uniform logits; scale up so greedy decoding is decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 3):  # 3-D: transformers' fused MoE experts [E, out, in]
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            if name.endswith("mlp.gate.weight") and p.dim() == 2:
                # MoE router: the last expert's row is zero, so it scores 0 for every token and makes
                # a token's top-k only when fewer than k other experts score above 0 (about 1 token in
                # 16 for top-2 of 8): calibration starves it, which exercises the per-expert fallback.
                p[STARVED_EXPERT].zero_()
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Qwen3's per-head norms start at 1; varied weights make a mis-wired head show.
                p.uniform_(0.5, 1.5)
            elif family == "gemma3" and name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)  # Gemma's norms scale by (1 + w) and start at w = 0
            elif family == "glm4" and name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # GLM-4's extra norms: varied, so a swapped pair of names shows
            elif family in ("glm4", "qwen2_moe") and name.endswith(".bias"):
                p.normal_(0.0, 0.5)  # q/k/v biases start at zero, which would hide them
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    return path


def wait_until_healthy(proc, url: str, timeout: float, output=lambda: "") -> None:
    """Poll `url`/health until it answers 200, for a server started as subprocess `proc`.

    Fails (AssertionError, for tests) as soon as the process exits or after `timeout` seconds, with
    `output()` (what the server printed so far) in the message."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{output()}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server did not become healthy in {timeout:g} s:\n{output()}"
        time.sleep(0.2)
