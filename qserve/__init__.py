"""qserve: take a causal LM from full precision to a fast 4-bit deployment.

`from qserve import LLM, SamplingParams` mirrors vLLM's offline API; the names are resolved lazily so
that `import qserve` (and the CLI's start-up) does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from qserve.serve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from qserve.serve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'qserve' has no attribute {name!r}")
