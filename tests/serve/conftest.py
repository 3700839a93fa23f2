"""Fixtures shared by the engine tests that run the C++ CPU paths (defined in tiny_checkpoints.py)."""

from tiny_checkpoints import compiled_kernels, llama  # noqa: F401
