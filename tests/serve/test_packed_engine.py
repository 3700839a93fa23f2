"""The CPU engine on 4-bit checkpoints through the packed C++ kernels: tokens, memory, bf16 head.

Without the compiled kernels these tests skip (the engine then dequantizes at load, covered by
test_engine.py), except under QSERVE_REQUIRE_CPU_EXT=1 (CI), where they fail.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import assert_matches_hf, small_llm
from tiny_checkpoints import (
    model_of,
    quantize_checkpoint,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
    varied_model,
)

from qserve.serve.api.metrics import _EngineCollector
from qserve.serve.quant_linear import (
    Bf16Linear,
    CpuQuantLinear,
    DenseLinear,
    HalfEmbedding,
    resident_weight_bytes,
)

pytestmark = pytest.mark.usefixtures("compiled_kernels")


def layers_by_kind(model) -> dict[type, int]:
    kinds: dict[type, int] = {}
    for module in model.modules():
        if isinstance(module, (CpuQuantLinear, DenseLinear, Bf16Linear)):
            kinds[type(module)] = kinds.get(type(module), 0) + 1
    return kinds


def checkpoint_tensor_bytes(model_dir) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(model_dir / "model.safetensors").values())


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
@pytest.mark.parametrize(("method", "act_order"), [("gptq", True), ("awq", False)])
def test_greedy_through_the_packed_kernels_matches_dequantized_transformers(
    tmp_path, llama, method, act_order, isa, monkeypatch
):
    if isa == "avx512" and not torch.ops.qserve_cpu.has_avx512():
        pytest.skip("this CPU has no AVX-512F/BW/VL")
    monkeypatch.setenv("QSERVE_CPU_ISA", isa)
    qdir, dense_dir = quantize_checkpoint(llama, tmp_path / "q", method, act_order=act_order)
    llm = small_llm(qdir)
    # every quantized Linear (2 layers x qkv, o, gate/up, down) runs packed; nothing was dequantized
    assert layers_by_kind(model_of(llm)) == {CpuQuantLinear: 8, DenseLinear: 1}  # + the fp32 LM head
    packed = [m for m in model_of(llm).modules() if isinstance(m, CpuQuantLinear)]
    assert all((w.perm is not None) == act_order for m in packed for w in m.weights)
    assert_matches_hf(llm, qdir, dense_dir)


def test_resident_weight_bytes_stay_near_the_checkpoint_and_are_reported(tmp_path, llama):
    qdir, dense_dir = quantize_checkpoint(llama, tmp_path / "q", "awq", group_size=32)
    llm = small_llm(qdir)
    resident = resident_weight_bytes(model_of(llm))
    on_disk = checkpoint_tensor_bytes(qdir)
    assert resident <= 1.15 * on_disk, (resident, on_disk)
    # the same model held dense (what the CPU engine did before) is far larger: the test can fail
    dense_llm = small_llm(dense_dir)
    linear_bytes = sum(
        m.weight.numel() * 4 for m in model_of(dense_llm).modules() if isinstance(m, DenseLinear)
    )
    assert resident < resident_weight_bytes(model_of(dense_llm)) - 0.6 * linear_bytes
    assert llm.engine.resident_weight_bytes == resident == llm.engine.stats().resident_weight_bytes
    families = {f.name: f for f in _EngineCollector(llm.engine, "tiny").collect()}
    gauge = families["qserve:resident_weight_bytes"]
    assert gauge.type == "gauge" and gauge.samples[0].value == resident


def test_a_tied_bf16_head_is_held_once(tmp_path):
    # A bf16 unquantized model keeps a oneDNN-blocked copy of a tied head for batched steps; a quantized
    # one must not (the copy alone is ~half of SmolLM2-AWQ's checkpoint): resident bytes stay near the file.
    tied = varied_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    qdir, _ = quantize_checkpoint(tied, tmp_path / "q", "awq")
    tensors = load_file(qdir / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].bfloat16()
    save_file(tensors, qdir / "model.safetensors", metadata={"format": "pt"})
    model = model_of(small_llm(qdir, dtype="bfloat16"))
    assert model.lm_head is None and model.packed_head is None and model.packed_head_bytes == 0
    assert resident_weight_bytes(model) <= 1.15 * checkpoint_tensor_bytes(qdir)


def test_bf16_embeddings_and_head_stay_bf16(tmp_path, llama):
    qdir, dense_dir = quantize_checkpoint(llama, tmp_path / "q", "awq")
    for d in (qdir, dense_dir):  # the same bf16 values in the reference, which HF widens exactly
        tensors = load_file(d / "model.safetensors")
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name].bfloat16()
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    llm = small_llm(qdir)
    model = model_of(llm)
    assert isinstance(model.embed_tokens, HalfEmbedding) and model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(model.lm_head, Bf16Linear) and model.lm_head.weight.dtype == torch.bfloat16
    assert layers_by_kind(model) == {CpuQuantLinear: 8, Bf16Linear: 1}
    assert resident_weight_bytes(model) <= 1.15 * checkpoint_tensor_bytes(qdir)
    assert_matches_hf(llm, qdir, dense_dir)


def test_bf16_batched_steps_take_the_amx_kernel_and_match_the_dense_bf16_engine(tmp_path, llama, monkeypatch):
    # In bf16 on an AMX CPU, steps of 9 or more rows multiply the 4-bit weights as bf16 tiles: the values the
    # dense bf16 engine holds after dequantizing at load (QSERVE_CPU_PACKED=0), so the greedy tokens agree.
    from qserve import LLM, SamplingParams
    from qserve.kernels import cpu_packed

    if not cpu_packed.amx_linear():
        pytest.skip("this CPU has no AMX-BF16")
    qdir, _ = quantize_checkpoint(llama, tmp_path / "q", "awq", act_order=False)
    prompts = [[(7 * i + j) % 90 + 3 for j in range(5 + i)] for i in range(12)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rows = []
    amx, q8, fp32 = cpu_packed._ops()
    monkeypatch.setattr(cpu_packed, "_ops", lambda: (lambda x, *a: rows.append(x.shape[0]) or amx(x, *a), q8, fp32))
    # decode steps run their layers in C++ (serve/decode_step.py), which takes the kernel kernel_args names
    step_rows = []
    args = cpu_packed.kernel_args
    monkeypatch.setattr(cpu_packed, "kernel_args", lambda x, *a: step_rows.append((x.shape[0], args(x, *a)[0])) or args(x, *a))
    kwargs = {"dtype": "bfloat16", "max_model_len": 64, "max_num_seqs": 16, "validate": False}
    packed = [o.outputs[0].token_ids for o in LLM(str(qdir), **kwargs).generate(prompts, sp, use_tqdm=False)]
    assert rows and min(rows) >= cpu_packed.AMX_MIN_ROWS  # prompts through the modules
    assert (12, cpu_packed.KERNEL_CODES["amx"]) in step_rows  # the decode steps of all twelve sequences
    monkeypatch.setenv("QSERVE_CPU_PACKED", "0")
    dense = [o.outputs[0].token_ids for o in LLM(str(qdir), **kwargs).generate(prompts, sp, use_tqdm=False)]
    assert packed == dense
