"""Fused dequant-GEMM (Triton, interpreted on CPU or real on CUDA) and the public CPU path vs the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_testing import HAS_CUDA, TRITON_DEVICES

from qserve.kernels import dequant_gemm, dequantize_weight, g_idx_is_trivial, packing
from qserve.kernels.reference import dequant_gemm_reference
from qserve.kernels.reference import dequantize_weight as dequantize_reference

triton_gemm = pytest.importorskip("qserve.kernels.triton_gemm", reason="triton is not installed")
TileConfig = triton_gemm.TileConfig


@dataclass(frozen=True)
class Packed:
    fmt: str
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    checkpoint_format: str = "gptq"

    def kwargs(self) -> dict:
        return {
            "fmt": self.fmt,
            "bits": self.bits,
            "group_size": self.group_size,
            "checkpoint_format": self.checkpoint_format,
        }

    def tensors(self) -> tuple:
        return self.qweight, self.qzeros, self.scales, self.g_idx


def make_packed(fmt, k, n, group_size, gen, *, bits=4, sym=True, act_order=False, ckpt="gptq", device="cpu"):
    """A random Linear W [n, k] quantized with RTN and packed in `fmt`; act-order shuffles g_idx."""
    qw = packing.rtn_quantize(torch.randn(n, k, generator=gen), bits=bits, group_size=group_size, sym=sym)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        qw = packing.QuantizedWeight(qw.intweight, qw.scales, qw.zeros, qw.g_idx[perm], bits, group_size)
    if fmt == "gptq":
        p = packing.pack_gptq(qw, ckpt)
        g_idx = p.g_idx.to(device) if act_order else None
        return Packed(
            fmt, p.qweight.to(device), p.qzeros.to(device), p.scales.to(device), g_idx, bits, group_size, ckpt
        )
    p = packing.pack_awq(qw)
    return Packed(fmt, p.qweight.to(device), p.qzeros.to(device), p.scales.to(device), None, 4, group_size)


def gemm_tolerances(dtype: torch.dtype, y_ref: torch.Tensor) -> dict:
    # The reference is fp32 throughout with an exact W'. The kernel rounds W' to the dot dtype (fp16:
    # 2^-11 relative per weight; bf16: 2^-8 on a GPU), accumulates in fp32 in another order, and rounds
    # the output to x.dtype (half an ulp; the interpreter's bf16 cast truncates: one ulp). Summed over K
    # random-sign terms the weight rounding stays far below eps * max|y|, so 2 ulps of the output dtype,
    # relative and scaled to the largest output, bound a correct kernel, while one wrong nibble, zero
    # or group scale moves outputs by a whole quantization step times |x|, well beyond it.
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}[dtype]
    return {"rtol": 2 * eps, "atol": 2 * eps * float(y_ref.abs().max())}


SPLIT = TileConfig(16, 64, 64, split_k=2)
# (fmt, M, K, N, group_size, dtype, act_order, bits, sym, config); K and N are ragged against the tiles,
# and group sizes below, equal to and above BLOCK_K hit the per-row and the one-group-per-tile paths.
CASES = [
    ("gptq", 1, 256, 136, 128, torch.float16, False, 4, True, SPLIT),
    ("awq", 1, 288, 72, 32, torch.bfloat16, False, 4, False, TileConfig(16, 32, 64, split_k=3)),
    ("gptq", 3, 192, 200, 64, torch.bfloat16, True, 4, False, TileConfig(16, 64, 32, split_k=2)),
    ("awq", 3, 256, 136, -1, torch.float16, False, 4, True, TileConfig(16, 64, 64, split_k=4)),
    ("gptq", 16, 288, 104, 32, torch.float16, False, 8, False, SPLIT),
    ("awq", 16, 192, 264, 64, torch.bfloat16, False, 4, False, TileConfig(16, 64, 64)),
    ("gptq", 17, 160, 136, 32, torch.float16, True, 4, True, TileConfig(32, 64, 32)),
    ("awq", 17, 256, 72, 128, torch.float16, False, 4, False, TileConfig(32, 64, 128, split_k=2)),
    ("gptq", 128, 256, 136, -1, torch.bfloat16, False, 4, False, TileConfig(64, 64, 64)),
    ("awq", 128, 320, 96, 64, torch.float16, False, 4, True, TileConfig(64, 32, 128)),
    ("gptq", 129, 192, 72, 64, torch.float16, False, 4, True, None),
    ("awq", 129, 256, 136, 128, torch.bfloat16, False, 4, False, None),
    ("gptq", 1, 256, 72, 128, torch.bfloat16, True, 4, False, None),
    ("gptq", 17, 200, 64, -1, torch.float16, False, 8, True, None),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("fmt", "m", "k", "n", "gs", "dtype", "act", "bits", "sym", "config"), CASES)
def test_fused_kernel_matches_reference(fmt, m, k, n, gs, dtype, act, bits, sym, config, device, gen):
    w = make_packed(fmt, k, n, gs, gen, bits=bits, sym=sym, act_order=act, device=device)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=gen).half().to(device) if m % 2 else None  # odd M also adds a bias
    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)  # every element must be written
    y = triton_gemm.dequant_gemm_triton(x, *w.tensors(), bias, **w.kwargs(), config=config, out=out)
    ref = dequant_gemm_reference(x.cpu(), *(t.cpu() if t is not None else None for t in w.tensors()),
                                 bias.cpu() if bias is not None else None, **w.kwargs())  # fmt: skip
    assert y.dtype == dtype and y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y.cpu(), ref, **gemm_tolerances(dtype, ref.float()))  # NaN never passes


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("fmt", "k", "n", "gs", "act", "bits", "ckpt"),
    [
        ("gptq", 192, 72, 64, True, 4, "gptq"),
        ("gptq", 160, 40, 32, False, 8, "gptq_v2"),
        ("gptq", 96, 64, -1, False, 4, "gptq_v2"),
        ("awq", 288, 136, 32, False, 4, "gptq"),
    ],
)
def test_triton_dequantize_is_exact(fmt, k, n, gs, act, bits, ckpt, device, gen):
    w = make_packed(fmt, k, n, gs, gen, bits=bits, sym=False, act_order=act, ckpt=ckpt, device=device)
    got = triton_gemm.dequantize_t(*w.tensors(), **w.kwargs(), dtype=torch.float32)  # [K, N]
    ref = dequantize_reference(*(t.cpu() if t is not None else None for t in w.tensors()), **w.kwargs())
    # same fp32 products s * (q - z) of exact integers and fp16 scales: bit-identical
    torch.testing.assert_close(got.cpu(), ref.t(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("fmt", "act", "gs"), [("gptq", True, 32), ("gptq", False, -1), ("awq", False, 64)])
def test_public_cpu_path_matches_reference(fmt, act, gs, dtype, gen, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU tensor reached a Triton kernel")

    # the CPU path must not depend on TRITON_INTERPRET (set for this folder): dispatch is by device
    monkeypatch.setattr(triton_gemm, "dequant_gemm_triton", refuse)
    monkeypatch.setattr(triton_gemm, "dequantize_t", refuse)
    w = make_packed(fmt, 128, 48, gs, gen, sym=False, act_order=act)
    x = torch.randn(2, 5, 128, generator=gen).to(dtype)  # leading dims are kept
    bias = torch.randn(48, generator=gen).half()
    y = dequant_gemm(x, *w.tensors(), bias, **w.kwargs())
    ref = dequant_gemm_reference(x, *w.tensors(), bias, **w.kwargs())
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    torch.testing.assert_close(y, ref, **gemm_tolerances(dtype, ref.float()))
    dense = dequantize_weight(*w.tensors(), **w.kwargs(), dtype=torch.float32)
    torch.testing.assert_close(dense, dequantize_reference(*w.tensors(), **w.kwargs()), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", [None, "fused", "dequant"])
@pytest.mark.parametrize("m", [1, 17, 300])
def test_public_cuda_paths_match_reference(path, m, gen):
    w = make_packed("awq", 256, 136, 64, gen, sym=False, device="cuda")
    x = torch.randn(m, 256, generator=gen).to("cuda", torch.bfloat16)
    y = dequant_gemm(x, *w.tensors(), **w.kwargs(), path=path)
    ref = dequant_gemm_reference(x.cpu(), *(t.cpu() for t in w.tensors()[:3]), **w.kwargs())
    torch.testing.assert_close(y.cpu(), ref, **gemm_tolerances(torch.bfloat16, ref.float()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty_batch_gives_empty_output(device, gen):
    w = make_packed("awq", 64, 16, 32, gen, device=device)
    x = torch.randn(2, 0, 64).to(device=device, dtype=torch.float16)
    assert triton_gemm.dequant_gemm_triton(x, *w.tensors(), **w.kwargs()).shape == (2, 0, 16)
    assert dequant_gemm(x, *w.tensors(), **w.kwargs()).shape == (2, 0, 16)


def test_g_idx_is_trivial_tells_act_order_apart(gen):
    assert g_idx_is_trivial(torch.arange(256, dtype=torch.int32) // 64, 64)
    assert g_idx_is_trivial(torch.zeros(96, dtype=torch.int32), -1)
    shuffled = (torch.arange(256, dtype=torch.int32) // 64)[torch.randperm(256, generator=gen)]
    assert not g_idx_is_trivial(shuffled, 64)


def test_awq_with_g_idx_is_rejected(gen):
    w = make_packed("awq", 64, 16, 32, gen)
    with pytest.raises(ValueError, match="g_idx"):
        dequant_gemm(
            torch.randn(1, 64), w.qweight, w.qzeros, w.scales, torch.zeros(64), fmt="awq", group_size=32
        )


def test_mismatched_packed_tensors_are_rejected_with_names(gen):
    w = make_packed("gptq", 128, 64, 32, gen)
    with pytest.raises(ValueError, match=r"gptq qzeros: expected int32 \[4, 8\]"):
        dequant_gemm(torch.randn(1, 128), w.qweight, w.qzeros[:, :4], w.scales, fmt="gptq", group_size=32)
    with pytest.raises(ValueError, match="does not match the packed weight's in_features 128"):
        dequant_gemm(torch.randn(1, 96), *w.tensors(), **w.kwargs())
    with pytest.raises(ValueError, match="awq qweight"):  # a GPTQ tensor declared as AWQ
        dequant_gemm(torch.randn(1, 16), w.qweight, w.qzeros, w.scales, fmt="awq", group_size=32)
