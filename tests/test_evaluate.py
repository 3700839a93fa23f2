import math

import pytest
import torch

from qserve.evaluate import load_causal_lm, perplexity


def test_perplexity_matches_hand_computed_nll(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir, dtype="float32", device="cpu")
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, 3 * 16 + 5))
    res = perplexity(model, tokens, seqlen=16, batch_size=2, progress=False)
    # Hand computation: mean over every predicted token of -log softmax(logits)[next token].
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            ids = tokens[:, w * 16 : (w + 1) * 16]
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for t in range(15):
                nll -= logp[t, ids[0, t + 1]].item()
                count += 1
    assert res.windows == 3 and res.tokens == count
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_max_windows_and_too_short(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir, dtype="float32", device="cpu")
    tokens = torch.randint(0, model.config.vocab_size, (1, 100))
    assert perplexity(model, tokens, seqlen=10, max_windows=4, progress=False).windows == 4
    from qserve.errors import ConfigError

    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(model, tokens, seqlen=200, progress=False)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_quantized_checkpoint_loads_dequantized(tiny_llama_dir, tmp_path, fmt):
    """A GPTQ/AWQ directory written by hand per docs/formats.md loads with its dequantized weights."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from qserve.kernels.packing import pack_awq, pack_gptq, rtn_quantize

    out = tmp_path / fmt
    shutil.copytree(tiny_llama_dir, out)
    state = load_file(out / "model.safetensors")
    expected = {}
    new_state = {}
    for k, v in state.items():
        if k.endswith("proj.weight"):
            prefix = k[: -len(".weight")]
            qw = rtn_quantize(v, 4, 32, sym=(fmt == "gptq"))
            expected[k] = qw.dequantize()
            packed = pack_gptq(qw) if fmt == "gptq" else pack_awq(qw)
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                if hasattr(packed, name):
                    new_state[f"{prefix}.{name}"] = getattr(packed, name)
        else:
            new_state[k] = v
    save_file(new_state, out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    if fmt == "gptq":
        qcfg = {
            "bits": 4,
            "group_size": 32,
            "desc_act": False,
            "sym": True,
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }
    else:
        qcfg = {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm"}
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg))
    model = load_causal_lm(out, dtype="float32", device="cpu")
    sd = model.state_dict()
    for k, w in expected.items():
        torch.testing.assert_close(sd[k], w, rtol=0, atol=1e-3)  # scales stored in fp16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
