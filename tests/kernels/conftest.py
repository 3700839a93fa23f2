"""Kernel tests: Triton kernels run under TRITON_INTERPRET=1 on CPU tensors where there is no CUDA,
and compiled for real on CUDA tensors where there is (the interpreter is then off unless the caller
set it, so a GPU run tests the real kernels, not the interpreter).

The variable must be set before the Triton modules are imported (triton.jit reads it at decoration
time); setdefault keeps a caller's choice. Other test folders are unaffected: `qserve.kernels`
dispatches by tensor device, never by this variable, so CPU callers get the torch paths whether or
not it is set (the *_never_calls_triton / public_cpu_path tests check it).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator per test: inputs are new each run, and a failure prints its seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch generator seed: {seed}")  # captured, shown by pytest on failure
    return torch.Generator().manual_seed(seed)
