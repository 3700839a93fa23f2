"""The block-by-block driver and the checks it makes before loading anything."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from quant_helpers import (
    dense_state_dict,
    logits,
    make_model,
    quantize_tiny,
    read_tensors,
    rel_err,
    write_calib_text,
)

from qserve.errors import CheckpointError, ConfigError, DataSourceError, RecipeError, ResourceError
from qserve.quantize import driver, lazy_model, pipeline
from qserve.quantize.arch import ArchSpec, arch_for_config
from qserve.quantize.capture import run_block
from qserve.quantize.config import QuantConfig, check_layer_shapes, suggest_group_sizes
from qserve.quantize.lazy_model import LazyCheckpoint, build_skeleton, materialize
from qserve.quantize.report import REPORT_FILE

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync latency on a shared machine


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(root, family) for family in ("llama", "qwen2", "mistral")}


@pytest.fixture(scope="module")
def calib_ids(models, calib):
    from transformers import AutoTokenizer

    from qserve.calib_data import get_calib_samples

    return get_calib_samples(str(calib), AutoTokenizer.from_pretrained(models["llama"]), 4, 32, seed=5)


# --- capture and the lazy model ---------------------------------------------------------------------


def test_captured_inputs_and_block_outputs_equal_the_full_models_hidden_states(models, calib_ids):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = models["qwen2"]
    config = AutoConfig.from_pretrained(src)
    spec = arch_for_config(config)
    skeleton = build_skeleton(config, torch.float32)
    inputs = driver._block0_inputs(skeleton, LazyCheckpoint(src), spec, calib_ids, torch.device("cpu"))
    block = skeleton.get_submodule(spec.blocks)[0]
    materialize(block, f"{spec.blocks}.0", LazyCheckpoint(src), torch.device("cpu"))
    out = run_block(block, inputs, samples_per_chunk=3)  # chunks of 3 + 1 exercise the kwargs broadcast
    with torch.no_grad():
        hs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(
            calib_ids, output_hidden_states=True
        )
    torch.testing.assert_close(inputs.hidden, hs.hidden_states[0])
    torch.testing.assert_close(out, hs.hidden_states[1])
    assert skeleton.get_submodule(spec.embed).weight.is_meta, "the embedding is released after capture"


def test_only_one_block_is_materialised_at_a_time(tmp_path, models, calib, monkeypatch):
    src = make_model(tmp_path, "llama", num_hidden_layers=4)
    seen = []
    real = lazy_model.materialize

    def spy(module, prefix, ckpt, device):
        if prefix.startswith("model.layers."):
            blocks = module_parent[0]
            seen.append(sum(not b.self_attn.q_proj.weight.is_meta for b in blocks))
        real(module, prefix, ckpt, device)

    module_parent = []
    real_skeleton = pipeline.build_skeleton

    def skeleton(config, dtype):
        model = real_skeleton(config, dtype)
        module_parent.append(model.model.layers)
        return model

    monkeypatch.setattr(driver, "materialize", spy)
    monkeypatch.setattr(pipeline, "build_skeleton", skeleton)
    quantize_tiny(src, tmp_path / "out", calib, "gptq")
    assert seen == [0, 0, 0, 0]  # every earlier block was freed before the next one loaded


def test_sharded_source_checkpoint_gives_the_same_result(tmp_path, models, calib):
    import shutil

    from safetensors.torch import load_file, save_file

    src, sharded = models["llama"], tmp_path / "sharded"
    shutil.copytree(src, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    # Split inside block 0 so one block's weights come from two files.
    parts = {"model-1.safetensors": names[:5], "model-2.safetensors": names[5:]}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, sharded / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in parts.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    quantize_tiny(src, tmp_path / "a", calib, "gptq")
    quantize_tiny(sharded, tmp_path / "b", calib, "gptq")
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the three methods on three families --------------------------------------------------------


@pytest.mark.parametrize(
    "family, method",
    # Mistral shares Llama's module layout: one method suffices to show its config is handled.
    [(f, m) for f in ("llama", "qwen2") for m in ("rtn", "gptq", "awq")] + [("mistral", "gptq")],
)
def test_quantized_checkpoint_logits_stay_close_to_the_float_model(
    tmp_path, models, calib, calib_ids, family, method
):
    src = models[family]
    extra = {"n_grid": 5} if method == "awq" else {}
    report = quantize_tiny(src, tmp_path / "out", calib, method, **extra)
    ref = logits(src, None, calib_ids)
    err = rel_err(logits(src, dense_state_dict(tmp_path / "out"), calib_ids), ref)
    # w4 g32 on a random model moves logits by ~5%; a broken export (wrong nibble order, missing
    # zero offset, transposed scales) moves them by 50-100%.
    assert 0.005 < err < 0.1, err
    assert [b["block"] for b in report.blocks] == [0, 1]
    spec = arch_for_config(json.loads((src / "config.json").read_text()))
    for block in report.blocks:
        if method == "gptq":
            assert [e["layer"] for e in block["layers"]] == list(spec.linears)
            assert all(e["loss"] >= 0 and e["seconds"] >= 0 for e in block["layers"])
        if method == "awq":
            assert {"best_ratio", "loss", "rtn_loss"} <= set(block["layers"][0])
            assert block["search"]["clips"], "clip search results are kept"
        if method != "rtn":
            assert 0 < block["out_rel_err"] < 0.1
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["config"]["method"] == method and saved["peak_rss_bytes"] > 0


def test_gptq_and_awq_beat_rtn_on_the_calibration_distribution(tmp_path, models, calib, calib_ids):
    src = models["llama"]
    ref = logits(src, None, calib_ids)
    errs = {}
    for method, extra in (("rtn", {}), ("gptq", {}), ("awq", {"n_grid": 10})):
        quantize_tiny(src, tmp_path / method, calib, method, group_size=64, **extra)
        errs[method] = rel_err(logits(src, dense_state_dict(tmp_path / method), calib_ids), ref)
    print(errs)
    assert errs["gptq"] < 0.95 * errs["rtn"]
    assert errs["awq"] < 0.95 * errs["rtn"]


def test_gptq_with_awq_scales_folds_them_and_still_serves_the_float_model(tmp_path, models, calib, calib_ids):
    """--awq-scales: AWQ's scales are searched per block and folded into the norms (and v/up rows)
    before GPTQ; the checkpoint keeps the GPTQ layout, carries the folded norms, and its dequantized
    model stays as close to the float model as GPTQ's and below RTN's error."""
    src = models["llama"]
    ref = logits(src, None, calib_ids)
    errs = {}
    for name, method, extra in (
        ("rtn", "rtn", {}),
        ("scaled", "gptq", {"awq_scales": True, "n_grid": 10}),
    ):
        report = quantize_tiny(src, tmp_path / name, calib, method, group_size=64, **extra)
        errs[name] = rel_err(logits(src, dense_state_dict(tmp_path / name), calib_ids), ref)
    assert errs["scaled"] < 0.95 * errs["rtn"], errs
    source, out = read_tensors(src), read_tensors(tmp_path / "scaled")
    for block in report.blocks:
        assert {"prev_op", "linears", "best_ratio"} <= set(block["search"]["log"][0])
        assert block["search"]["scales"], "the scales found are recorded"
        assert block["search"]["clips"] == [], "GPTQ chooses the ranges: no AWQ clipping"
        norm = f"model.layers.{block['block']}.input_layernorm.weight"
        assert not torch.equal(out[norm], source[norm]), "the attention scales are folded into the norm"
        assert block["layers"][0]["layer"] == "self_attn.q_proj" and "loss" in block["layers"][0]
    assert "qweight" in " ".join(out) and "g_idx" in " ".join(out)


def test_shared_hessians_equal_separately_accumulated_ones(tmp_path, models, calib, monkeypatch):
    """q/k/v (and gate/up) read one input: accumulating H once must change nothing."""
    quantize_tiny(models["llama"], tmp_path / "shared", calib, "gptq", sym=True)
    monkeypatch.setattr(ArchSpec, "input_owners", property(lambda self: {}))
    quantize_tiny(models["llama"], tmp_path / "separate", calib, "gptq", sym=True)
    a, b = read_tensors(tmp_path / "shared"), read_tensors(tmp_path / "separate")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stubbed_collection_passes_change_nothing(tmp_path, models, calib, monkeypatch):
    """GPTQ's collection passes stub out the Linears they do not need: the checkpoint must be
    bit-identical to one calibrated with plain full-block forwards and hooks."""
    collected = []
    real = driver._Collector.forward
    monkeypatch.setattr(driver._Collector, "forward", lambda self, x: collected.append(1) or real(self, x))
    quantize_tiny(models["qwen2"], tmp_path / "stubbed", calib, "gptq")
    assert collected, "the collection passes should have run through the stubs"
    quantize_tiny(models["qwen2"], tmp_path / "one-pass", calib, "gptq", true_sequential=False)
    monkeypatch.setattr(driver, "STUB_COLLECTION_PASSES", False)
    quantize_tiny(models["qwen2"], tmp_path / "full", calib, "gptq")
    quantize_tiny(models["qwen2"], tmp_path / "one-pass-hooks", calib, "gptq", true_sequential=False)
    for x, y in (("stubbed", "full"), ("one-pass", "one-pass-hooks")):
        a, b = read_tensors(tmp_path / x), read_tensors(tmp_path / y)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (x, y)
    # and one-pass differs from true-sequential, or the comparison above would not test the mode
    a, b = read_tensors(tmp_path / "stubbed"), read_tensors(tmp_path / "one-pass")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stub", [True, False])
def test_skip_first_leaves_each_windows_leading_tokens_out_of_the_hessians(
    tmp_path, models, calib, monkeypatch, stub
):
    """--skip-first k: every solver sees seqlen - k rows per window, and they are the window's last ones
    (compared on block 0's q/k/v, whose inputs do not depend on the quantization)."""
    from qserve.quantize.gptq import GPTQ

    monkeypatch.setattr(driver, "STUB_COLLECTION_PASSES", stub)
    seen: dict[int, list[tuple[str, torch.Tensor]]] = {}
    real = GPTQ.add_batch

    def record(self, inp):
        seen[skip].append((self.name, inp.clone()))
        return real(self, inp)

    monkeypatch.setattr(GPTQ, "add_batch", record)
    for skip in (0, 3):
        seen[skip] = []
        quantize_tiny(  # weight 1: the rows reach the solvers unscaled, so they compare exactly
            models["llama"], tmp_path / f"skip{skip}", calib, "gptq", skip_first=skip, first_token_weight=1.0,
            sym=True,  # no gptaq: `record` takes the quantized inputs only
        )
    assert {x.shape[-2] for _, x in seen[3]} == {32 - 3}
    assert {x.shape[-2] for _, x in seen[0]} == {32}
    first = [(n, x) for n, x in seen[0] if n.startswith("model.layers.0.self_attn.q_proj")]
    first_skip = [(n, x) for n, x in seen[3] if n.startswith("model.layers.0.self_attn.q_proj")]
    assert first and len(first) == len(first_skip)
    for (_, full), (_, cut) in zip(first, first_skip, strict=True):
        torch.testing.assert_close(cut, full[:, 3:], rtol=0, atol=0)
    a, b = read_tensors(tmp_path / "skip0"), read_tensors(tmp_path / "skip3")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("qweight"))


def test_skip_first_is_checked_and_fingerprinted(tmp_path):
    base = dict(model="m", output="o", method="gptq", seqlen=16, sym=True)
    assert QuantConfig(**base, skip_first=1).fingerprint_dict() != QuantConfig(**base).fingerprint_dict()
    with pytest.raises(ConfigError, match="skip_first=16"):
        QuantConfig(**base, skip_first=16)
    with pytest.raises(ConfigError, match="GPTQ option"):
        QuantConfig(**{**base, "method": "awq"}, skip_first=1)
    with pytest.raises(RecipeError, match="skip_first"):
        QuantConfig.from_dict({**base, "skip_first": "1"})


def test_first_token_weight_scales_each_windows_first_rows_in_the_hessians(tmp_path, models, calib, monkeypatch):
    """first_token_weight w: the solvers see the same rows as with w = 1 except each window's first one,
    scaled by sqrt(w) (so its x x^T counts w times); the activations the block computes on stay exact
    (block 0's q_proj inputs do not depend on the quantization; later blocks' do, through the weights)."""
    from qserve.quantize.gptq import GPTQ

    seen: dict[float, list[tuple[str, torch.Tensor]]] = {}
    real = GPTQ.add_batch

    def record(self, inp, float_inp=None):
        seen[w].append((self.name, inp.clone()))
        return real(self, inp, float_inp)

    monkeypatch.setattr(GPTQ, "add_batch", record)
    for w in (1.0, 0.25):
        seen[w] = []
        quantize_tiny(models["llama"], tmp_path / f"w{w}", calib, "gptq", first_token_weight=w)
    full = [x for n, x in seen[1.0] if n.startswith("model.layers.0.self_attn.q_proj")]
    weighted = [x for n, x in seen[0.25] if n.startswith("model.layers.0.self_attn.q_proj")]
    assert full and len(full) == len(weighted)
    for a, b in zip(full, weighted, strict=True):
        torch.testing.assert_close(b[:, 1:], a[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(b[:, 0], a[:, 0] * 0.5)
    a, b = read_tensors(tmp_path / "w1.0"), read_tensors(tmp_path / "w0.25")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("qweight"))
    # The default weight is 1: bit-identical to the explicit w = 1 run.
    quantize_tiny(models["llama"], tmp_path / "default", calib, "gptq")
    c = read_tensors(tmp_path / "default")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_first_token_weight_is_checked_and_fingerprinted():
    base = dict(model="m", output="o", method="gptq", seqlen=16, sym=True)
    assert (
        QuantConfig(**base, first_token_weight=0.5).fingerprint_dict()
        != QuantConfig(**base, first_token_weight=1.0).fingerprint_dict()
    )
    assert QuantConfig(**base).resolved_first_token_weight() == 1.0
    assert QuantConfig(**base, first_token_weight=0.25).resolved_first_token_weight() == 0.25
    assert QuantConfig(**{**base, "method": "awq"}).resolved_first_token_weight() == 1.0
    with pytest.raises(ConfigError, match=r"first_token_weight=1\.5"):
        QuantConfig(**base, first_token_weight=1.5)
    with pytest.raises(ConfigError, match="GPTQ option"):
        QuantConfig(**{**base, "method": "awq"}, first_token_weight=0.5)
    with pytest.raises(RecipeError, match="first_token_weight"):
        QuantConfig.from_dict({**base, "first_token_weight": "0.5"})


def test_written_back_weights_are_what_the_checkpoint_serves(tmp_path, models, calib, monkeypatch):
    """Later blocks must calibrate against the weights a reader of the file reconstructs."""
    served = {}
    real = driver._write_back

    def spy(linear, qw):
        real(linear, qw)
        served[id(linear)] = linear.weight.detach().clone()

    monkeypatch.setattr(driver, "_write_back", spy)
    quantize_tiny(models["llama"], tmp_path / "out", calib, "gptq", desc_act=True)
    dense = dense_state_dict(tmp_path / "out")
    written = list(served.values())
    expected = [
        dense[f"model.layers.{i}.{n}.weight"]
        for i in range(2)
        for n in arch_for_config({"model_type": "llama"}).linears
    ]
    assert len(written) == len(expected)
    for w, e in zip(written, expected, strict=True):
        torch.testing.assert_close(w, e, rtol=0, atol=1e-6)


# --- refusals before any work --------------------------------------------------------------------


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail loudly if anything reads tensor data or calibration text."""

    def boom(*_a, **_k):
        raise AssertionError("weights were read before the config was checked")

    monkeypatch.setattr(LazyCheckpoint, "load", boom)
    monkeypatch.setattr("qserve.calib_data.get_calib_samples", boom)


def test_group_size_that_does_not_divide_is_refused_before_loading(tmp_path, models, calib, no_weights_read):
    with pytest.raises(ConfigError) as exc:
        quantize_tiny(models["llama"], tmp_path / "out", calib, "gptq", group_size=48)
    msg = str(exc.value)
    assert "group_size=48" in msg and "model.layers.*.self_attn.q_proj (in_features 64, 2x)" in msg
    assert "mlp.down_proj" in msg and "--group-size 64 or 32 or -1" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_suggested_group_sizes_for_smollm2_shapes():
    assert suggest_group_sizes([576, 1536]) == [64, 32, -1]
    cfg = QuantConfig(model="m", output="o", method="awq", group_size=128)
    with pytest.raises(ConfigError, match=r"in_features 576.*--group-size 64 or 32 or -1"):
        check_layer_shapes(
            cfg, {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536)}
        )


def test_unsupported_architecture_lists_supported_ones(tmp_path, calib, no_weights_read):
    src = make_model(tmp_path, "llama")
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match="unsupported architecture GPT2LMHeadModel; qserve supports LlamaForCausalLM"
    ):
        quantize_tiny(src, tmp_path / "out", calib, "rtn")


def test_existing_output_is_refused(tmp_path, models, calib, no_weights_read):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="already exists"):
        quantize_tiny(models["llama"], tmp_path / "out", calib, "gptq")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_missing_calibration_source_is_refused_before_loading(tmp_path, models, no_weights_read):
    with pytest.raises(DataSourceError, match=r"nope\.txt"):
        quantize_tiny(models["llama"], tmp_path / "out", tmp_path / "nope.txt", "gptq")


def test_already_quantized_model_is_refused(tmp_path, models, calib):
    quantize_tiny(models["llama"], tmp_path / "q", calib, "rtn")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_tiny(tmp_path / "q", tmp_path / "out", calib, "rtn")


def test_run_that_does_not_fit_in_memory_is_refused(tmp_path, models, calib, monkeypatch, no_weights_read):
    monkeypatch.setattr("qserve.quantize.memory.available_bytes", lambda device: 100 * 1024**2)
    with pytest.raises(
        ResourceError, match=r"needs ~.* GiB .* of 0.10 GiB available on cpu; this run will not fit"
    ):  # symmetric: no gptaq, whose estimate adds a note on where the float inputs go
        quantize_tiny(models["llama"], tmp_path / "out", calib, "gptq", sym=True)


def test_memory_estimate_grows_with_calibration_tokens(models):
    from transformers import AutoConfig

    from qserve.quantize.memory import estimate

    src = models["llama"]
    config = AutoConfig.from_pretrained(src)
    spec, ckpt = arch_for_config(config), LazyCheckpoint(src)
    small = QuantConfig(model="m", output="o", method="gptq", n_samples=8, seqlen=64)
    large = QuantConfig(model="m", output="o", method="gptq", n_samples=64, seqlen=64)
    a = estimate(ckpt, spec, config, small, torch.float32, "cpu")
    b = estimate(ckpt, spec, config, large, torch.float32, "cpu")
    assert b.parts["activations"] == 8 * a.parts["activations"] == 8 * 2 * 8 * 64 * 64 * 4
    assert a.parts["hessians"] == 2 * 4 * (6 * 64 * 64 + 128 * 128)  # H + inverse per linear, fp32


def test_gptaq_holds_the_float_inputs_only_when_they_fit(models, monkeypatch):
    """--gptaq holds a block's float Linear inputs (q, o, gate, down: one per distinct input) when the
    memory allows, and says it falls back to a float pass per group when not."""
    from transformers import AutoConfig

    from qserve.quantize import memory

    src = models["llama"]
    config = AutoConfig.from_pretrained(src)
    spec, ckpt = arch_for_config(config), LazyCheckpoint(src)
    cfg = QuantConfig(model="m", output="o", method="gptq", gptaq=True, n_samples=8, seqlen=64)
    roomy = memory.estimate(ckpt, spec, config, cfg, torch.float32, "cpu")
    assert roomy.hold_float_inputs
    assert roomy.parts["float_inputs"] == 8 * 64 * (64 + 64 + 64 + 128) * 4
    rest = roomy.total - roomy.parts["float_inputs"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(rest / memory.HEADROOM) + 1)
    tight = memory.estimate(ckpt, spec, config, cfg, torch.float32, "cpu")
    assert tight.fits and not tight.hold_float_inputs and "float_inputs" not in tight.parts
    assert "one float pass per group" in tight.describe()
    plain = memory.estimate(ckpt, spec, config, dataclasses.replace(cfg, gptaq=False), torch.float32, "cpu")
    assert not plain.hold_float_inputs and "float_inputs" not in plain.parts


def test_checkpoint_missing_a_block_tensor_names_it(tmp_path, calib):
    from safetensors.torch import load_file, save_file

    src = make_model(tmp_path, "llama")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        quantize_tiny(src, tmp_path / "out", calib, "rtn")


# --- evaluation wiring ---------------------------------------------------------------------------


def test_eval_compares_original_and_quantized_on_the_same_windows(tmp_path, models, calib, monkeypatch):
    from qserve.evaluate import PplResult

    calls = []

    def fake_eval(path, **kw):
        calls.append((str(path), kw))
        ppl = 10.0 if str(path) == str(models["llama"]) else 12.5
        return PplResult(
            ppl=ppl,
            nll=2.3,
            windows=kw["max_windows"],
            tokens=100,
            seqlen=kw["seqlen"],
            seconds=0.1,
            dataset=kw["dataset"],
        )

    monkeypatch.setattr("qserve.evaluate.evaluate_ppl", fake_eval)
    report = quantize_tiny(
        models["llama"], tmp_path / "out", calib, "rtn", eval=True, eval_windows=3, eval_seqlen=64
    )
    assert [c[0] for c in calls] == [str(models["llama"]), str(tmp_path / "out")]
    assert calls[0][1] == calls[1][1] and calls[0][1]["max_windows"] == 3 and calls[0][1]["seqlen"] == 64
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["ppl"]["original"]["ppl"] == 10.0 and saved["ppl"]["quantized"]["ppl"] == 12.5
    assert report.ppl_increase() == pytest.approx(0.25)
    assert "10.00 -> 12.50 (+25.0%) on 3 wikitext2 windows of 64" in report.format_table()


# --- QuantConfig ---------------------------------------------------------------------------------


def test_config_defaults_follow_each_ecosystem():
    # GPTQ's sym (and mse/gptaq with it) waits for the layer shapes: test_gptq_auto_grid.py.
    assert QuantConfig(model="m", output="o", method="gptq").sym is None
    assert QuantConfig(model="m", output="o", method="awq").sym is False
    assert QuantConfig(model="m", output="o", method="awq").format == "awq"
    assert QuantConfig(model="m", output="o", method="rtn").format == "gptq"
    assert QuantConfig(model="m", output="o", method="gptq").calib_mode == "windows"
    assert QuantConfig(model="m", output="o", method="awq").calib_mode == "concat"
    # GPTQ's measured defaults: act-order; on the symmetric (Marlin) grid neither MSE nor gptaq, with zero
    # points MSE (and gptaq, resolved with the shapes, which say whether the model is MoE).
    gptq = QuantConfig(model="m", output="o", method="gptq", sym=True)
    assert (gptq.desc_act, gptq.static_groups, gptq.mse, gptq.gptaq) == (True, False, False, False)
    gptq = QuantConfig(model="m", output="o", method="gptq", sym=False)
    assert (gptq.desc_act, gptq.static_groups, gptq.mse, gptq.gptaq) == (True, False, True, None)
    assert gptq.resolved_first_token_weight() == 1.0
    awq = QuantConfig(model="m", output="o", method="awq")
    assert (awq.desc_act, awq.mse) == (False, False)
    assert QuantConfig(model="m", output="o", method="gptq", desc_act=False, mse=False).desc_act is False


def test_gptq_run_says_which_settings_are_in_force_and_why():
    from qserve.quantize.config import gptq_settings_line

    line = gptq_settings_line(QuantConfig(model="m", output="o", method="gptq", sym=True))
    assert line.startswith(
        "gptq: symmetric (absmax scale), act-order, min/max ranges, first-token weight 1, damp 0.01."
    )
    assert "Marlin" in line and "bench/RESULTS.md" in line
    line = gptq_settings_line(QuantConfig(model="m", output="o", method="gptq", sym_scale="signed"))
    assert line.startswith("gptq: symmetric (signed scale), act-order,")
    line = gptq_settings_line(QuantConfig(model="m", output="o", method="gptq", sym=False, desc_act=False,
                                          mse=False, first_token_weight=1.0, gptaq=True))  # fmt: skip
    assert line.startswith("gptq: zero points (asymmetric), no act-order, min/max ranges, first-token weight 1,")
    assert "gptaq" in line


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"method": "awq", "bits": 8}, "AWQ GEMM is 4-bit only"),
        ({"method": "gptq", "bits": 3}, "bits=3"),
        ({"method": "gptq", "format": "awq"}, "only --method rtn can choose --format"),
        ({"method": "awq", "desc_act": True}, "GPTQ options"),
        ({"method": "gptq", "group_size": 0}, "group_size=0"),
        ({"method": "int3"}, "method='int3'"),
        ({"method": "gptq", "damp": 1.5}, "damp=1.5"),
        ({"method": "awq", "awq_scales": True}, "awq_scales is a GPTQ option"),
        ({"method": "gptq", "dtype": "float64"}, "dtype='float64'"),
    ],
)
def test_config_rejects_bad_combinations(fields, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        QuantConfig(model="m", output="o", **fields)


def test_config_from_dict_round_trips_and_names_bad_keys():
    cfg = QuantConfig(model="m", output="o", method="awq", group_size=64, n_grid=10, eval_windows=None)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RecipeError, match=r"unknown key.*'n_sample'"):
        QuantConfig.from_dict({"model": "m", "output": "o", "method": "gptq", "n_sample": 8})
    with pytest.raises(RecipeError, match="key 'bits': expected int, found bool"):
        QuantConfig.from_dict({"model": "m", "output": "o", "method": "gptq", "bits": True})
    with pytest.raises(RecipeError, match="key 'n_samples': expected int, found str"):
        QuantConfig.from_dict({"model": "m", "output": "o", "method": "gptq", "n_samples": "lots"})
    with pytest.raises(RecipeError, match=r"missing required key.*'method'"):
        QuantConfig.from_dict({"model": "m", "output": "o"})


def test_peak_rss_is_this_processs_own_not_its_parents():
    """A benchmark that loaded a model and then starts `qserve quantize` must not see its own peak
    reported as the child's (getrusage's ru_maxrss is kept across exec on Linux)."""
    import subprocess
    import sys

    ballast = bytearray(1536 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page so it is resident
    code = "from qserve.quantize.report import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    del ballast
    assert 0 < child < 1024 * 2**20, child


@pytest.mark.parametrize("held", [True, False])
def test_gptaq_feeds_each_solver_the_float_models_inputs(tmp_path, models, calib, monkeypatch, held):
    """--gptaq: next to the quantized model's inputs, every solver gets the same tokens' inputs as the
    float model computes them. Checked on block 1's q/k/v (input_layernorm of the float block 0's
    output) and on block 1's o_proj (the float attention), against a plain float forward; with the
    float inputs held from one pass per block and with a float pass per group."""
    from transformers import AutoModelForCausalLM

    from qserve.quantize.gptq import GPTQ

    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    real_add = GPTQ.add_batch

    def record(self, inp, float_inp=None):
        assert float_inp is not None, f"{self.name} got no float inputs"
        seen.setdefault(self.name, []).append((inp.clone(), float_inp.clone()))
        return real_add(self, inp, float_inp)

    block0 = []
    real_block0 = driver._block0_inputs
    monkeypatch.setattr(driver, "_block0_inputs", lambda *a: block0.append(real_block0(*a)) or block0[0])
    monkeypatch.setattr(GPTQ, "add_batch", record)
    if not held:
        _per_group_float_passes(monkeypatch)
    src = models["llama"]
    # first_token_weight 1: the solvers get the rows unscaled, comparable with a plain forward
    quantize_tiny(src, tmp_path / "gptaq", calib, "gptq", gptaq=True, first_token_weight=1.0)

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = model.model.layers
    float_out0 = run_block(layers[0], block0[0], samples_per_chunk=4)
    captured = {}
    hook = layers[1].self_attn.o_proj.register_forward_hook(lambda _m, a, _o: captured.setdefault("o", a[0]))
    with torch.no_grad():
        want_qkv = layers[1].input_layernorm(float_out0)
        run_block(layers[1], driver.BlockInputs(float_out0, block0[0].kwargs), samples_per_chunk=4)
    hook.remove()
    for name, want in (("q_proj", want_qkv), ("o_proj", captured["o"])):
        pairs = seen[f"model.layers.1.self_attn.{name}"]
        got_q = torch.cat([q for q, _ in pairs])
        got_f = torch.cat([f for _, f in pairs])
        torch.testing.assert_close(got_f, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got_q, got_f, atol=1e-4), "the quantized stream should differ by now"
    # Block 0's first group reads the embeddings in both streams.
    q0, f0 = seen["model.layers.0.self_attn.q_proj"][0]
    torch.testing.assert_close(q0, f0, rtol=0, atol=0)


def _per_group_float_passes(monkeypatch) -> None:
    """Make --gptaq runs take the low-memory path: a float pass per group instead of one per block."""
    real = pipeline.quantize_blocks
    monkeypatch.setattr(pipeline, "quantize_blocks", lambda *a: real(*a[:-1], False))


def test_gptaq_one_float_pass_equals_a_float_pass_per_group(tmp_path, models, calib, monkeypatch):
    """--gptaq runs the float block once per block, holding every group's float Linear inputs, when
    memory allows; otherwise once per group, stubbed like the quantized passes. Same checkpoint."""
    calls = []
    real_pass = driver._float_pass
    monkeypatch.setattr(driver, "_float_pass", lambda *a: calls.append(a[5]) or real_pass(*a))
    quantize_tiny(models["llama"], tmp_path / "held", calib, "gptq", gptaq=True)
    held_calls, calls[:] = list(calls), []
    _per_group_float_passes(monkeypatch)
    quantize_tiny(models["llama"], tmp_path / "per-group", calib, "gptq", gptaq=True)
    # 2 blocks x 4 groups, the last group's passes unstubbed; held: whole passes only, 4x fewer
    assert len(calls) == 4 * len(held_calls) and all(u == [] for u in held_calls)
    assert sum(u == [] for u in calls) == len(held_calls)
    a, b = read_tensors(tmp_path / "held"), read_tensors(tmp_path / "per-group")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    quantize_tiny(models["llama"], tmp_path / "plain", calib, "gptq", gptaq=False)  # zero points' default is on
    plain = read_tensors(tmp_path / "plain")
    assert any(not torch.equal(a[k], plain[k]) for k in a if k.endswith("qweight"))


@pytest.mark.parametrize(
    ("method", "model_dtype", "fast", "dtype", "expected"),
    [
        ("gptq", torch.bfloat16, True, "auto", torch.bfloat16),  # AMX: the forwards in the model's bf16
        ("gptq", torch.bfloat16, False, "auto", torch.float32),  # no fast bf16 GEMMs on this CPU
        ("gptq", torch.float32, True, "auto", torch.float32),
        ("gptq", torch.float16, True, "auto", torch.float32),  # fp16 is not rounded to bf16
        ("awq", torch.bfloat16, True, "auto", torch.float32),  # AWQ's search not re-measured in bf16
        ("gptq", torch.bfloat16, True, "float32", torch.float32),  # an explicit --dtype wins
    ],
)
def test_cpu_compute_dtype(monkeypatch, method, model_dtype, fast, dtype, expected):
    monkeypatch.setattr(pipeline, "cpu_bf16_fast", lambda: fast)
    cfg = QuantConfig(model="m", output="o", method=method, dtype=dtype)
    assert pipeline.compute_dtype_for(cfg, "cpu", model_dtype) == expected
    assert pipeline.compute_dtype_for(cfg, "cuda", torch.bfloat16) == (
        torch.float32 if dtype == "float32" else torch.bfloat16
    )
