"""Shared test set-up: markers, CPU thread count, and session-scoped tiny models."""

from __future__ import annotations

import os

import pytest

# Two cores here: keep torch from oversubscribing when several test workers or helpers run.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# `--dtype auto` on the CPU picks bf16 for unquantized models where the CPU has AMX (serve/loader.py
# resolve_dtype); the suite's exact comparisons with transformers' fp32 must not depend on the machine, so
# it pins fp32 here. tests/serve/test_auto_dtype.py tests the rule itself with this unset.
os.environ.setdefault("QSERVE_CPU_AUTO_DTYPE", "float32")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint directory shared by read-only tests."""
    from qserve.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), family="llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M as a HF directory (pulled into the qserve cache on first use)."""
    from qserve.hub import resolve_model

    return resolve_model("smollm2-135m", progress=False)
