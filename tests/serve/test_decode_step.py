"""The C++ decode step (serve/decode_step.py, kernels/csrc/decode_step.cpp): all layers of a decode step in
one call for 4-bit models on the CPU. It runs the module path's kernels in the module path's order, so the
engine's logprobs (not only its tokens) must be equal with it on and off, and models it does not know must
keep the module path."""

from __future__ import annotations

import pytest
import torch
from test_engine import small_llm
from tiny_checkpoints import (
    model_of,
    quantize_checkpoint,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
    varied_model,
)

from qserve import SamplingParams
from qserve.kernels import cpu_packed
from qserve.serve import decode_step

PROMPTS = [[(7 * i + j) % 90 + 3 for j in range(3 + 2 * i)] for i in range(12)]


pytestmark = pytest.mark.usefixtures("compiled_kernels")


def run(model_dir, prompts, dtype, monkeypatch, fused: bool, **kwargs):
    """(token ids, logprobs per token) of each prompt, and the model the engine ran."""
    monkeypatch.setenv("QSERVE_CPU_FUSED_DECODE", "1" if fused else "0")
    # 16 sequences at once: decode steps of up to 12 rows (more than the int8 kernel's 8)
    llm = small_llm(model_dir, dtype=dtype, num_blocks=64, max_num_seqs=16, max_num_batched_tokens=64, **kwargs)
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    result = [
        (o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
        for o in outs
    ]
    return result, model_of(llm)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("family", "method"), [("llama", "awq"), ("llama", "gptq"), ("qwen2", "gptq"), ("qwen3", "awq")]
)
@pytest.mark.parametrize("batch", [1, 12])
def test_fused_step_equals_the_module_path_bit_for_bit(tmp_path, llama, family, method, dtype, batch, monkeypatch):
    # qwen2: biases on q, k and v; qwen3: q/k norms; 12 rows: past the int8 kernel's 8 (fp32 kernels, AMX in bf16)
    src = llama if family == "llama" else varied_model(tmp_path / family, family)
    qdir, _ = quantize_checkpoint(src, tmp_path / "q", method)
    prompts = PROMPTS[:batch]
    fused, model = run(qdir, prompts, dtype, monkeypatch, fused=True)
    assert model.decode_step is not None and model.decode_step.calls >= 9  # every decode step took it
    modules, plain = run(qdir, prompts, dtype, monkeypatch, fused=False)
    assert plain.decode_step is None
    assert fused == modules
    assert len({t for tokens, _ in fused for t in tokens}) > 3  # varied tokens: the comparison means something


def test_each_linear_kernel_path_is_taken(tmp_path, llama, monkeypatch):
    # The C++ step picks the kernel by the code kernel_args gives; record which codes the steps ran with.
    qdir, _ = quantize_checkpoint(llama, tmp_path / "q", "awq")
    seen = []
    real = cpu_packed.kernel_args
    monkeypatch.setattr(cpu_packed, "kernel_args", lambda *a: seen.append(real(*a)[0]) or real(*a))
    run(qdir, PROMPTS[:12], "bfloat16", monkeypatch, fused=True)
    want = {cpu_packed.KERNEL_CODES["int8"], cpu_packed.KERNEL_CODES["amx" if cpu_packed.amx_linear() else "fp32"]}
    assert want <= set(seen)


@pytest.mark.parametrize(
    ("family", "overrides", "quantized", "why"),
    [
        ("llama", {}, False, "not one resident 4-bit weight"),
        ("glm4", {}, True, "pre-norm decoder layer"),
        ("gemma3", {}, True, "two RoPE tables"),
        ("mixtral", {}, True, "MLP is not a SiLU MLP"),
    ],
)
def test_models_it_does_not_know_keep_the_module_path(tmp_path, family, overrides, quantized, why, caplog):
    src = varied_model(tmp_path / family, family, **overrides)
    model_dir = quantize_checkpoint(src, tmp_path / "q", "awq")[0] if quantized else src
    with caplog.at_level("DEBUG", logger="qserve.serve.decode_step"):
        llm = small_llm(model_dir, num_blocks=64)
        out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert model_of(llm).decode_step is None
    assert why in caplog.text


def test_switched_off_by_the_environment(tmp_path, llama, monkeypatch):
    qdir, _ = quantize_checkpoint(llama, tmp_path / "q", "awq")
    _, model = run(qdir, PROMPTS[:2], "float32", monkeypatch, fused=False)
    assert model.decode_step is None
    assert decode_step._refusal(model) == "QSERVE_CPU_FUSED_DECODE=0"


def test_malformed_arguments_are_refused_with_the_counts():
    x = torch.zeros(1, 64)
    with pytest.raises(RuntimeError, match="2 layers need 48 params and 16 dims"):
        torch.ops.qserve_cpu.decode_step(
            x, [x] * 3, [1] * 16, [x, x], [x, x], x, x, torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1, 1, 64, 1.0, 1e-5, 1, 0, False,
        )  # fmt: skip
