"""The packed 4-bit formats, written once: quantize, pack, unpack, dequantize.

Every other part of qserve (the quantizers, the exporter, the validator, the engine's loader, the
kernels' torch reference and the tests) goes through these functions, so there is exactly one
definition of each layout. Layouts (docs/formats.md describes them in full):

GPTQ (v1 `checkpoint_format: "gptq"`):
    qweight int32 [in * bits / 32, out]  packed along the input dim, sequential nibbles
    qzeros  int32 [G, out * bits / 32]   packed along the output dim, sequential, stores z - 1
    scales  fp16  [G, out]
    g_idx   int32 [in]                   group of each input channel
AWQ GEMM:
    qweight int32 [in, out / 8]          packed along the output dim, interleaved AWQ_ORDER
    qzeros  int32 [G, out / 8]           same interleave, true zero point
    scales  fp16  [G, out]

Notation: a Linear has weight W [out, in]; q = clamp(round(W / s) + z, 0, 2^bits - 1); W' = s * (q - z).
All functions are pure and work on CPU or CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8c + j sits in nibble AWQ_REVERSE_ORDER[j]
SUPPORTED_BITS = (2, 4, 8)  # word-aligned widths; 3-bit crosses word boundaries and is not supported


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    return 32 // bits


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(in / group_size); group_size -1 means one group over the whole input."""
    if group_size == -1:
        return 1
    return -(-in_features // group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


# --------------------------------------------------------------------------------------------------
# Quantization primitives (per output row, per input group)
# --------------------------------------------------------------------------------------------------


# How a symmetric group's scale is chosen. Symmetric b-bit codes are q - 2^(b-1), so the levels are
# -2^(b-1) .. 2^(b-1) - 1 (-8 .. 7 at 4 bits): one more step below zero than above it.
# "absmax": scale = 2 * max|w| / (2^b - 1), the GPTQ reference quantizer's (and AutoGPTQ's, GPTQModel's)
#   choice; it clips a positive extreme to 7/7.5 = 0.933 of its value and leaves level -8 unused when the
#   extreme is negative.
# "signed": the smallest scale that clips neither extreme: max(max(w) / 7, -min(w) / 8). A group whose
#   negative extreme decides it gets a grid up to 6.7% finer, one whose positive extreme decides it is no
#   longer clipped. Same layout, same zero point (vLLM's Marlin and exllama kernels read it unchanged).
SYM_SCALES = ("absmax", "signed")


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    clip_max: torch.Tensor | None = None,
    sym_scale: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for each row of `w` [rows, cols] (one group per row).

    Returns (scale [rows], zero [rows]) in float32; `zero` holds integers. `clip_max`, when given,
    bounds |w| per row (AWQ's clipping search result). `sym_scale`: see SYM_SCALES.
    """
    w = w.float()
    maxq = 2**bits - 1
    wmax = w.amax(dim=1)
    wmin = w.amin(dim=1)
    if clip_max is not None:
        wmax = torch.minimum(wmax, clip_max.float())
        wmin = torch.maximum(wmin, -clip_max.float())
    if sym:
        half = (maxq + 1) // 2
        if sym_scale == "signed":
            scale = torch.maximum(wmax.clamp(min=0) / (half - 1), -wmin.clamp(max=0) / half).clamp(min=1e-8)
        elif sym_scale == "absmax":
            amax = torch.maximum(wmax.abs(), wmin.abs()).clamp(min=1e-8)
            scale = 2 * amax / maxq
        else:
            raise ValueError(f"sym_scale={sym_scale!r}: expected one of {', '.join(SYM_SCALES)}")
        zero = torch.full_like(scale, float(half))
    else:
        wmin = wmin.clamp(max=0)
        wmax = wmax.clamp(min=0)
        span = (wmax - wmin).clamp(min=1e-8)
        scale = span / maxq
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_tensor(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w / s) + z, 0, maxq); scale/zero broadcast against w."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized Linear in logical (unpacked) form; pack it with `pack_gptq` or `pack_awq`.

    intweight [out, in] integer codes; scales [G, out] float; zeros [G, out] integer zero points
    (true zeros, no offset); g_idx [in] group of each input channel.
    """

    intweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """W' [out, in] in float32."""
        g = self.g_idx.long()
        s = self.scales.float()[g].t()  # [out, in]
        z = self.zeros.float()[g].t()
        return s * (self.intweight.float() - z)


def rtn_quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    clip_max: torch.Tensor | None = None,
    sym_scale: str = "absmax",
) -> QuantizedWeight:
    """Round-to-nearest quantization of W [out, in] with contiguous groups along the input dim.

    `clip_max` [out, G] optionally bounds |w| per (row, group) before the scale is computed (AWQ clip).
    `sym_scale`: how a symmetric group's scale is chosen (SYM_SCALES).
    """
    out_f, in_f = w.shape
    gs = effective_group_size(in_f, group_size)
    if in_f % gs:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={group_size}")
    n_groups = in_f // gs
    wg = w.float().reshape(out_f, n_groups, gs).permute(1, 0, 2).reshape(n_groups * out_f, gs)
    clip = None if clip_max is None else clip_max.t().reshape(n_groups * out_f)  # [G*out] matching wg rows
    scale, zero = compute_qparams(wg, bits, sym, clip, sym_scale)
    q = quantize_tensor(wg, scale[:, None], zero[:, None], bits)
    intweight = q.reshape(n_groups, out_f, gs).permute(1, 0, 2).reshape(out_f, in_f)
    g_idx = torch.arange(in_f, device=w.device, dtype=torch.int32) // gs
    return QuantizedWeight(
        intweight=intweight.to(torch.int32),
        scales=scale.reshape(n_groups, out_f),
        zeros=zero.reshape(n_groups, out_f).to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
    )


# --------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement wrap)."""
    x = x & 0xFFFFFFFF
    x = torch.where(x >= 2**31, x - 2**32, x)
    return x.to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0, sequential: word row r, bits [b*k, b*k+b) hold row (32/b)*r + k.

    values [R, C] integers in [0, 2^bits) -> int32 [R * bits / 32, C].
    """
    per_word = _check_bits(bits)
    rows, cols = values.shape
    if rows % per_word:
        raise ValueError(f"cannot pack {rows} rows at {bits} bits: not a multiple of {per_word}")
    v = values.to(torch.int64).reshape(rows // per_word, per_word, cols)
    shifts = (torch.arange(per_word, device=values.device, dtype=torch.int64) * bits)[None, :, None]
    return _to_int32((v << shifts).sum(dim=1))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [R', C] -> int32 [R' * 32 / bits, C]."""
    per_word = _check_bits(bits)
    words, cols = packed.shape
    shifts = (torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits)[None, :, None]
    v = (packed[:, None, :] >> shifts) & (2**bits - 1)  # arithmetic shift then mask: sign-safe
    return v.reshape(words * per_word, cols)


def pack_cols(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack along dim 1. Nibble i of word c holds column (32/b)*c + order[i] (identity if None).

    values [R, C] -> int32 [R, C * bits / 32].
    """
    per_word = _check_bits(bits)
    rows, cols = values.shape
    if cols % per_word:
        raise ValueError(f"cannot pack {cols} columns at {bits} bits: not a multiple of {per_word}")
    v = values.to(torch.int64).reshape(rows, cols // per_word, per_word)
    if order is not None:
        v = v[:, :, list(order)]  # v[..., i] = column order[i] of the word
    shifts = (torch.arange(per_word, device=values.device, dtype=torch.int64) * bits)[None, None, :]
    return _to_int32((v << shifts).sum(dim=2))


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack_cols`: int32 [R, C'] -> int32 [R, C' * 32 / bits]."""
    per_word = _check_bits(bits)
    rows, words = packed.shape
    shifts = (torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits)[None, None, :]
    v = (packed[:, :, None] >> shifts) & (2**bits - 1)  # v[..., i] = nibble i
    if order is not None:
        inverse = [0] * per_word
        for nibble, col in enumerate(order):
            inverse[col] = nibble
        v = v[:, :, inverse]  # v[..., j] = column j of the word
    return v.reshape(rows, words * per_word)


# --------------------------------------------------------------------------------------------------
# GPTQ layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedGPTQ:
    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [G, out * bits / 32], z - 1 for v1
    scales: torch.Tensor  # fp16 [G, out]
    g_idx: torch.Tensor  # int32 [in]


def pack_gptq(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> PackedGPTQ:
    """Pack into the GPTQ layout. v1 (`"gptq"`) stores z - 1, v2 (`"gptq_v2"`) the true z."""
    offset = _zero_offset(checkpoint_format)
    qweight = pack_rows(qw.intweight.t().contiguous(), qw.bits)  # [in/8, out]
    # v1 wraps z=0 to -1 (all ones in the nibble): readers add 1 back modulo 2^bits.
    zeros = (qw.zeros.to(torch.int64) - offset) & (2**qw.bits - 1)
    qzeros = pack_cols(zeros, qw.bits)
    return PackedGPTQ(
        qweight=qweight,
        qzeros=qzeros,
        scales=qw.scales.to(torch.float16),
        g_idx=qw.g_idx.to(torch.int32),
    )


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
) -> QuantizedWeight:
    offset = _zero_offset(checkpoint_format)
    intweight = unpack_rows(qweight, bits).t().contiguous()  # [out, in]
    zeros = (unpack_cols(qzeros, bits) + offset) & (2**bits - 1)
    in_f = intweight.shape[1]
    if g_idx is None:
        g_idx = torch.arange(in_f, device=qweight.device, dtype=torch.int32) // effective_group_size(
            in_f, group_size
        )
    return QuantizedWeight(
        intweight=intweight,
        scales=scales,
        zeros=zeros[:, : scales.shape[1]],
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
    )


def _zero_offset(checkpoint_format: str) -> int:
    if checkpoint_format == "gptq":
        return 1
    if checkpoint_format == "gptq_v2":
        return 0
    raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}; expected 'gptq' or 'gptq_v2'")


# --------------------------------------------------------------------------------------------------
# AWQ GEMM layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedAWQ:
    qweight: torch.Tensor  # int32 [in, out / 8], interleaved
    qzeros: torch.Tensor  # int32 [G, out / 8], interleaved, true zeros
    scales: torch.Tensor  # fp16 [G, out]


def pack_awq(qw: QuantizedWeight) -> PackedAWQ:
    if qw.bits != 4:
        raise ValueError(f"AWQ GEMM exists only at 4 bits, got bits={qw.bits}")
    in_f = qw.intweight.shape[1]
    expected = torch.arange(in_f, device=qw.g_idx.device, dtype=torch.int32) // effective_group_size(
        in_f, qw.group_size
    )
    if not torch.equal(qw.g_idx.to(torch.int32), expected):
        raise ValueError("AWQ GEMM has no g_idx: groups must be contiguous (no act-order)")
    return PackedAWQ(
        qweight=pack_cols(qw.intweight.t().contiguous(), 4, AWQ_ORDER),  # [in, out/8]
        qzeros=pack_cols(qw.zeros, 4, AWQ_ORDER),
        scales=qw.scales.to(torch.float16),
    )


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedWeight:
    intweight = unpack_cols(qweight, 4, AWQ_ORDER).t().contiguous()  # [out, in]
    zeros = unpack_cols(qzeros, 4, AWQ_ORDER)
    in_f = intweight.shape[1]
    g_idx = torch.arange(in_f, device=qweight.device, dtype=torch.int32) // effective_group_size(
        in_f, group_size
    )
    return QuantizedWeight(
        intweight=intweight, scales=scales, zeros=zeros, g_idx=g_idx, bits=4, group_size=group_size
    )


def dequantize_gptq(
    qweight, qzeros, scales, g_idx, bits: int, group_size: int, checkpoint_format: str = "gptq"
) -> torch.Tensor:
    """W' [out, in] float32 from GPTQ tensors."""
    return unpack_gptq(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format).dequantize()


def dequantize_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """W' [out, in] float32 from AWQ GEMM tensors."""
    return unpack_awq(qweight, qzeros, scales, group_size).dequantize()
