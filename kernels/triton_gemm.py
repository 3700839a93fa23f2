"""Fused dequant-GEMM for GPTQ and AWQ-GEMM packed weights (Triton).

y [M, N] = x [M, K] @ W'^T, where W' [N, K] is decoded tile by tile in registers from the packed int32
words (docs/formats.md layouts) and never written to global memory. Scales are fp16 in every checkpoint;
they are upcast to fp32 in-kernel, so bf16 activations work as well as fp16; accumulation is fp32.

Two launch families share one kernel:
  split-K (M <= SPLIT_K_MAX_M, decode): few rows, so the work is reading the weight once; the K loop is
      split across programs to fill the GPU, partial sums meet in an fp32 buffer by atomic add.
  tiled (larger M): a classic tiled GEMM with grouped program order so weight tiles stay in L2.
`dequantize_t` decodes the whole weight with the same tile code, for the dequantize + cuBLAS fallback
and for callers that cache a dense weight.

Importing this module needs triton. On CPU tensors it only runs under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qserve.kernels.reference import packed_shape
from qserve.kernels.triton_common import dot_operands

SPLIT_K_MAX_M = 32  # decode-sized batches: memory-bound, so split K instead of tiling M
# group_size -1 (one group): any power of two >= K makes k // GROUP_SIZE == 0 for every row, and
# keeps "GROUP_SIZE % BLOCK_K == 0" true so the kernel takes the one-group-per-tile fast path.
ONE_GROUP = 1 << 30


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one dequant-GEMM run; split_k > 1 selects the split-K family."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _weight_tile(
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k0, n0, K, N,
    AWQ: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """W'^T tile [BLOCK_K, BLOCK_N] in fp32 for input rows k0.. and output columns n0.."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    lane = tl.arange(0, PACK)
    words_n = n0 // PACK + tl.arange(0, BLOCK_N // PACK)  # word columns of column-packed tensors
    if AWQ:
        # column 8c + j sits in nibble AWQ_REVERSE_ORDER[j] = j // 2 + 4 * (j % 2) of word c
        col_shift = (lane // 2 + (lane % 2) * 4) * 4
        words = tl.load(
            qweight_ptr + offs_k[:, None] * (N // PACK) + words_n[None, :],
            mask=(offs_k[:, None] < K) & (words_n[None, :] < N // PACK),
            other=0,
        )  # [BLOCK_K, BLOCK_N / 8]
        q = tl.reshape((words[:, :, None] >> col_shift[None, None, :]) & MASK, (BLOCK_K, BLOCK_N))
    else:
        col_shift = lane * BITS  # GPTQ zeros are packed sequentially along the output dim
        words_k = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        words = tl.load(
            qweight_ptr + words_k[:, None] * N + offs_n[None, :],
            mask=(words_k[:, None] < K // PACK) & (offs_n[None, :] < N),
            other=0,
        )  # [BLOCK_K / PACK, BLOCK_N]; input row PACK * r + i sits in bits [BITS * i, BITS * i + BITS)
        q = tl.reshape((words[:, None, :] >> (lane * BITS)[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))

    # Group of each tile row: [BLOCK_K] gathered through g_idx for act-order, else one row [1] when
    # the tile cannot straddle a group boundary (scales/zeros then load once per tile, not per row).
    if ACT_ORDER:
        g = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
    elif GROUP_SIZE % BLOCK_K == 0:
        g = k0 // GROUP_SIZE + tl.zeros([1], dtype=tl.int32)
    else:
        g = tl.minimum(offs_k, K - 1) // GROUP_SIZE  # clamp: rows past K must not index past the last group
    zwords = tl.load(
        qzeros_ptr + g[:, None] * (N // PACK) + words_n[None, :], mask=words_n[None, :] < N // PACK, other=0
    )  # [R, BLOCK_N / PACK]
    z = tl.reshape((zwords[:, :, None] >> col_shift[None, None, :]) & MASK, (g.shape[0], BLOCK_N))
    z = (z + ZERO_OFFSET) & MASK  # GPTQ v1 stores z - 1 (z = 0 wraps to all ones)
    s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=offs_n[None, :] < N, other=0.0)
    return (q - z).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    AWQ: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """out [M, N] = x [M, K] @ W'^T (+ bias); with SPLIT_K > 1, out is a zeroed fp32 buffer to add into."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M consecutive programs share a weight column tile while it is hot in L2
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = tl.program_id(1) * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first_tile, tl.minimum(first_tile + per_split, k_tiles)):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * K + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        w = _weight_tile(
            qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, t * BLOCK_K, pid_n * BLOCK_N, K, N,
            AWQ, BITS, GROUP_SIZE, ZERO_OFFSET, ACT_ORDER, BLOCK_K, BLOCK_N,
        )  # fmt: skip
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    out_offs = offs_m[:, None] * N + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_mask)


@triton.jit
def _dequant_kernel(
    qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, K, N,
    AWQ: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out [K, N] = W'^T in out's dtype."""
    k0 = tl.program_id(0) * BLOCK_K
    n0 = tl.program_id(1) * BLOCK_N
    w = _weight_tile(
        qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, k0, n0, K, N,
        AWQ, BITS, GROUP_SIZE, ZERO_OFFSET, ACT_ORDER, BLOCK_K, BLOCK_N,
    )  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) candidates of each family; num_warps / num_stages per family.
# `python -m qserve.kernels.compile_check` compiles every candidate for sm_80/89/90 with ptxas (no GPU
# needed; bench/results/compile_check.md). (16, 64, 256, 8) is no longer a candidate: with 3 stages it
# spilled at 255 registers for bf16 on sm_80 and sm_90 and asked for 144-176 KiB of shared memory (over
# sm_89's 99 KiB, and over sm_80's 163 KiB at 8 bits); (16, 64, 128, 4) covers the same tile width.
SPLIT_K_SHAPES = ((16, 64, 128, 4), (16, 128, 128, 4), (32, 64, 128, 8), (16, 128, 64, 16))
TILED_SHAPES = ((64, 64, 64, 1), (64, 128, 64, 1), (128, 128, 32, 1), (128, 64, 64, 1), (128, 256, 32, 1))
# Candidates left out on one architecture (capability major * 10 + minor), from the same check:
#   sm_80: (32, 64, 128, 8) spills at M = 1 (8 B of stack, GPTQ 4-bit fp16), Triton's batch-1 kernel;
#   sm_86 / sm_89 (99 KiB per block): (16, 128, 128, 4) needs 136 KiB and (64, 128, 64, 1) 112 KiB
#   when a quantization group ends inside a K tile (group 32: scales and zeros per row, staged per stage).
_SMALL_SMEM = frozenset({(16, 128, 128, 4), (64, 128, 64, 1)})
ARCH_EXCLUDED_SHAPES: dict[int, frozenset[tuple[int, int, int, int]]] = {
    80: frozenset({(32, 64, 128, 8)}),
    86: _SMALL_SMEM,
    89: _SMALL_SMEM,
}


def autotune_configs(split_k_family: bool, arch: int | None = None) -> list[triton.Config]:
    """The autotune candidates of one launch family for compute capability `arch` (e.g. 90; None: all).

    The compile check compiles exactly these per architecture; the autotuner uses the local GPU's list."""
    if split_k_family:
        shapes, stages, warps = SPLIT_K_SHAPES, 3, 4
    else:
        shapes, stages, warps = TILED_SHAPES, 4, 8
    excluded = ARCH_EXCLUDED_SHAPES.get(arch, frozenset()) if arch is not None else frozenset()
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s, "GROUP_M": 8},
            num_warps=warps if m * n >= 128 * 128 else 4,
            num_stages=stages,
        )
        for m, n, k, s in shapes
        if (m, n, k, s) not in excluded
    ]


def _local_arch() -> int | None:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return None


def _autotune_configs(split_k_family: bool) -> list[triton.Config]:
    configs = autotune_configs(split_k_family, _local_arch())
    # The interpreter runs every candidate on the CPU: one config keeps interpreted tests fast.
    return configs[:1] if triton.knobs.runtime.interpret else configs


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "AWQ", "BITS", "GROUP_SIZE", "ACT_ORDER"]
_split_k_tuned = triton.autotune(_autotune_configs(True), key=_AUTOTUNE_KEY, reset_to_zero=["out_ptr"])(
    _dequant_gemm_kernel
)
_tiled_tuned = triton.autotune(_autotune_configs(False), key=_AUTOTUNE_KEY)(_dequant_gemm_kernel)


# One fp32 buffer per device holds the split-K partial sums of every launch (launches on a device run
# in stream order, each zeroes its view first and copies it out before the next starts). An outgrown
# buffer is kept alive, not freed: a CUDA graph captured earlier still reads and writes it on replay.
_split_k_buffers: dict[torch.device, torch.Tensor] = {}
_outgrown_buffers: list[torch.Tensor] = []


def split_k_workspace(m: int, n: int, device: torch.device) -> torch.Tensor:
    """A zeroed fp32 [m, n] view of the device's reused split-K buffer (grown when too small)."""
    buf = _split_k_buffers.get(device)
    if buf is None or buf.numel() < m * n:
        if buf is not None:
            _outgrown_buffers.append(buf)
        buf = torch.empty(m * n, device=device, dtype=torch.float32)
        _split_k_buffers[device] = buf
    view = buf[: m * n].view(m, n)
    view.zero_()
    return view


def _format_constants(fmt: str, bits: int, group_size: int, in_features: int, g_idx, checkpoint_format):
    if fmt not in ("gptq", "awq"):
        raise ValueError(f"unknown packed format fmt={fmt!r}; expected 'gptq' or 'awq'")
    if fmt == "awq" and (bits != 4 or g_idx is not None):
        raise ValueError(f"AWQ GEMM is 4-bit without g_idx; got bits={bits}, g_idx given={g_idx is not None}")
    zero_offset = 0
    if fmt == "gptq":
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}")
        zero_offset = 1 if checkpoint_format == "gptq" else 0
    group = ONE_GROUP if group_size == -1 or group_size >= in_features else group_size
    return {
        "AWQ": fmt == "awq",
        "BITS": bits,
        "GROUP_SIZE": group,
        "ZERO_OFFSET": zero_offset,
        "ACT_ORDER": g_idx is not None,
    }


def dequant_gemm_triton(
    x, qweight, qzeros, scales, g_idx=None, bias=None, *, fmt, bits=4, group_size,
    checkpoint_format="gptq", config: TileConfig | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """y [..., N] = x [..., K] @ W'^T (+ bias) in x.dtype; `config` pins the tiles (tests), else autotune.

    `out` [M, N] (x.dtype, contiguous) receives the result when given, e.g. a preallocated buffer.

    g_idx, when given, is honoured row by row (act-order); pass None for contiguous groups, which is
    faster (see `qserve.kernels.g_idx_is_trivial`).
    """
    K, N = packed_shape(fmt, bits, qweight, qzeros, scales, g_idx)
    if x.shape[-1] != K:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match the packed weight's in_features {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M = x2.shape[0]
    consts = _format_constants(fmt, bits, group_size, K, g_idx, checkpoint_format)
    dot_dtype, precision = dot_operands(x.dtype, x.device)
    args_tail = {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision, "HAS_BIAS": bias is not None, **consts}
    g_arg = g_idx.to(torch.int32).contiguous() if g_idx is not None else scales  # unused when not act-order
    b_arg = bias.contiguous() if bias is not None else scales  # unused when HAS_BIAS is false
    split = config.split_k > 1 if config is not None else M <= SPLIT_K_MAX_M
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:  # an empty batch: a zero-sized grid is not launchable
        return out.reshape(*lead, N)
    # split-K programs add partial sums into a zeroed fp32 buffer; the tiled family writes out directly
    target = split_k_workspace(M, N, x.device) if split else out
    args = (x2, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_arg, b_arg, target, M, N, K)
    m_bucket = triton.next_power_of_2(M)
    if config is None:
        kernel = _split_k_tuned if split else _tiled_tuned

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        kernel[grid](*args, m_bucket, **args_tail)
    else:
        grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n), config.split_k)
        _dequant_gemm_kernel[grid](
            *args, m_bucket, **args_tail,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
            GROUP_M=8, num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    if split:
        if bias is not None:
            target += bias.float()
        out.copy_(target)
    return out.reshape(*lead, N)


def dequantize_t(
    qweight, qzeros, scales, g_idx=None, *, fmt, bits=4, group_size, checkpoint_format="gptq",
    dtype=torch.float16, block_k: int = 64, block_n: int = 64,
) -> torch.Tensor:  # fmt: skip
    """Dense W'^T [K, N] in `dtype`, decoded on the device by the GEMM's own tile code."""
    K, N = packed_shape(fmt, bits, qweight, qzeros, scales, g_idx)
    consts = _format_constants(fmt, bits, group_size, K, g_idx, checkpoint_format)
    out = torch.empty((K, N), device=qweight.device, dtype=dtype)
    g_arg = g_idx.to(torch.int32).contiguous() if g_idx is not None else scales
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    _dequant_kernel[grid](
        qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_arg, out, K, N,
        BLOCK_K=block_k, BLOCK_N=block_n, **consts,
    )  # fmt: skip
    return out
