"""`dtype auto` on the CPU: bf16 where the CPU has AMX (unquantized and 4-bit models), fp32 otherwise."""

from __future__ import annotations

import pytest
import torch

from qserve.errors import ConfigError
from qserve.serve import loader

CPU = torch.device("cpu")
DENSE = {"torch_dtype": "bfloat16"}
QUANTIZED = {"torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4}}


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("QSERVE_CPU_AUTO_DTYPE", raising=False)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_on_cpu_follows_amx(monkeypatch, amx):
    monkeypatch.setattr(loader, "cpu_has_amx_bf16", lambda: amx)
    assert loader.resolve_dtype("auto", CPU, DENSE) == (torch.bfloat16 if amx else torch.float32)
    # a 4-bit checkpoint alike: with AMX its batched steps multiply bf16 rows on AMX tiles
    assert loader.resolve_dtype("auto", CPU, QUANTIZED) == (torch.bfloat16 if amx else torch.float32)


def test_explicit_dtype_and_override_win(monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_amx_bf16", lambda: True)
    assert loader.resolve_dtype("float32", CPU, DENSE) == torch.float32
    monkeypatch.setenv("QSERVE_CPU_AUTO_DTYPE", "float32")
    assert loader.resolve_dtype("auto", CPU, DENSE) == torch.float32
    monkeypatch.setattr(loader, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setenv("QSERVE_CPU_AUTO_DTYPE", "bfloat16")
    assert loader.resolve_dtype("auto", CPU, DENSE) == torch.bfloat16
    monkeypatch.setenv("QSERVE_CPU_AUTO_DTYPE", "fp8")
    with pytest.raises(ConfigError, match="QSERVE_CPU_AUTO_DTYPE='fp8' is not one of float32, bfloat16"):
        loader.resolve_dtype("auto", CPU, DENSE)


def test_cuda_auto_is_unchanged(monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_amx_bf16", lambda: False)
    cuda = torch.device("cuda")
    assert loader.resolve_dtype("auto", cuda, {"torch_dtype": "float32"}) == torch.bfloat16
    assert loader.resolve_dtype("auto", cuda, {"torch_dtype": "float16"}) == torch.float16


def test_amx_probe_answers_a_bool():
    assert isinstance(loader.cpu_has_amx_bf16(), bool)


def test_engine_reports_the_resolved_dtype(tiny_llama_dir, monkeypatch):
    from qserve import LLM

    monkeypatch.setattr(loader, "cpu_has_amx_bf16", lambda: True)
    llm = LLM(str(tiny_llama_dir), device="cpu")
    assert llm.engine.dtype == torch.bfloat16
