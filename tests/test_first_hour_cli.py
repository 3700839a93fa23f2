"""Messages a new user meets first: a missing recipe lists the ones that exist; a folder that is not a
checkpoint says what to pass instead; `qserve run` logs each stage with its elapsed time, no overall ETA."""

from __future__ import annotations

import json

import pytest

from qserve.cli import main
from qserve.errors import ModelNotFoundError, RecipeError
from qserve.hub import resolve_model
from qserve.recipe import load_recipe


def _run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_recipe_lists_the_recipes_that_exist(tmp_path):
    (tmp_path / "mine.yaml").write_text("model: m\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "mien.yaml")
    msg = str(exc.value)
    assert "cannot read recipe (No such file or directory)" in msg and "Recipes that exist:" in msg
    assert str(tmp_path / "mine.yaml") in msg and "smollm2-135m-awq.yaml" in msg  # its folder, then recipes/


@pytest.mark.parametrize("argv", [["run", "recipes/smollm2-135m-awk.yaml"], ["quantize", "--recipe", "nope.yaml"]])
def test_missing_recipe_on_the_command_line(argv, capsys):
    code, _out, err = _run(argv, capsys)
    assert code != 0 and "Recipes that exist:" in err and "smollm2-135m-gptq.yaml" in err
    assert "Traceback" not in err


def test_folder_of_checkpoints_names_them(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config.json.*Checkpoints inside it: .*/a; pass one of those"):
        resolve_model(tmp_path)


def test_run_report_folder_points_to_its_checkpoint(tmp_path):
    ckpt = tmp_path / "smollm2-135m-awq"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    report = tmp_path / "smollm2-135m-awq.report"
    report.mkdir()
    with pytest.raises(ModelNotFoundError, match=rf"reports of a `qserve run`; the checkpoint is {ckpt}: pass that"):
        resolve_model(report)


def test_empty_folder_says_what_to_pass_and_how_to_make_one(tmp_path):
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model(tmp_path)
    msg = str(exc.value)
    assert "Pass a quantized checkpoint directory" in msg and "Hugging Face model directory" in msg
    assert "qserve quantize MODEL --method awq --output DIR" in msg


def test_serve_on_a_non_checkpoint_folder_is_one_clear_error(tmp_path, capsys):
    code, _out, err = _run(["serve", str(tmp_path)], capsys)
    assert code != 0 and "not a model checkpoint directory" in err and "qserve quantize" in err
    assert "Traceback" not in err


def test_run_logs_each_stage_with_elapsed_time_and_no_eta(tmp_path, tiny_llama_dir, monkeypatch):
    from qserve import recipe_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\noutput: {tmp_path / 'ckpt'}\nquantize: {{method: rtn}}\n"
        "validate: {enabled: false}\neval: {enabled: false}\nserve_smoke: {enabled: false}\n"
    )
    lines: list[str] = []
    report = recipe_run.run_recipe(load_recipe(recipe), progress=True, log=lines.append)
    assert report.ok
    stage_lines = [x for x in lines if x.startswith("[run ")]
    assert stage_lines[0].startswith("[run 1/4] quantize (run elapsed ")
    assert stage_lines[1].startswith("[run 1/4] quantize ok in ")
    assert len(stage_lines) == 2  # disabled stages are not announced
    # The recipe sets no group size: the report records the automatic choice (the tiny model: 64).
    assert report.quant_config["group_size"] == 64
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert saved["group_size"] == 64
    # A second run reuses the checkpoint: the automatic size resolves to the recorded one.
    again = recipe_run.run_recipe(load_recipe(recipe), progress=False, log=lines.append)
    assert again.stages[0].status == "reused"
