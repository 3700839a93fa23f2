"""GPTQ's automatic grid: symmetric when vLLM's Marlin kernel can run every layer, else zero points with
MSE ranges and gptaq; explicit choices kept; the settings line, CLI flags, recipes and the fingerprint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from quant_helpers import make_model, tiny_run_config, write_calib_text

from qserve.cli import main
from qserve.errors import RecipeError
from qserve.quantize.config import (
    QuantConfig,
    gptq_settings_line,
    marlin_misfits,
    resolve_gptq_grid,
    resolve_group_size,
)
from qserve.quantize.pipeline import quantize_model
from qserve.recipe import load_recipe

torch.set_num_threads(1)

# A Llama-7B-like block: every Linear fits Marlin.
MARLIN_SHAPES = {
    f"model.layers.{i}.{n}": s
    for i in range(2)
    for n, s in (
        ("self_attn.q_proj", (4096, 4096)),
        ("self_attn.k_proj", (4096, 4096)),
        ("self_attn.o_proj", (4096, 4096)),
        ("mlp.up_proj", (11008, 4096)),
        ("mlp.down_proj", (4096, 11008)),
    )
}
# SmolLM2-135M: hidden 576 (not a multiple of 128), intermediate 1536, k/v out 192.
SMOLLM2_SHAPES = {
    f"model.layers.{i}.{n}": s
    for i in range(2)
    for n, s in (
        ("self_attn.q_proj", (576, 576)),
        ("self_attn.k_proj", (192, 576)),
        ("self_attn.o_proj", (576, 576)),
        ("mlp.up_proj", (1536, 576)),
        ("mlp.down_proj", (576, 1536)),
    )
}
# The test models' hidden 64: 64 % 128 != 0.
TINY_SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 128)}


def _resolved(shapes, moe=False, **fields):
    cfg = QuantConfig(model="m", output="o", method="gptq", **fields)
    cfg, _ = resolve_group_size(cfg, shapes)
    return resolve_gptq_grid(cfg, shapes, moe=moe)


def _grid(cfg):
    return cfg.sym, cfg.mse, cfg.gptaq


def test_gptq_grid_is_automatic_until_the_shapes_are_known():
    cfg = QuantConfig(model="m", output="o", method="gptq")
    assert _grid(cfg) == (None, None, None) and cfg.grid_pending
    with pytest.raises(ValueError, match="resolve_gptq_grid"):
        cfg.fingerprint_dict()


def test_marlin_fit_model_gets_symmetric_without_mse_or_gptaq():
    cfg, why = _resolved(MARLIN_SHAPES)
    assert _grid(cfg) == (True, False, False) and cfg.sym_scale == "absmax" and cfg.group_size == 128
    assert why.startswith("auto: every quantized layer fits vLLM's Marlin GPTQ kernel (4 bits, group size 128")


@pytest.mark.parametrize("shapes, needle", [
    (SMOLLM2_SHAPES, "model.layers.*.self_attn.q_proj and 3 more kind(s) of layer: in_features 576 is not a "
                     "multiple of 128"),
    (TINY_SHAPES, "model.layers.*.self_attn.q_proj: in_features 64 is not a multiple of 128"),
    ({"a.0.x": (96, 128)}, "a.*.x: out_features 96 is not a multiple of 64"),
])  # fmt: skip
def test_model_marlin_cannot_run_gets_zero_points_mse_and_gptaq(shapes, needle):
    cfg, why = _resolved(shapes)
    assert _grid(cfg) == (False, True, True) and cfg.sym_scale is None
    assert why.startswith(f"auto: {needle}, so vLLM's Marlin kernel cannot run this model;")
    assert "measured best" in why and "bench/RESULTS.md" in why


def test_smollm2_lists_only_the_layers_that_miss():
    misfits = marlin_misfits(resolve_group_size(QuantConfig(model="m", output="o", method="gptq"),
                                                SMOLLM2_SHAPES)[0], SMOLLM2_SHAPES)  # fmt: skip
    # down_proj (in 1536 = 12 x 128) and every out size (576, 192, 1536 are multiples of 64) fit.
    assert misfits == [
        "model.layers.*.self_attn.q_proj and 3 more kind(s) of layer: in_features 576 is not a multiple of 128"
    ]


@pytest.mark.parametrize("bits", [4, 8])
def test_bits_marlin_takes_keep_symmetric(bits):
    assert _grid(_resolved(MARLIN_SHAPES, bits=bits)[0]) == (True, False, False)


@pytest.mark.parametrize("group_size, sym", [(256, False), (-1, True), (32, True), (128, True)])
def test_group_sizes_outside_marlins_set_get_zero_points(group_size, sym):
    cfg, why = _resolved(MARLIN_SHAPES, group_size=group_size)
    assert cfg.sym is sym and cfg.mse is not sym and cfg.gptaq is not sym
    if not sym:
        assert "group size 256 is not one Marlin takes (-1, 32, 64, 128)" in why


def test_explicit_choices_are_never_overridden():
    # --sym on a model Marlin cannot run: symmetric, and symmetric's own defaults (no MSE, no gptaq).
    cfg, why = _resolved(SMOLLM2_SHAPES, sym=True)
    assert _grid(cfg) == (True, False, False) and why is None
    # --asym on a Marlin-fit model: zero points, with the zero-point defaults.
    cfg, why = _resolved(MARLIN_SHAPES, sym=False)
    assert _grid(cfg) == (False, True, True) and why is None
    # --no-mse / --no-gptaq with the automatic grid.
    assert _grid(_resolved(SMOLLM2_SHAPES, mse=False)[0]) == (False, False, True)
    assert _grid(_resolved(SMOLLM2_SHAPES, gptaq=False)[0]) == (False, True, False)
    # --mse / --gptaq on a model that resolves to symmetric.
    assert _grid(_resolved(MARLIN_SHAPES, mse=True, gptaq=True)[0]) == (True, True, True)
    # A symmetric scale rule is a choice of symmetric weights.
    cfg, _ = _resolved(SMOLLM2_SHAPES, sym_scale="signed")
    assert _grid(cfg) == (True, False, False) and cfg.sym_scale == "signed"


def test_moe_model_keeps_gptaq_off_by_default():
    cfg, why = _resolved(SMOLLM2_SHAPES, moe=True)
    assert _grid(cfg) == (False, True, False) and "not supported for mixture-of-experts" in why
    cfg, why = _resolved(SMOLLM2_SHAPES, moe=True, sym=False)
    assert _grid(cfg) == (False, True, False) and "mixture-of-experts" in why


def test_resolving_again_changes_nothing_and_the_fingerprint_records_the_values():
    cfg, _ = _resolved(SMOLLM2_SHAPES)
    again, why = resolve_gptq_grid(cfg, SMOLLM2_SHAPES)
    assert again == cfg and why is None
    fp = cfg.fingerprint_dict()
    assert (fp["sym"], fp["mse"], fp["gptaq"], fp["group_size"]) == (False, True, True, 64)
    # The saved (resolved) config reads back to the same fingerprint, as a finished-checkpoint check needs.
    assert QuantConfig.from_dict(cfg.to_dict()).fingerprint_dict() == fp


def test_rtn_and_awq_keep_their_defaults():
    rtn = QuantConfig(model="m", output="o", method="rtn")
    awq = QuantConfig(model="m", output="o", method="awq")
    assert _grid(rtn) == (True, False, False) and not rtn.grid_pending
    assert _grid(awq) == (False, False, False) and not awq.grid_pending
    assert QuantConfig(model="m", output="o", method="rtn", format="awq").sym is False
    with pytest.raises(Exception, match="mse is a GPTQ option"):
        QuantConfig(model="m", output="o", method="rtn", mse=True)


def test_settings_line_says_which_and_why():
    cfg, why = _resolved(SMOLLM2_SHAPES)
    line = gptq_settings_line(cfg, why)
    assert line.startswith(
        "gptq: zero points (auto: model.layers.*.self_attn.q_proj and 3 more kind(s) of layer: in_features 576 "
        "is not a multiple of 128, so vLLM's Marlin kernel cannot run this model; zero points + MSE + gptaq "
        "measured best"
    )
    assert ", act-order, MSE ranges, first-token weight 1, damp 0.01, gptaq. Defaults: " in line
    cfg, why = _resolved(MARLIN_SHAPES)
    line = gptq_settings_line(cfg, why)
    assert line.startswith(
        "gptq: symmetric (absmax scale; auto: every quantized layer fits vLLM's Marlin GPTQ kernel"
    )
    assert ", act-order, min/max ranges, first-token weight 1, damp 0.01. Defaults: " in line
    pending = gptq_settings_line(QuantConfig(model="m", output="o", method="gptq"))
    assert pending.startswith("gptq: symmetric or zero points (automatic")
    assert "MSE ranges with zero points" in pending and "gptaq with zero points" in pending


def _cli_config(argv, monkeypatch, capsys):
    """The QuantConfig `qserve quantize ARGV` hands to the pipeline (the run itself is stubbed out)."""
    seen = {}

    class _Report:
        output = "out"

    def fake(cfg, log=print):
        seen["cfg"] = cfg
        return _Report()

    monkeypatch.setattr("qserve.quantize.pipeline.quantize_model", fake)
    try:
        main(["quantize", *argv, "-q"])
    except SystemExit as exc:
        assert exc.code == 0, capsys.readouterr().err
    return seen["cfg"]


@pytest.mark.parametrize("flags, grid", [
    ([], (None, None, None)),
    (["--sym"], (True, False, False)),
    (["--asym"], (False, True, None)),
    (["--no-mse", "--no-gptaq"], (None, False, False)),
    (["--mse", "--gptaq"], (None, True, True)),
])  # fmt: skip
def test_cli_flags(flags, grid, monkeypatch, capsys):
    cfg = _cli_config(["m", "--method", "gptq", "-o", "out", *flags], monkeypatch, capsys)
    assert _grid(cfg) == grid


RECIPE = """\
model: m
output: out
quantize:
  method: gptq
  group_size: 64
{extra}"""


@pytest.mark.parametrize("extra, grid, resolved", [
    ("", (None, None, None), (False, True, True)),
    ("  sym: false\n", (False, True, None), (False, True, True)),
    ("  mse: false\n  gptaq: true\n", (None, False, True), (False, False, True)),
    ("  sym: true\n  mse: true\n  gptaq: false\n", (True, True, False), (True, True, False)),
    ("  mse: null\n", (None, None, None), (False, True, True)),
])  # fmt: skip
def test_recipe_with_and_without_the_keys(tmp_path, extra, grid, resolved):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(extra=extra))
    cfg = load_recipe(path).quant_config()
    assert _grid(cfg) == grid
    assert _grid(resolve_gptq_grid(cfg, TINY_SHAPES)[0]) == resolved  # hidden 64: not Marlin


def test_recipe_key_wrong_type_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(extra="  gptaq: yes please\n"))
    with pytest.raises(RecipeError, match="key 'gptaq': expected bool or null"):
        load_recipe(path).quant_config()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.mark.parametrize("width, sym", [(64, False), (128, True)])
def test_a_run_resolves_logs_and_records_the_grid(tmp_path, calib, width, sym):
    model = make_model(tmp_path, hidden_size=width, intermediate_size=2 * width)
    lines = []
    cfg = tiny_run_config(model, tmp_path / "out", calib, "gptq", group_size=None)
    assert cfg.sym is None
    report = quantize_model(cfg, log=lines.append)
    line = next(m for m in lines if m.startswith("gptq: "))
    assert line.startswith("gptq: symmetric (absmax scale; auto:" if sym else "gptq: zero points (auto:")
    assert _grid(QuantConfig.from_dict(report.config)) == (sym, not sym, not sym)
    qcfg = json.loads((tmp_path / "out" / "quantize_config.json").read_text())
    assert qcfg["sym"] is sym
    # The resumable run's fingerprint was made from the resolved values: resolving the saved config again
    # leaves it as it is.
    saved = QuantConfig.from_dict(report.config)
    assert dataclasses.replace(saved) == saved and not saved.grid_pending
