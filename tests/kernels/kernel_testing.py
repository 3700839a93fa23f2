"""Devices the kernel tests run on (imported by the test modules; conftest.py sets the interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Triton kernels run on CPU tensors through the interpreter (no CUDA here, or asked for), and compiled
# on CUDA when a GPU is present.
TRITON_DEVICES = [
    *(["cpu"] if INTERPRETED else []),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
]
