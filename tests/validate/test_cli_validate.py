"""`qserve validate DIR [--json] [--strict] [--deep]`: output and exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from click.testing import CliRunner

from qserve.cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["validate", *map(str, args)])


def test_valid_checkpoint_exit_0(valid_gptq):
    started = time.perf_counter()
    res = run(valid_gptq)
    elapsed = time.perf_counter() - started
    assert res.exit_code == 0, res.output
    assert res.output.startswith("valid: 0 error(s), 0 warning(s)")
    assert elapsed < 1.0  # headers only: no tensor data, no torch


def test_error_findings_exit_1_one_line_each(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.remove(ckpt / "tokenizer.json")
    res = run(ckpt)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and "TOKENIZER_MISSING" in lines[0] and lines[1].startswith("INVALID: 1 error(s)")


def test_unreadable_input_exit_2(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "file.txt", tmp_path / "empty"):
        res = run(target)
        assert res.exit_code == 2, (target, res.output)
        assert "error:" in res.output and "Traceback" not in res.output


def test_json_output_parses(valid_awq, clone, edit_json):
    res = run(valid_awq, "--json")
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert data["ok"] is True and data["method"] == "awq" and data["findings"] == []
    ckpt = clone(valid_awq)
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(version="gemv"))
    res = run(ckpt, "--json")
    assert res.exit_code == 1
    data = json.loads(res.output)
    assert data["ok"] is False and data["counts"]["error"] == 1
    (finding,) = data["findings"]
    assert finding["code"] == "AWQ_VERSION_UNSUPPORTED" and finding["found"] == "'gemv'"
    assert set(finding) == {"code", "severity", "subject", "expected", "found", "message", "hint"}


def test_json_on_unreadable_input(tmp_path):
    res = run(tmp_path / "missing", "--json")
    assert res.exit_code == 2
    assert json.loads(res.output)["ok"] is False


def test_strict_fails_on_warnings(valid_gptq, clone, edit_tensors):
    name = "model.norm.weight"
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: t.update({name: t[name].float()}))
    assert run(ckpt).exit_code == 0
    res = run(ckpt, "--strict")
    assert res.exit_code == 1 and "strict" in res.output


def test_deep_flag_reads_data(build_ckpt, tmp_path):
    ckpt = build_ckpt(tmp_path / "a", pack_format="gptq_v2", declared_format="gptq")
    assert run(ckpt).exit_code == 0
    res = run(ckpt, "--deep")
    assert res.exit_code == 1 and "ZERO_CONVENTION_MISMATCH" in res.output


def test_installed_entry_point_exit_codes(valid_gptq, tmp_path):
    """Through qserve.cli.main (the console script), not just click's test runner."""
    cmd = [sys.executable, "-m", "qserve.cli", "validate"]
    ok = subprocess.run([*cmd, str(valid_gptq)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
