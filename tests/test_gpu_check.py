"""scripts/gpu_check.sh refuses clearly, before installing anything, where there is no NVIDIA GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA GPU driver is present")
def test_refuses_without_a_gpu(tmp_path):
    env = {**os.environ, "QSERVE_VENV": str(tmp_path / "venv-must-not-be-created")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "gpu_check: no NVIDIA GPU here" in proc.stderr
    assert not (tmp_path / "venv-must-not-be-created").exists()


def test_python_stage_runner_refuses_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    proc = subprocess.run(["python", str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "no CUDA GPU is visible to torch" in proc.stderr
