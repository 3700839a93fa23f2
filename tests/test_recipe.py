import pytest

from qserve.errors import RecipeError
from qserve.recipe import load_recipe, parse_overrides

BASE = """\
model: some-model
output: ${QSERVE_TEST_OUT:-/tmp/qserve-out}/x
quantize:
  method: gptq
  group_size: 64
  n_samples: 8
eval:
  windows: 2
  gates:
    max_ppl_increase: 0.2
serve_smoke:
  prompts: ["hi"]
"""


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_valid_recipe_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QSERVE_TEST_OUT", "/data/runs")
    r = load_recipe(write(tmp_path, BASE))
    assert r.output == "/data/runs/x"
    cfg = r.quant_config()
    assert cfg.method == "gptq" and cfg.group_size == 64 and cfg.n_samples == 8
    assert cfg.sym is None and cfg.mse is None and cfg.gptaq is None  # automatic: resolved with the shapes
    assert r.eval.windows == 2 and r.eval.gates.max_ppl_increase == 0.2
    assert r.serve_smoke.prompts == ("hi",)


@pytest.mark.parametrize(
    "text, line, needle",
    [
        (BASE.replace("  n_samples: 8", "  n_sample: 8"), 6, "n_sample"),  # unknown quantize key
        (BASE.replace("  n_samples: 8", "  n_samples: lots"), 6, "n_samples"),  # wrong type
        (BASE.replace("  windows: 2", "  windowz: 2"), 8, "windowz"),  # unknown section key
        (BASE.replace("max_ppl_increase: 0.2", "max_ppl_increase: -3"), 7, "max_ppl_increase"),  # bad gate
        (BASE.replace("max_ppl_increase: 0.2", "max_ppl_inc: 0.2"), 10, "max_ppl_inc"),  # unknown gate
        (BASE + "extra: 1\n", 13, "extra"),  # unknown top-level key
        (BASE.replace("  method: gptq", "  method: int3"), 4, "method"),  # bad value
    ],
)
def test_schema_errors_name_file_line_and_key(tmp_path, text, line, needle):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert needle in msg
    assert f"{p}:" in msg
    if needle != "max_ppl_increase":
        assert f"{p}:{line}" in msg, msg


def test_missing_model(tmp_path):
    p = write(tmp_path, BASE.replace("model: some-model\n", ""))
    with pytest.raises(RecipeError, match="'model'"):
        load_recipe(p)


def test_unset_env_without_default(tmp_path, monkeypatch):
    monkeypatch.delenv("QSERVE_NOPE", raising=False)
    p = write(tmp_path, BASE.replace("${QSERVE_TEST_OUT:-/tmp/qserve-out}", "${QSERVE_NOPE}"))
    with pytest.raises(RecipeError, match=r"QSERVE_NOPE.*not set"):
        load_recipe(p)


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    r = load_recipe(p, parse_overrides(["quantize.n_samples=4", "eval.windows=1", "quantize.desc_act=true"]))
    assert r.quant_config().n_samples == 4 and r.eval.windows == 1 and r.quant_config().desc_act is True
    with pytest.raises(RecipeError, match=r"--set quantize\.bogus"):
        load_recipe(p, parse_overrides(["quantize.bogus=1"]))
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_invalid_yaml(tmp_path):
    p = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m-awq",
        "smollm2-135m-gptq",
        "llama-3.1-8b-instruct-awq",
        "llama-3.1-8b-instruct-gptq",
        "qwen2.5-7b-instruct-awq",
        "mistral-7b-instruct-gptq",
    ],
)
def test_shipped_recipes_parse(name):
    from pathlib import Path

    load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
