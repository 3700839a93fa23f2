import subprocess
import sys

from click.testing import CliRunner

from qserve.cli import cli


def test_help_lists_commands():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for name in ("pull", "eval"):
        assert name in res.output


def test_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and "qserve, version" in res.output


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qserve.cli",
            "eval",
            "ppl",
            str(tmp_path / "nope"),
            "--dataset",
            str(tmp_path / "x.txt"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "x.txt" in proc.stderr


def test_unknown_model_is_clear(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qserve.cli", "eval", "ppl", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr and "smollm2-135m" in proc.stderr
