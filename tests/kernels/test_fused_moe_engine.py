"""The engine's MoE layer on its CUDA path: experts built as CUDA-layout `QuantLinear`s are stacked at
construction (`fuse_experts`) and `SparseMoE` runs `kernels.fused_moe`. Without a GPU the kernels run
under TRITON_INTERPRET=1 on CPU tensors (tests/kernels/conftest.py), with backend "triton" forced; with
one, on CUDA as the engine runs them. The output is compared with the per-expert loop over the same
QuantLinears and with the CPU engine's layers built from the same packed tensors, which stay unfused
(dequantized at load, QSERVE_CPU_PACKED=0: exact fp32 math, where the packed CPU kernels may quantize
decode activations to int8)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TRITON_DEVICES

from qserve.kernels import packing
from qserve.serve import quant_linear
from qserve.serve.model import MLP, ModelConfig, SparseMoE
from qserve.serve.quant_linear import FusedExperts, PackedLinear, QuantLinear, QuantSpec, build_linear

triton_moe = pytest.importorskip("qserve.kernels.triton_moe", reason="triton is not installed")

HIDDEN, INTER, EXPERTS = 64, 32, 4


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 results of the same arithmetic summed in another order: agreement to 1e-5 of the largest
    output (the outputs of these random experts reach ~100), far below what a wrong expert, routing
    weight or group would move."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def moe_config(family: str) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=INTER)  # fmt: skip
    if family == "qwen2_moe":
        return ModelConfig.from_hf({**base, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                                    "shared_expert_intermediate_size": 96, "norm_topk_prob": False})  # fmt: skip
    return ModelConfig.from_hf({**base, "architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": True})


def packed(out_f: int, in_f: int, spec: QuantSpec, act_order: bool, gen) -> PackedLinear:
    qw = packing.rtn_quantize(torch.randn(out_f, in_f, generator=gen), bits=spec.bits,
                              group_size=spec.group_size, sym=spec.method == "gptq")  # fmt: skip
    if act_order:  # an own random column order per Linear: gate and up then cannot be concatenated
        perm = torch.randperm(in_f, generator=gen)
        qw = packing.QuantizedWeight(
            qw.intweight, qw.scales, qw.zeros, qw.g_idx[perm], qw.bits, qw.group_size
        )
    if spec.method == "awq":
        p = packing.pack_awq(qw)
        return PackedLinear(p.qweight, p.qzeros, p.scales, None)
    p = packing.pack_gptq(qw, spec.checkpoint_format)
    return PackedLinear(p.qweight, p.qzeros, p.scales, p.g_idx if act_order else None)


def build_moe(cfg: ModelConfig, spec: QuantSpec, act_order: bool, seed: int, device: str = "cpu"):
    """Two SparseMoE blocks over the same packed experts and router: the CUDA layout (QuantLinear, on
    `device`) and the CPU engine's (build_linear on the CPU). Expert 0 keeps contiguous groups under
    act-order. The CUDA-layout block runs its Triton kernels (interpreted on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    experts = [(packed(INTER, HIDDEN, spec, act_order and e, gen), packed(INTER, HIDDEN, spec, act_order and e, gen),
                packed(HIDDEN, INTER, spec, act_order and e, gen)) for e in range(EXPERTS)]  # fmt: skip
    shared = None
    if cfg.shared_expert_intermediate_size:
        n = cfg.shared_expert_intermediate_size
        shared = (packed(n, HIDDEN, spec, act_order, gen), packed(n, HIDDEN, spec, act_order, gen),
                  packed(HIDDEN, n, spec, act_order, gen))  # fmt: skip
    router = torch.randn(EXPERTS, HIDDEN, generator=gen)
    shared_gate = torch.randn(1, HIDDEN, generator=gen)
    cpu = torch.device("cpu")

    def to(p: PackedLinear) -> PackedLinear:
        return PackedLinear(
            *(None if t is None else t.to(device) for t in (p.qweight, p.qzeros, p.scales, p.g_idx))
        )

    def cuda_layout(g, u, d):
        return MLP(QuantLinear([to(g), to(u)], None, spec), QuantLinear([to(d)], None, spec))

    def cpu_layout(g, u, d):
        return MLP(build_linear([g, u], [None, None], spec, cpu, torch.float32),
                   build_linear([d], [None], spec, cpu, torch.float32))  # fmt: skip

    blocks = []
    for layout, on in ((cuda_layout, device), (cpu_layout, "cpu")):
        moe = SparseMoE(cfg, [layout(*e) for e in experts], shared and layout(*shared))
        moe.gate.weight = torch.nn.Parameter(router.to(on), requires_grad=False)
        if shared is not None:
            moe.shared_expert_gate.weight = torch.nn.Parameter(shared_gate.to(on), requires_grad=False)
        blocks.append(moe)
    if device == "cpu":
        blocks[0].fused.backend = "triton"  # what CUDA tensors select; here interpreted
    return blocks


CASES = [
    ("qwen3_moe", QuantSpec("gptq", 4, 32, "gptq", desc_act=True), True),  # gate/up: two stacks
    ("qwen3_moe", QuantSpec("awq", 4, 32), False),  # gate|up concatenated: one stack
    (
        "qwen2_moe",
        QuantSpec("gptq", 4, 32, "gptq_v2"),
        False,
    ),  # v2 zeros, with the shared expert beside the routed ones
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("family", "spec", "act_order"), CASES)
def test_cuda_path_glue_matches_the_expert_loop_and_the_cpu_engine(
    family, spec, act_order, device, monkeypatch
):
    monkeypatch.setenv("QSERVE_CPU_PACKED", "0")  # the CPU engine's dequantized fp32 layers: exact math
    cfg = moe_config(family)
    fused, cpu = build_moe(cfg, spec, act_order, seed=3, device=device)
    assert isinstance(fused.fused, FusedExperts) and cpu.fused is None  # the CPU engine never fuses
    assert len(fused.fused.gate_up) == (2 if act_order else 1)
    assert (fused.fused.down.g_idx is not None) == act_order
    calls = []
    real = triton_moe.fused_moe_triton
    monkeypatch.setattr(
        triton_moe, "fused_moe_triton", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    )
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for rows in (x, x[:1]):  # a batch and a batch-1 decode (the CPU path routes that in Python)
            got = fused(rows.to(device))
            assert_same(got.cpu(), cpu(rows))
            loop = fused.fused
            fused.fused = None  # the same QuantLinears, now views of the stacks, one expert at a time
            assert_same(got, fused(rows.to(device)))
            fused.fused = loop
    assert calls == [(6, HIDDEN), (1, HIDDEN)]


def test_stacking_holds_the_weights_once():
    fused, _ = build_moe(moe_config("qwen3_moe"), QuantSpec("gptq", 4, 32, desc_act=True), True, seed=4)
    stacks = fused.fused
    for e, expert in enumerate(fused.experts):
        gate, up = expert.gate_up_proj.parts
        assert (
            gate.qweight.untyped_storage().data_ptr()
            == stacks.gate_up[0].qweight.untyped_storage().data_ptr()
        )
        assert torch.equal(up.scales, stacks.gate_up[1].scales[e])
        assert (gate.g_idx is None) == (e == 0)  # contiguous groups stay None in the expert's own view
    assert torch.equal(stacks.gate_up[0].g_idx[0], torch.arange(HIDDEN, dtype=torch.int32) // 32)
    assert quant_linear.resident_weight_bytes(fused) == sum(
        t.untyped_storage().nbytes()
        for s in (*stacks.gate_up, stacks.down)
        for t in (s.qweight, s.qzeros, s.scales, s.g_idx)
    ) + sum(p.untyped_storage().nbytes() for p in fused.parameters())


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mixed_concatenation_is_cut_into_gate_and_up_stacks(device, monkeypatch):
    """Experts whose gate and up were concatenated next to experts whose were not (act-order with
    different g_idx) still fuse: the concatenated ones are cut back into a gate and an up part."""
    monkeypatch.setenv("QSERVE_CPU_PACKED", "0")  # the CPU engine's dequantized fp32 layers: exact math
    spec = QuantSpec("gptq", 4, 32, desc_act=True)
    fused, cpu = build_moe(moe_config("qwen3_moe"), spec, True, seed=5, device=device)
    cut = quant_linear._split_columns(  # expert 0 (contiguous groups) as a concatenated gate|up part
        quant_linear._concat_parts(fused.experts[0].gate_up_proj.parts, spec)[0], INTER, spec
    )
    assert [tuple(p.qweight.shape) for p in cut] == [(HIDDEN // 8, INTER)] * 2
    experts = [MLP(QuantLinear([*m.gate_up_proj.parts], None, spec), QuantLinear(m.down_proj.parts, None, spec))
               for m in fused.experts]  # fmt: skip
    assert len(experts[0].gate_up_proj.parts) == 1 and len(experts[1].gate_up_proj.parts) == 2
    moe = SparseMoE(moe_config("qwen3_moe"), experts)
    moe.gate = fused.gate
    assert moe.fused is not None and len(moe.fused.gate_up) == 2
    if device == "cpu":
        moe.fused.backend = "triton"  # interpreted
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert_same(moe(x.to(device)).cpu(), cpu(x))
