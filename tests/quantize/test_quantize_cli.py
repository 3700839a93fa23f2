"""`qserve quantize` on the command line: options, messages, exit codes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from quant_helpers import make_model, read_tensors, write_calib_text

from qserve.cli import cli, main
from qserve.quantize.config import QuantConfig

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync latency on a shared machine


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models"))


def _run(argv, capsys):
    """Run the real entry point (which turns QserveErrors into `error: ...`); returns (code, out, err)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_an_option_for_every_config_field():
    result = CliRunner().invoke(cli, ["quantize", "--help"])
    assert result.exit_code == 0
    flags = {
        "sym": "--sym / --asym",
        "eval": "--eval / --no-eval",
        "desc_act": "--desc-act / --no-desc-act",
        "true_sequential": "--true-sequential / --no-true-sequential",
        "duo_scaling": "--duo-scaling / --no-duo-scaling",
        "clip": "--clip / --no-clip",
        "model": "[MODEL]",
    }
    for f in dataclasses.fields(QuantConfig):
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in result.output, flag
    assert "--recipe" in result.output and "Default: automatic" in result.output  # group size default shown


def test_misspelt_flag_gets_a_suggestion(capsys):
    code, _out, err = _run(["quantize", "m", "-o", "x", "--method", "gptq", "--group-sise", "64"], capsys)
    assert code == 2 and "No such option '--group-sise'" in err and "'--group-size'" in err


def test_bad_choice_and_missing_method_are_usage_errors(capsys):
    code, _out, err = _run(["quantize", "m", "-o", "x", "--method", "int3"], capsys)
    assert code == 2 and "'int3' is not one of 'gptq', 'awq', 'rtn'" in err
    code, _out, err = _run(["quantize", "m", "-o", "x"], capsys)
    assert code == 2 and "missing --method" in err


def test_config_error_is_one_line_without_traceback(tmp_path, llama, calib, capsys):
    args = [
        "quantize",
        str(llama),
        "-o",
        str(tmp_path / "o"),
        "--method",
        "awq",
        "--bits",
        "8",
        "--calib",
        str(calib),
    ]
    code, _out, err = _run(args, capsys)
    assert code == 1
    assert err.startswith("error: bits=8 is not available in the awq layout") and "Traceback" not in err


def test_end_to_end_rtn_prints_the_table(tmp_path, llama, calib, capsys):
    out = tmp_path / "q"
    args = [
        "quantize",
        str(llama),
        "-o",
        str(out),
        "--method",
        "rtn",
        "--format",
        "awq",
        "--group-size",
        "32",
    ]
    code, stdout, err = _run([*args, "--no-eval", "--calib", str(calib)], capsys)
    assert code == 0, err
    assert "rtn w4 g32 asym (awq layout), 2 blocks on cpu in float32" in stdout
    assert "memory: needs ~" in err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    # Same command again: the output now exists.
    code, _stdout, err = _run([*args, "--no-eval", "--calib", str(calib)], capsys)
    assert code == 1 and "already exists" in err


def test_quiet_prints_only_the_output_path(tmp_path, llama, calib, capsys):
    out = tmp_path / "q"
    args = [
        "quantize",
        str(llama),
        "-o",
        str(out),
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--calib",
        str(calib),
    ]
    code, stdout, err = _run([*args, "--n-samples", "4", "--seqlen", "32", "--no-eval", "--quiet"], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out) and "blocks" not in err


def test_recipe_values_apply_and_command_line_overrides_them(tmp_path, llama, calib, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {llama}\noutput: {tmp_path / 'from-recipe'}\n"
        f"quantize:\n  method: gptq\n  group_size: 64\n  n_samples: 4\n  seqlen: 32\n  calib: {calib}\n  desc_act: true\n"
    )
    code, _stdout, err = _run(
        ["quantize", "--recipe", str(recipe), "--group-size", "32", "--no-eval", "-q"], capsys
    )
    assert code == 0, err
    out = tmp_path / "from-recipe"
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["group_size"] == 32 and qcfg["desc_act"] is True  # CLI wins; recipe fills the rest
    assert read_tensors(out)["model.layers.0.self_attn.q_proj.scales"].shape == (64 // 32, 64)
