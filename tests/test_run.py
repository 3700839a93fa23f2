"""`qserve run` end to end on a tiny random model: stages, reports, a failing gate, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qserve.cli import cli

RECIPE = """\
model: {model}
output: {output}
quantize:
  method: {method}
  group_size: 32
  calib: c4
  n_samples: {n_samples}
  seqlen: 64
validate:
  deep: true
eval:
  datasets: [wikitext2]
  seqlen: 64
  windows: 2
  gates:
    max_ppl_increase: {gate}
serve_smoke:
  enabled: {smoke}
  prompts: ["The capital of France"]
  chat: false
  max_tokens: 4
"""


def write_recipe(tmp_path, model, method="gptq", gate=10.0, smoke="true", n_samples=4, name="r"):
    out = tmp_path / f"{name}-ckpt"
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        RECIPE.format(model=model, output=out, method=method, gate=gate, smoke=smoke, n_samples=n_samples)
    )
    return p, out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_run_end_to_end(tmp_path, tiny_llama_dir, method):
    recipe, out = write_recipe(tmp_path, tiny_llama_dir, method)
    res = CliRunner().invoke(cli, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    rep_dir = out.with_name(out.name + ".report")
    report = json.loads((rep_dir / "run_report.json").read_text())
    assert report["ok"] is True
    assert [s["status"] for s in report["stages"]] == ["ok", "ok", "ok", "ok"]
    # The recipe leaves the grid automatic: the report records it resolved (64-wide model: not Marlin).
    grid = {k: report["quant_config"][k] for k in ("group_size", "sym", "mse", "gptaq")}
    assert grid == {"group_size": 32, "sym": False, "mse": method == "gptq", "gptaq": method == "gptq"}
    ppl = report["stages"][2]["detail"]["ppl"]["wikitext2"]
    assert ppl["original"]["windows"] == ppl["quantized"]["windows"] == 2
    assert report["gates"] and report["gates"][0]["passed"]
    assert report["stages"][3]["detail"]["answers"][0]["answer"].strip()
    md = (rep_dir / "run_report.md").read_text()
    assert "Perplexity" in md and "PASS" in md
    assert (rep_dir / "layer_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses the finished checkpoint instead of failing on the existing output.
    again = CliRunner().invoke(cli, ["run", str(recipe), "--quiet", "--set", "serve_smoke.enabled=false"])
    assert again.exit_code == 0, again.output
    reused = json.loads((rep_dir / "run_report.json").read_text())
    assert reused["stages"][0]["status"] == "reused"
    assert {k: reused["quant_config"][k] for k in grid} == grid


def test_failing_gate_gives_exit_code_and_report(tmp_path, tiny_llama_dir):
    recipe, out = write_recipe(tmp_path, tiny_llama_dir, "rtn", gate=1e-9, smoke="false")
    res = CliRunner().invoke(cli, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 1, res.output
    report = json.loads((out.with_name(out.name + ".report") / "run_report.json").read_text())
    assert report["ok"] is False and report["gates"][0]["passed"] is False
    assert "FAIL" in (out.with_name(out.name + ".report") / "run_report.md").read_text()


def test_rtn_gate_fails_a_checkpoint_that_is_only_rounding(tmp_path, tiny_llama_dir):
    """min_gain_over_rtn: the run makes RTN on the recipe's own grid and scores it on the same windows; a
    "calibrated" checkpoint that is plain rounding (here: the recipe's method is rtn) gains exactly 0 and
    fails, however loose max_ppl_increase is."""
    recipe, out = write_recipe(tmp_path, tiny_llama_dir, "rtn", gate=10.0, smoke="false")
    text = recipe.read_text().replace("max_ppl_increase: 10.0", "max_ppl_increase: 10.0\n    min_gain_over_rtn: 0.02")
    recipe.write_text(text)
    res = CliRunner().invoke(cli, ["run", str(recipe), "--quiet"])
    assert res.exit_code == 1, res.output
    report = json.loads((out.with_name(out.name + ".report") / "run_report.json").read_text())
    row = report["stages"][2]["detail"]["ppl"]["wikitext2"]
    assert row["rtn"]["windows"] == row["quantized"]["windows"] == 2
    assert row["gain_over_rtn"] == 0.0  # the same grid rounds to the same checkpoint
    gates = {g["gate"]: g for g in report["gates"]}
    assert gates["wikitext2.max_ppl_increase"]["passed"] is True
    assert gates["wikitext2.min_gain_over_rtn"]["passed"] is False


def test_rtn_gate_passes_a_gain_above_its_limit():
    from qserve.recipe import EvalStage, Gates, Recipe, SmokeStage, ValidateStage
    from qserve.recipe_run import _gates

    recipe = Recipe(Path("r.yaml"), "m", "o", {}, ValidateStage(), EvalStage(gates=Gates(min_gain_over_rtn=0.05)),
                    SmokeStage())  # fmt: skip
    row = {"quantized": {"ppl": 9.0}, "increase": 0.1, "gain_over_rtn": 0.1}
    assert _gates(recipe, {"ppl": {"wikitext2": row}}) == [
        {"gate": "wikitext2.min_gain_over_rtn", "limit": 0.05, "value": 0.1, "passed": True}
    ]
    row["gain_over_rtn"] = 0.04
    assert _gates(recipe, {"ppl": {"wikitext2": row}})[0]["passed"] is False


def test_bad_recipe_fails_before_model_load(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: /nonexistent\noutput: x\nquantize:\n  method: gptq\n  n_sampels: 3\n")
    res = CliRunner().invoke(cli, ["run", str(p)])
    assert res.exit_code != 0
    assert f"{p}:5" in str(res.exception) or f"{p}:5" in res.output


def _tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_interrupt_then_resume_matches(tmp_path):
    from qserve.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "m6", num_hidden_layers=6)
    recipe_a, out_a = write_recipe(tmp_path, model, "gptq", smoke="false", n_samples=24, name="a")
    recipe_b, out_b = write_recipe(tmp_path, model, "gptq", smoke="false", n_samples=24, name="b")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qserve.cli", "run", str(recipe_a), "--quiet", "--set", "eval.enabled=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out_a.with_name(out_a.name + ".partial")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (partial / "progress.json").is_file():  # at least one block committed
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not out_a.exists(), "an interrupted run must not leave a checkpoint that looks whole"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    base = subprocess.run(
        [sys.executable, "-m", "qserve.cli", "run", str(recipe_b), "--quiet", "--set", "eval.enabled=false"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert base.returncode == 0, base.stdout + base.stderr
    report = json.loads((out_a.with_name(out_a.name + ".report") / "run_report.json").read_text())
    assert report["stages"][0]["detail"]["resumed_from_block"] >= 1
    ta, tb = _tensors(out_a), _tensors(out_b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert (ta[k] == tb[k]).all(), k
