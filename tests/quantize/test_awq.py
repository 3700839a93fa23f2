"""AWQ search/apply on a tiny random decoder block with outlier input channels."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qserve.kernels.packing import rtn_quantize
from qserve.quantize.arch import arch_for_config
from qserve.quantize.awq import (
    AwqBlockResult,
    awq_apply_block,
    awq_search_block,
    collect_awq_activations,
)
from qserve.quantize.awq_scale import fake_quantize_scaled
from qserve.testing import tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors here are tiny: a second OpenMP thread only adds synchronisation, which on a shared
    # 2-core machine costs more than the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GS = 32
OUTLIERS = [3, 17, 40]


def tiny_block(family: str = "llama", kv_heads: int = 2, n: int = 6, seq: int = 32, seed: int = 0):
    """Block 0 of a tiny random model, its captured inputs (with outlier channels) and kwargs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, num_key_value_heads=kv_heads)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
            elif name.endswith("bias"):  # qwen2's q/k/v biases start at zero, which would hide them
                p.normal_(0.0, 0.1)
    captured = {}

    def grab(module, args, kwargs):
        captured["x"], captured["kwargs"] = args[0].detach().clone(), kwargs

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(3, config.vocab_size, (n, seq)), use_cache=False)
    handle.remove()
    x = captured["x"]
    x[..., OUTLIERS] *= 30.0  # the few large channels AWQ exists for
    return model.model.layers[0], x, captured["kwargs"], arch_for_config(config)


def run(block, x, kwargs):
    with torch.no_grad():
        y = block(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def quantize_block(block, spec, clips=None):
    clips = clips or {}
    with torch.no_grad():
        for name in spec.linears:
            lin = block.get_submodule(name)
            q = rtn_quantize(lin.weight, 4, GS, sym=False, clip_max=clips.get(name))
            lin.weight.copy_(q.dequantize())
    return block


@pytest.fixture(scope="module")
def searched():
    block, x, kwargs, spec = tiny_block(kv_heads=4)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    result = awq_search_block(block, x, kwargs, spec, group_size=GS, search_tokens=10**6)
    return block, x, kwargs, spec, result, before


def test_awq_block_error_below_rtn(searched):
    block, x, kwargs, spec, result, _ = searched
    ref = run(block, x, kwargs)
    awq = copy.deepcopy(block)
    awq_apply_block(awq, result, spec)
    quantize_block(awq, spec, {c.linear: c.max_val for c in result.clips})
    err_awq = float((run(awq, x, kwargs) - ref).square().mean())
    err_rtn = float((run(quantize_block(copy.deepcopy(block), spec), x, kwargs) - ref).square().mean())
    print(f"block output MSE: awq {err_awq:.3e} rtn {err_rtn:.3e}")
    assert err_awq < 0.6 * err_rtn


def test_search_leaves_block_unmodified(searched):
    block, *_, before = searched
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_apply_is_identity_on_float_output(family, searched):
    # qwen2 folds into v_proj, which has a bias: the bias must be divided too.
    block, x, kwargs, spec = tiny_block(family, kv_heads=4, seed=1)
    result = awq_search_block(block, x, kwargs, spec, group_size=GS, clip=False, n_grid=4)
    assert any(s.prev_op == "self_attn.v_proj" for s in result.scales)
    assert all(not torch.allclose(s.scales, torch.ones_like(s.scales)) for s in result.scales)
    ref = run(block, x, kwargs)
    awq_apply_block(block, result, spec)
    torch.testing.assert_close(run(block, x, kwargs), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_logged_loss_is_the_inspect_modules_error(searched):
    """Each group's loss (Gram, token-wise or sequence path) equals the MSE of its inspect module's
    output on all tokens with the group's linears set to Q(W s) / s."""
    block, x, kwargs, spec, result, _ = searched
    captured = {}

    def grab(name):
        def hook(module, args, kw):
            captured[name] = (args, kw)  # returns None: the call is left as it is

        return hook

    hooks = [
        block.get_submodule(g.inspect).register_forward_pre_hook(grab(g.inspect), with_kwargs=True)
        for g in spec.scale_groups
    ]
    run(block, x, kwargs)
    for h in hooks:
        h.remove()
    assert len(result.log) == len(result.scales) == 4
    for entry, sc in zip(result.log, result.scales, strict=True):
        group = next(g for g in spec.scale_groups if g.prev_op == entry["prev_op"])
        args, kw = captured[group.inspect]
        module = block.get_submodule(group.inspect)
        ref = module(*args, **kw)
        quant = copy.deepcopy(module)
        with torch.no_grad():
            for name in group.linears:
                lin = quant if name == group.inspect else quant.get_submodule(name[len(group.inspect) + 1 :])
                lin.weight.copy_(fake_quantize_scaled(lin.weight, sc.scales, 4, GS, sym=False))
        out = quant(*args, **kw)
        ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
        assert entry["loss"] == pytest.approx(float((out - ref).square().mean()), rel=1e-3)
        assert entry["loss"] < entry["rtn_loss"]


def test_clips_reduce_each_linears_error(searched):
    block, x, kwargs, spec, result, _ = searched
    scaled = copy.deepcopy(block)
    awq_apply_block(scaled, result, spec)
    inputs = {}

    def grab(name):
        def hook(module, args, output):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    hooks = [scaled.get_submodule(c.linear).register_forward_hook(grab(c.linear)) for c in result.clips]
    run(scaled, x, kwargs)
    for h in hooks:
        h.remove()
    assert [c.linear for c in result.clips] == [
        n for n in spec.linears if not n.endswith(("q_proj", "k_proj"))
    ]
    some_clipped = False
    for c in result.clips:
        w = scaled.get_submodule(c.linear).weight.detach()
        assert c.max_val.shape == (w.shape[0], w.shape[1] // GS)
        x_in = inputs[c.linear]
        err_clip = (
            (x_in @ (rtn_quantize(w, 4, GS, False, clip_max=c.max_val).dequantize() - w).t()).square().mean()
        )
        err_none = (x_in @ (rtn_quantize(w, 4, GS, False).dequantize() - w).t()).square().mean()
        assert err_clip <= err_none * (1 + 1e-5)
        some_clipped |= bool((c.max_val < w.abs().reshape(w.shape[0], -1, GS).amax(-1) * 0.999).any())
    assert some_clipped


def test_state_dict_round_trips_through_safetensors_and_json(searched, tmp_path):
    result = searched[4]
    d = result.state_dict()
    tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "awq.safetensors")
    (tmp_path / "awq.json").write_text(json.dumps(d["meta"]))
    loaded = {
        **load_file(tmp_path / "awq.safetensors"),
        "meta": json.loads((tmp_path / "awq.json").read_text()),
    }
    back = AwqBlockResult.from_state_dict(loaded)
    assert [(s.prev_op, s.linears) for s in back.scales] == [(s.prev_op, s.linears) for s in result.scales]
    assert all(torch.equal(a.scales, b.scales) for a, b in zip(back.scales, result.scales, strict=True))
    assert [c.linear for c in back.clips] == [c.linear for c in result.clips]
    assert all(torch.equal(a.max_val, b.max_val) for a, b in zip(back.clips, result.clips, strict=True))
    assert back.log == result.log


def test_gqa_skips_the_v_to_o_group():
    block, x, kwargs, spec = tiny_block(kv_heads=2)  # v_proj [32, 64] vs o_proj [64, 64]
    result = awq_search_block(block, x, kwargs, spec, group_size=GS, clip=False, n_grid=2)
    assert [s.prev_op for s in result.scales] == [
        "input_layernorm",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]


def test_collect_outputs_and_subsampling():
    block, x, kwargs, spec = tiny_block(n=8, seq=32)
    acts, out = collect_awq_activations(block, x, kwargs, spec, search_tokens=64, max_chunk_tokens=96)
    torch.testing.assert_close(out, run(block, x, kwargs), rtol=1e-5, atol=1e-5)
    q_in = acts.inputs["self_attn.q_proj"]
    # 256 tokens, budget 64: stride 4 shares a factor with seqlen 32, so it becomes 5 (52 rows)
    # and the rows cover many positions instead of the same 8 in every sequence.
    assert q_in.rows.shape == (52, 64)
    assert q_in.seqs.shape == (2, 32, 64)  # attention is scored on ceil(64 / 32) whole sequences
    assert acts.inputs["mlp.gate_proj"].seqs is None  # the MLP is token-wise
    normed = block.input_layernorm(x).reshape(-1, 64)
    torch.testing.assert_close(q_in.abs_mean, normed.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_in.rows, normed[::5], rtol=1e-5, atol=1e-6)


def test_bfloat16_block_is_searched_in_float32():
    block, x, kwargs, spec = tiny_block(kv_heads=4)
    block.to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    kw16 = {
        k: tuple(t.to(torch.bfloat16) for t in v) if k == "position_embeddings" else v
        for k, v in kwargs.items()
    }
    result = awq_search_block(block, x16, kw16, spec, group_size=GS, n_grid=4)
    assert all(s.scales.dtype == torch.float32 and torch.isfinite(s.scales).all() for s in result.scales)
    assert all(c.max_val.dtype == torch.float32 for c in result.clips)
    assert all(e["loss"] < e["rtn_loss"] for e in result.log)
    ref = run(block, x16, kw16).float()
    awq_apply_block(block, result, spec)
    assert block.input_layernorm.weight.dtype == torch.bfloat16
    rel = (run(block, x16, kw16).float() - ref).norm() / ref.norm()
    assert rel < 2e-2  # bf16 rounding of the rescaled weights only
