"""Devices the kernel tests run on (imported by the test modules; conftest.py sets the interpreter)."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Triton kernels run on CPU tensors through the interpreter, and on CUDA when a GPU is present.
TRITON_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
]
