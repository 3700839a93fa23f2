"""The packed formats of kernels/packing.py: bit-exact layouts, round trips, quantization error bound."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import packing


def test_gptq_word_layout_is_sequential_along_input():
    # input rows 0..7 hold codes 0..7: row k sits in bits [4k, 4k + 4) of word row 0 (docs/formats.md)
    values = torch.arange(8, dtype=torch.int32)[:, None].expand(8, 3)
    assert packing.pack_rows(values, 4).tolist() == [[0x76543210] * 3]


def test_awq_word_layout_is_interleaved():
    # columns 0..7 hold codes 0..7: nibble i holds column AWQ_ORDER[i] = [0,2,4,6,1,3,5,7]
    values = torch.arange(8, dtype=torch.int32)[None, :]
    assert packing.pack_cols(values, 4, packing.AWQ_ORDER).tolist() == [[0x75316420]]


@pytest.mark.parametrize(("checkpoint_format", "stored"), [("gptq", 0x77777777), ("gptq_v2", -0x77777778)])
def test_gptq_symmetric_zero_is_stored_with_the_format_offset(checkpoint_format, stored):
    # symmetric 4-bit has z = 8: v1 stores 7 in every nibble, v2 stores 8 (0x88888888 as int32)
    qw = packing.rtn_quantize(torch.randn(8, 32), bits=4, group_size=32, sym=True)
    packed = packing.pack_gptq(qw, checkpoint_format)
    assert packed.qzeros.tolist() == [[stored]]


def _random_codes(rows: int, cols: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("rows", "cols"), [(16, 1), (32, 7), (48, 24), (272, 13)])
def test_row_and_column_packing_round_trip(bits, rows, cols, gen):
    codes = _random_codes(rows, cols, bits, gen)
    assert torch.equal(packing.unpack_rows(packing.pack_rows(codes, bits), bits), codes)
    codes_t = codes.t().contiguous()  # [cols, rows]: rows is a multiple of 16 = 32 / min(bits)
    order = packing.AWQ_ORDER if bits == 4 else None
    assert torch.equal(packing.unpack_cols(packing.pack_cols(codes_t, bits, order), bits, order), codes_t)


def _quantized(out_f, in_f, bits, group_size, sym, gen, act_order=False):
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    qw = packing.rtn_quantize(w, bits=bits, group_size=group_size, sym=sym)
    if act_order:  # a non-monotonic group assignment, as desc_act produces
        perm = torch.randperm(in_f, generator=gen)
        qw = packing.QuantizedWeight(qw.intweight, qw.scales, qw.zeros, qw.g_idx[perm], bits, group_size)
    return w, qw


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(
    ("bits", "out_f", "in_f", "group_size", "sym", "act_order"),
    [
        (4, 24, 96, 32, True, False),
        (4, 40, 64, -1, False, False),
        (4, 8, 192, 64, False, True),
        (8, 16, 128, 128, True, False),
        (8, 32, 72, 24, False, True),
    ],
)
def test_gptq_pack_unpack_round_trip(bits, out_f, in_f, group_size, sym, act_order, checkpoint_format, gen):
    _, qw = _quantized(out_f, in_f, bits, group_size, sym, gen, act_order)
    p = packing.pack_gptq(qw, checkpoint_format)
    assert p.qweight.shape == (in_f * bits // 32, out_f) and p.qweight.dtype == torch.int32
    assert p.qzeros.shape == (qw.scales.shape[0], out_f * bits // 32)
    back = packing.unpack_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, bits, group_size, checkpoint_format)
    assert torch.equal(back.intweight, qw.intweight)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx)


@pytest.mark.parametrize(("out_f", "in_f", "group_size", "sym"), [(24, 96, 32, True), (40, 128, -1, False)])
def test_awq_pack_unpack_round_trip(out_f, in_f, group_size, sym, gen):
    _, qw = _quantized(out_f, in_f, 4, group_size, sym, gen)
    p = packing.pack_awq(qw)
    assert p.qweight.shape == (in_f, out_f // 8) and p.qzeros.shape == (qw.scales.shape[0], out_f // 8)
    back = packing.unpack_awq(p.qweight, p.qzeros, p.scales, group_size)
    assert torch.equal(back.intweight, qw.intweight)
    assert torch.equal(back.zeros, qw.zeros)


@pytest.mark.parametrize(
    ("fmt", "bits", "group_size", "sym"),
    [
        ("gptq", 4, 32, True),
        ("gptq", 4, 64, False),
        ("gptq", 8, 128, True),
        ("gptq", 8, -1, False),
        ("awq", 4, 32, False),
        ("awq", 4, -1, True),
    ],
)
def test_dequantized_weight_is_within_half_a_step(fmt, bits, group_size, sym, gen):
    out_f, in_f = 48, 256
    w, qw = _quantized(out_f, in_f, bits, group_size, sym, gen)
    if fmt == "gptq":
        p = packing.pack_gptq(qw)
        deq = packing.dequantize_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, bits, group_size)
    else:
        p = packing.pack_awq(qw)
        deq = packing.dequantize_awq(p.qweight, p.qzeros, p.scales, group_size)
    # round-to-nearest is off by at most half a step s per weight. The step is stored in fp16 (half an
    # ulp: 2^-11 relative), which moves the grid point s * (q - z) by |q - z| * s * 2^-11 more; fp32
    # rounding in the quantizer (w / s near a tie) adds far less than s * 2^-12. An off-by-one code
    # would exceed the bound by about s / 2.
    step = p.scales.float()[qw.g_idx.long()].t()  # [out, in]
    codes_from_zero = (qw.intweight - qw.zeros[qw.g_idx.long()].t()).abs().float()
    bound = step / 2 + codes_from_zero * step * 2**-11 + step * 2**-12
    err = (deq - w).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max()}"
    # and the error is not trivially zero: the bound is tight enough to catch an off-by-one code
    assert (err > step / 4).any()
