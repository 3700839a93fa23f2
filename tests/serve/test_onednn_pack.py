"""bf16 Linears on the CPU held in oneDNN's blocked layout (`DenseLinear`, `cpu_gemm.onednn_*`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels import cpu_gemm
from qserve.serve.quant_linear import DenseLinear, resident_weight_bytes


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


needs_onednn_bf16 = pytest.mark.skipif(
    not cpu_gemm.onednn_bf16_packing(), reason="this CPU's oneDNN has no bf16 GEMMs (needs AVX512-BF16 or AMX)"
)


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_layer_computes_f_linear(rows, bias, gen):
    w = torch.randn(200, 96, generator=gen).bfloat16()
    b = torch.randn(200, generator=gen).bfloat16() if bias else None
    layer = DenseLinear(w.clone(), None if b is None else b.clone())
    assert layer.packed is not None and layer.weight.device.type == "meta"
    assert layer.weight.shape == (200, 96) and layer.weight.dtype == torch.bfloat16
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    got = layer(x)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (rows, 200) and got.dtype == torch.bfloat16
    # bf16 products, fp32 sums, one bf16 rounding of the output (and of the bias sum)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=0.05)
    if rows:
        x3 = x.view(1, rows, 96)
        assert torch.equal(layer(x3), got.view(1, rows, 200))
        # fp32 activations are computed in bf16 and come back in fp32
        assert layer(x.float()).dtype == torch.float32


@needs_onednn_bf16
def test_resident_bytes_count_the_packed_weight_once(gen):
    layer = DenseLinear(torch.randn(64, 32, generator=gen).bfloat16(), None)
    assert resident_weight_bytes(torch.nn.Sequential(layer)) == 64 * 32 * 2


def test_switch_off_and_non_bf16_weights_stay_plain(gen, monkeypatch):
    w = torch.randn(16, 8, generator=gen)
    assert DenseLinear(w, None).packed is None  # fp32: the plain path (its own C++ kernels)
    monkeypatch.setenv("QSERVE_CPU_ONEDNN_PACK", "0")
    layer = DenseLinear(w.bfloat16(), None)
    assert layer.packed is None and layer.weight.device.type == "cpu"
    x = torch.randn(3, 8, generator=gen).bfloat16()
    torch.testing.assert_close(layer(x).float(), F.linear(x.float(), w.bfloat16().float()), rtol=2**-7, atol=0.02)


@needs_onednn_bf16
def test_bf16_engine_same_tokens_packed_or_not(tiny_llama_dir, monkeypatch):
    # The engine on a bf16 model: packed weights give the greedy tokens the plain bf16 path gives.
    from qserve import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["Hello there", "The quick brown fox jumps", "1 2 3"]

    def run():
        llm = LLM(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
        model = llm.engine.runner.model
        packed = [m for m in model.modules() if isinstance(m, DenseLinear)]
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], packed, model

    tokens, layers, model = run()
    assert layers and all(m.packed is not None for m in layers)
    # the tied head: a packed copy for batched steps, counted in the resident bytes
    emb = model.embed_tokens.weight
    assert model.lm_head is None and model.packed_head is not None and model.packed_head_bytes == emb.numel() * 2
    hidden = torch.randn(5, emb.shape[1]).bfloat16()
    torch.testing.assert_close(model.compute_logits(hidden), F.linear(hidden.float(), emb.float()), rtol=2**-7,
                               atol=0.05)  # fmt: skip
    assert resident_weight_bytes(model) >= sum(p.numel() * 2 for p in model.parameters() if p.device.type != "meta")
    monkeypatch.setenv("QSERVE_CPU_ONEDNN_PACK", "0")
    plain_tokens, plain_layers, plain_model = run()
    assert all(m.packed is None for m in plain_layers) and plain_model.packed_head is None
    assert resident_weight_bytes(model) == resident_weight_bytes(plain_model) + model.packed_head_bytes
    assert tokens == plain_tokens
