"""First-run defaults of `qserve quantize`: the automatic group size, the calibration-size warning, the
cached original perplexity and the calibration log line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qserve.errors import ConfigError
from qserve.quantize.config import (
    AWQ_MIN_TOKENS,
    GPTQ_MIN_TOKENS_PER_IN_FEATURE,
    QuantConfig,
    calibration_warning,
    check_layer_shapes,
    resolve_group_size,
)
from qserve.testing import make_tiny_model

torch.set_num_threads(1)

SMOLLM2_SHAPES = {
    "model.layers.0.self_attn.q_proj": (576, 576),
    "model.layers.0.mlp.up_proj": (1536, 576),
    "model.layers.0.mlp.down_proj": (576, 1536),
}


def _cfg(**kw) -> QuantConfig:
    return QuantConfig(**{"model": "m", "output": "o", "method": "gptq", **kw})


def _calib(path):
    words = ["the", "model", "reads", "text", "and", "answers", "questions", "about", "cities", "rivers"]
    docs = [" ".join(words[(i + j) % len(words)] for j in range(90)) for i in range(40)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


# ------------------------------------------------------------------ group size


def test_default_group_size_is_automatic():
    assert _cfg().group_size is None
    assert QuantConfig.from_dict({"model": "m", "output": "o", "method": "awq"}).group_size is None


@pytest.mark.parametrize(
    ("in_features", "chosen"),
    [((4096, 14336), 128), ((576, 1536), 64), ((96, 192), 32), ((2048, 5632), 128), ((1024, 2816), 128)],
)
def test_automatic_group_size_is_the_largest_standard_size_dividing_every_layer(in_features, chosen):
    shapes = {f"model.layers.0.l{i}": (64, f) for i, f in enumerate(in_features)}
    cfg, msg = resolve_group_size(_cfg(), shapes)
    assert cfg.group_size == chosen
    assert msg.startswith(f"group size: {chosen} (automatic:") and "--group-size" in msg
    check_layer_shapes(cfg, shapes)  # the chosen size always passes the shape check


def test_automatic_group_size_says_why_larger_sizes_were_skipped():
    cfg, msg = resolve_group_size(_cfg(), SMOLLM2_SHAPES)
    assert cfg.group_size == 64
    assert "128 does not divide 576" in msg and "576, 1536" in msg


def test_automatic_group_size_with_no_standard_fit_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"no standard group size.*in_features 40, 80.*--group-size -1"):
        resolve_group_size(_cfg(), {"a": (64, 40), "b": (64, 80)})


def test_explicit_group_size_is_kept_and_still_checked():
    cfg, msg = resolve_group_size(_cfg(group_size=128), SMOLLM2_SHAPES)
    assert cfg.group_size == 128 and msg is None
    with pytest.raises(ConfigError, match=r"group_size=128 does not divide.*--group-size 64 or 32 or -1"):
        check_layer_shapes(cfg, SMOLLM2_SHAPES)


# ------------------------------------------------------------------ calibration warning


def test_gptq_warns_below_16_tokens_per_input_channel_of_the_widest_layer():
    # SmolLM2's widest quantized layer is down_proj (in_features 1536): 16 x 1536 = 24576 tokens needed.
    low = calibration_warning(_cfg(n_samples=16, seqlen=512), SMOLLM2_SHAPES)
    assert low is not None and low.startswith("warning:")
    assert "8192 calibration tokens" in low and "mlp.down_proj" in low and "in_features 1536" in low
    assert f"{GPTQ_MIN_TOKENS_PER_IN_FEATURE} tokens per input channel (24576 here)" in low
    assert "--n-samples to at least 48" in low
    assert calibration_warning(_cfg(n_samples=48, seqlen=512), SMOLLM2_SHAPES) is None
    assert calibration_warning(_cfg(n_samples=47, seqlen=512), SMOLLM2_SHAPES) is not None
    # skip_first tokens are not in the Hessians, so they do not count.
    assert calibration_warning(_cfg(n_samples=48, seqlen=512, skip_first=8), SMOLLM2_SHAPES) is not None


def test_gptq_says_when_the_hessian_is_singular():
    msg = calibration_warning(_cfg(n_samples=2, seqlen=512), SMOLLM2_SHAPES)
    assert "1024 calibration tokens" in msg and "Hessian is singular" in msg


def test_awq_warns_only_below_its_search_budget_and_rtn_never():
    assert calibration_warning(_cfg(method="awq", n_samples=16, seqlen=512), SMOLLM2_SHAPES) is None
    msg = calibration_warning(_cfg(method="awq", n_samples=3, seqlen=512), SMOLLM2_SHAPES)
    assert msg is not None and f"search budget of {AWQ_MIN_TOKENS} tokens" in msg and "at least 4" in msg
    assert calibration_warning(_cfg(method="rtn", n_samples=1, seqlen=2), SMOLLM2_SHAPES) is None


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory):
    """A tiny Llama whose in_features (96, 192) only 32 divides."""
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny96", hidden_size=96, intermediate_size=192)


@pytest.fixture()
def counted_eval(monkeypatch, tmp_path):
    """The cache lives in a fresh QSERVE_HOME; evaluate_ppl calls are counted per model path."""
    import qserve.evaluate as ev

    monkeypatch.setenv("QSERVE_HOME", str(tmp_path / "home"))
    calls: list[str] = []
    real = ev.evaluate_ppl

    def counting(path, *a, **kw):
        calls.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(ev, "evaluate_ppl", counting)
    return calls


def test_quantize_picks_the_group_size_warns_names_the_file_and_caches_the_original_ppl(
    tiny96, tmp_path, counted_eval
):
    from qserve.quantize.pipeline import quantize_model

    calib = _calib(tmp_path / "calib.txt")
    lines: list[str] = []
    base = dict(
        model=str(tiny96), method="gptq", calib=str(calib), n_samples=4, seqlen=32, device="cpu",
        eval=True, eval_seqlen=64, eval_windows=2, quiet=True,
    )  # fmt: skip
    report = quantize_model(QuantConfig(output=str(tmp_path / "a"), **base), log=lines.append)
    text = "\n".join(lines)
    assert "group size: 32 (automatic:" in text and "128 does not divide 96, 192" in text
    assert report.config["group_size"] == 32
    qcfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qcfg["group_size"] == 32
    assert f"read from {calib}" in text
    assert "warning: 4 x 32 = 128 calibration tokens is too few for GPTQ" in text
    assert counted_eval == [str(tiny96), str(tmp_path / "a")]
    assert "cached in" in text and "from cache" not in text

    lines.clear()
    report2 = quantize_model(QuantConfig(output=str(tmp_path / "b"), **base), log=lines.append)
    # Only the quantized model is evaluated the second time; the original comes from the cache.
    assert counted_eval[2:] == [str(tmp_path / "b")]
    assert any(line.startswith("original perplexity from cache") for line in lines)
    assert report2.ppl["original"] == report.ppl["original"]

    # A changed evaluation setting is a different key: computed again.
    quantize_model(QuantConfig(output=str(tmp_path / "c"), **{**base, "eval_windows": 1}), log=lines.append)
    assert counted_eval[3:] == [str(tiny96), str(tmp_path / "c")]


def test_original_ppl_cache_keys_on_settings_and_weight_files(tiny_llama_dir, tmp_path, counted_eval):
    import shutil

    from qserve.evaluate import original_ppl, ppl_cache_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    text = _calib(tmp_path / "eval.txt")
    kw = dict(dataset=str(text), seqlen=32, max_windows=2, device="cpu", progress=False, log=lambda _m: None)
    first = original_ppl(model, **kw)
    assert original_ppl(model, **kw) == first and len(counted_eval) == 1
    assert len(list(ppl_cache_dir().glob("*.json"))) == 1
    original_ppl(model, **{**kw, "seqlen": 16})  # seqlen
    original_ppl(model, **{**kw, "max_windows": 1})  # windows
    original_ppl(model, **{**kw, "dtype": "bfloat16"})  # dtype
    assert len(counted_eval) == 4
    other = _calib(tmp_path / "other.txt")
    other.write_text(other.read_text() + "more text\n")
    original_ppl(model, **{**kw, "dataset": str(other)})  # dataset
    assert len(counted_eval) == 5
    # Rewritten weights (new mtime) are a different model.
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    original_ppl(model, **kw)
    assert len(counted_eval) == 6
    original_ppl(model, **kw)
    assert len(counted_eval) == 6
    original_ppl(model, cache=False, **kw)
    assert len(counted_eval) == 7


def test_unreadable_cache_entry_is_recomputed_and_said(tiny_llama_dir, tmp_path, counted_eval):
    from qserve.evaluate import original_ppl, ppl_cache_dir

    text = _calib(tmp_path / "eval.txt")
    kw = dict(dataset=str(text), seqlen=32, max_windows=1, device="cpu", progress=False)
    original_ppl(tiny_llama_dir, log=lambda _m: None, **kw)
    (entry,) = ppl_cache_dir().glob("*.json")
    entry.write_text("{not json")
    lines: list[str] = []
    original_ppl(tiny_llama_dir, log=lines.append, **kw)
    assert len(counted_eval) == 2 and "ignoring unreadable perplexity cache entry" in lines[0]
    assert json.loads(entry.read_text())["result"]["windows"] == 1
