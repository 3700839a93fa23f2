"""4-bit weights resident on the CPU: a load-time repack of GPTQ / AWQ and the C++ kernels over it.

The checkpoint's own layouts (kernels/packing.py) pack along different dims and in different nibble
orders, and act-order GPTQ scatters each group over the input. At load, each quantized Linear is
rewritten once into ONE layout the CPU kernels stream (kernels/csrc/cpu_packed.cpp has the byte-level
definition): blocks of 64 output columns, two input rows per byte, groups contiguous (act-order layers
have their input rows permuted, and each call permutes the activations to match), fp16 scales kept as
stored and uint8 zero points. It stays 4-bit: about 0.55 bytes per weight at group size 64, against
0.54 in the checkpoint and 4 for the dense fp32 weight the CPU engine used to hold.

The kernel path is chosen at run time from what the CPU reports: `avx512_vnni` (AVX-512F/BW/VL and
AVX512-VNNI), `avx512`, `avx2` (AVX2 and FMA, no AVX-512) or `scalar` (a portable C++ loop);
`QSERVE_CPU_ISA=avx512_vnni|avx512|avx2|scalar` forces one (tests run each the CPU has), `auto` (the
default) detects. The fp32 4-bit kernels have AVX-512 and portable bodies (`avx2` runs the portable
one); the bf16-weight kernel has AVX-512, AVX2 and portable bodies.

Decode-sized calls (at most INT8_MAX_ROWS activation rows) can instead quantize the activations to int8
once per call, per row and block of gcd(group_size, 32) inputs with an fp32 scale, and sum nibble x int8
products in int32 (AVX512-VNNI vpdpbusd, AVX2 vpmaddubsw/vpmaddwd, or portable), the llama.cpp Q4 x Q8
scheme: the 4-bit weights are then read at close to memory bandwidth instead of being widened to fp32
FMAs. The result is exactly the fp32 product of the weights with the dequantized int8 activations (up to
fp32 rounding), i.e. each activation moves by at most half its block's step max|x| / 127; typical
outputs differ from the fp32 path by about 0.5% of their scale. `QSERVE_CPU_ACT_INT8=1|0` forces it on or
off (0: exact fp32 math everywhere); `auto` (the default) turns it on where it was measured faster, the
`avx512_vnni` and `avx2` paths. Layers whose group size is not a multiple of 4 always run the fp32 kernel.

On a CPU with AMX, bf16 activations from AMX_MIN_ROWS rows (batched decode steps and prompt chunks of a
bf16 model) take `packed_linear_amx` instead: each thread expands one block of 64 columns at a time into
bf16 AMX tiles (s (q - z) in fp32, rounded to nearest even, as the dense bf16 weight would be) and
multiplies every row with it, fp32 sums, bf16 output; the 4 bits are read once per call whatever M.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from qserve.kernels import cpu_ext, packing

BLOCK = 64  # output columns per block of the resident layout
ISAS = ("auto", "avx512_vnni", "avx512", "avx2", "scalar")
_ISA_CODES = {"scalar": 0, "avx2": 2, "avx512": 1, "avx512_vnni": 1}  # the fp32 kernels' bodies
_Q8_CODES = {"scalar": 0, "avx2": 2, "avx512": 2, "avx512_vnni": 3}  # the int8 kernel's bodies
Q8_BODIES = {0: "scalar", 2: "avx2", 3: "avx512_vnni"}
INT8_MODES = ("auto", "1", "0")
# Rows up to which the int8 path runs (when on): decode steps of up to 8 sequences. On an AVX2 CPU
# (bench/cpu_gemv.py, one SmolLM2 forward's 4-bit GEMMs) it was 1.9x the fp32 kernel at M = 1, 3.1x at 4
# and still 3.3x at 16 and 3.1x at 32 (AVX512-VNNI against the AVX-512 fp32 kernel: not measured), but
# prompts (prefill chunks) keep exact fp32 activations: int8 there changed the greedy tokens of the
# engine tests' tiny models against transformers. Above, the fp32 kernels (from 33 rows dequantized
# tiles into at::mm).
INT8_MAX_ROWS = 8


def isa_name() -> str:
    """The kernel bodies calls take: QSERVE_CPU_ISA if set, else the best the CPU has."""
    choice = os.environ.get("QSERVE_CPU_ISA", "auto").strip().lower() or "auto"
    if choice not in ISAS:
        raise ValueError(f"QSERVE_CPU_ISA={choice!r} is not one of {', '.join(ISAS)}; unset it or pick one")
    if choice != "auto":
        return choice
    return _detected_isa()


_detected: list[str] = []  # the CPU's best path, detected once (a few microseconds per call otherwise)


def _detected_isa() -> str:
    if not _detected:
        if not cpu_ext.available():
            return "scalar"
        ops = torch.ops.qserve_cpu
        if ops.has_avx512_vnni():
            _detected.append("avx512_vnni")
        elif ops.has_avx512():
            _detected.append("avx512")
        else:
            _detected.append("avx2" if ops.has_avx2() else "scalar")
    return _detected[0]


def int8_activations(isa: str | None = None) -> bool:
    """Whether decode-sized calls quantize activations to int8: QSERVE_CPU_ACT_INT8 if set, else on for the
    avx512_vnni and avx2 paths (where it was measured faster than the fp32 kernels). isa: isa_name()."""
    choice = os.environ.get("QSERVE_CPU_ACT_INT8", "auto").strip().lower() or "auto"
    if choice not in INT8_MODES:
        raise ValueError(
            f"QSERVE_CPU_ACT_INT8={choice!r} is not one of {', '.join(INT8_MODES)}; unset it or pick one "
            "(0: exact fp32 activations)"
        )
    if choice != "auto":
        return choice == "1"
    return (isa or isa_name()) in ("avx512_vnni", "avx2")


def _check_available() -> None:
    if not cpu_ext.available():
        raise RuntimeError(
            f"the C++ CPU kernels are unavailable ({cpu_ext.unavailable_reason()}); 4-bit CPU layers need them"
        )


def _isa() -> int:
    _check_available()
    return _ISA_CODES[isa_name()]


def _q8_isa() -> int:
    _check_available()
    return _Q8_CODES[isa_name()]


def int8_body() -> str | None:
    """The int8 body a decode-sized call takes now (None: the fp32 kernel runs)."""
    _check_available()
    return Q8_BODIES[_q8_isa()] if int8_activations() else None


@dataclass(frozen=True)
class CpuPackedWeight:
    """One Linear (or several fused ones) in the resident 4-bit layout."""

    qdata: torch.Tensor  # uint8 [ceil(N / 64), K / 2, 64]
    scales: torch.Tensor  # fp16 (as stored) or fp32 [G, blocks * 64]
    zeros: torch.Tensor  # uint8 [G, blocks * 64], true zero points
    perm: torch.Tensor | None  # int64 [K]: resident input i is checkpoint input perm[i] (act-order)
    out_features: int
    group_size: int  # contiguous inputs per group in the resident order (K for one group)

    @property
    def in_features(self) -> int:
        return self.qdata.shape[1] * 2

    @property
    def nbytes(self) -> int:
        tensors = (self.qdata, self.scales, self.zeros) + (() if self.perm is None else (self.perm,))
        return sum(t.numel() * t.element_size() for t in tensors)


def repack(
    intweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
) -> CpuPackedWeight:
    """The resident layout of a 4-bit Linear in logical form.

    intweight [out, in] codes 0..15; scales [G, out]; zeros [G, out] true zero points; g_idx [in] or
    None (i // group_size). Raises ValueError for what the layout cannot hold (groups that are not
    runs of one size once sorted, an odd input count).
    """
    out_f, in_f = intweight.shape
    gs = packing.effective_group_size(in_f, group_size)
    n_groups = packing.num_groups(in_f, group_size)
    if in_f % gs or gs % 2:
        raise ValueError(
            f"the CPU 4-bit layout needs an even group size that divides in_features; got group_size="
            f"{group_size} for in_features={in_f}"
        )
    if tuple(scales.shape) != (n_groups, out_f) or tuple(zeros.shape) != (n_groups, out_f):
        raise ValueError(
            f"scales/zeros must be [{n_groups}, {out_f}], got {list(scales.shape)}, {list(zeros.shape)}"
        )
    perm = None
    if g_idx is not None:
        g = g_idx.to(torch.int64)
        contiguous = torch.arange(in_f, dtype=torch.int64) // gs
        if not torch.equal(g, contiguous):
            perm = torch.argsort(g, stable=True)
            if not torch.equal(g[perm], contiguous):
                raise ValueError(
                    f"g_idx does not assign {gs} inputs to each of the {n_groups} groups; the CPU 4-bit layout "
                    "cannot hold it"
                )
            intweight = intweight[:, perm]
    blocks = -(-out_f // BLOCK)
    pad = blocks * BLOCK - out_f
    codes = intweight.to(torch.uint8)
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, in_f)])
    pairs = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [Np, K/2]
    qdata = pairs.reshape(blocks, BLOCK, in_f // 2).transpose(1, 2).contiguous()
    scale_dtype = torch.float16 if scales.dtype == torch.float16 else torch.float32
    s = scales.to(scale_dtype)
    z = zeros.to(torch.uint8)
    if pad:
        s = torch.cat([s, s.new_zeros(n_groups, pad)], dim=1)
        z = torch.cat([z, z.new_zeros(n_groups, pad)], dim=1)
    return CpuPackedWeight(qdata, s.contiguous(), z.contiguous(), perm, out_f, gs)


def from_checkpoint(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    fmt: str,
    group_size: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(intweight [out, in], scales [G, out], zeros [G, out], g_idx) of a 4-bit checkpoint Linear, decoded
    by kernels/packing.py (the reference's own code)."""
    if fmt == "awq":
        qw = packing.unpack_awq(qweight, qzeros, scales, group_size)
        return qw.intweight, qw.scales, qw.zeros, None
    qw = packing.unpack_gptq(qweight, qzeros, scales, g_idx, 4, group_size, checkpoint_format)
    return qw.intweight, qw.scales, qw.zeros, None if g_idx is None else qw.g_idx


# bf16 activations from this many rows multiply bf16 tiles (`bf16_tiles`). SmolLM2 AWQ g64's 120 GEMMs
# per forward, 2 threads, AMX machine (2026-12-03), fp32 tiles + sgemm vs bf16 tiles + oneDNN, ms:
# M=33 82 vs 117, M=64 133 vs 133, M=128 231 vs 173, M=512 1013 vs 506, M=2048 3937 vs 1857.
BF16_TILES_MIN_ROWS = 128


# bf16 activations from this many rows (batched decode steps and prompt chunks) go through AMX tiles
# where the CPU has them (`amx_linear`): one SmolLM2 gate_up GEMM (3072 x 576, AWQ g64), 1 thread, AMX
# machine under load (2026-12-03), us: M=16 363 vs ~1500 for the fp32 kernel, M=64 889 (the fp32 path
# ~4400 with sgemm tiles); below, the int8 kernel (M <= 8) reads the weights at close to bandwidth.
AMX_MIN_ROWS = INT8_MAX_ROWS + 1


@functools.cache
def amx_supported() -> bool:
    """Whether this CPU and kernel offer AMX-BF16 tiles to the 4-bit kernels (asked once)."""
    _check_available()  # loads the library
    return bool(torch.ops.qserve_cpu.has_amx_bf16())


def amx_linear() -> bool:
    """Whether bf16 activations (from AMX_MIN_ROWS rows) multiply the 4-bit weights on AMX tiles: each
    block of 64 columns dequantized once per call to bf16 (the bf16 tiles' rounding) and multiplied with
    every row; QSERVE_CPU_BF16_TILES=0 turns it off with the oneDNN tiles."""
    return os.environ.get("QSERVE_CPU_BF16_TILES", "1") != "0" and amx_supported()


def bf16_tiles() -> bool:
    """Whether bf16 activations (from BF16_TILES_MIN_ROWS rows: prompt chunks) multiply bf16-rounded
    dequantized tiles with oneDNN's bf16 GEMM (this CPU has AVX512-BF16/AMX and QSERVE_CPU_BF16_TILES is
    not 0) rather than fp32 tiles with sgemm; the bf16 rounding of the weights is the dense bf16 path's."""
    return os.environ.get("QSERVE_CPU_BF16_TILES", "1") != "0" and onednn_bf16_supported()


@functools.cache
def onednn_bf16_supported() -> bool:
    """Whether torch was built with oneDNN and this CPU has its bf16 GEMMs (AVX512-BF16 or AMX); asked once."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without these ops
        return False


@dataclass(frozen=True)
class Plan:
    """What `linear` decides from the environment and the CPU (QSERVE_CPU_ISA, QSERVE_CPU_ACT_INT8,
    QSERVE_CPU_BF16_TILES): read once by a model's layers at their first call (`current_plan`), since
    reading the environment on every call cost a decode step ~10 us per layer."""

    isa: str  # isa_name()
    int8: bool  # int8_activations()
    amx: bool  # amx_linear()
    bf16_tiles: bool  # bf16_tiles()


def current_plan() -> Plan:
    """The plan the environment gives now."""
    _check_available()
    name = isa_name()
    return Plan(name, int8_activations(name), amx_linear(), bf16_tiles())


@functools.cache
def _ops():
    """The compiled ops' overloads, looked up once (each `torch.ops.ns.op` access costs ~1 us)."""
    _check_available()  # loads the library
    ops = torch.ops.qserve_cpu
    return ops.packed_linear_amx.default, ops.packed_linear_q8.default, ops.packed_linear.default


def kernel_path(x2: torch.Tensor, w: CpuPackedWeight, plan: Plan | None = None) -> str:
    """Which kernel `linear` runs for activations x2 [M, in]: "amx" (bf16 rows from AMX_MIN_ROWS, AMX
    tiles), "int8" (up to INT8_MAX_ROWS rows, int8 activations) or "fp32" (the fp32 kernels)."""
    plan = plan or current_plan()
    rows, k = x2.shape[0], x2.shape[-1]
    if plan.amx and x2.dtype == torch.bfloat16 and rows >= AMX_MIN_ROWS and k % 32 == 0:
        return "amx"
    if plan.int8 and rows <= INT8_MAX_ROWS and w.group_size % 4 == 0:
        return "int8"
    return "fp32"


KERNEL_CODES = {"fp32": 0, "int8": 1, "amx": 2}  # qserve_cpu::decode_step's `path`
_INT8, _AMX = KERNEL_CODES["int8"], KERNEL_CODES["amx"]


def _kernel(x2: torch.Tensor, w: CpuPackedWeight, plan: Plan) -> tuple[int, int, bool]:
    """(path code, ISA code, bf16 tiles): the one decision `linear` and the C++ decode step both apply, so
    the two cannot drift apart (the decode step must stay bit-identical to the module path)."""
    path = kernel_path(x2, w, plan)
    isa = _Q8_CODES[plan.isa] if path == "int8" else _ISA_CODES[plan.isa]
    tiles = x2.dtype == torch.bfloat16 and x2.shape[0] >= BF16_TILES_MIN_ROWS and plan.bf16_tiles
    return KERNEL_CODES[path], isa, tiles


def kernel_args(x2: torch.Tensor, w: CpuPackedWeight, plan: Plan) -> tuple[int, int, bool]:
    """(path code, ISA code, bf16 tiles) of the kernel `linear` runs for x2 [M, in], as the C++ decode step
    takes them (kernels/csrc/decode_step.cpp)."""
    return _kernel(x2, w, plan)


def linear(x: torch.Tensor, w: CpuPackedWeight, plan: Plan | None = None) -> torch.Tensor:
    """x [..., in] (fp32 or bf16) @ W'^T -> [..., out] in x's dtype, accumulated in fp32. `plan`: the
    decisions to apply (default: what the environment says now)."""
    k = w.qdata.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; this 4-bit layer takes {k}")
    flat = x.dim() == 2  # the engine's case: no reshape or view (a few microseconds each, per layer)
    x2 = x if flat else x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    amx_op, q8_op, fp32_op = _ops()
    path, isa, tiles = _kernel(x2, w, plan or current_plan())
    args = (x2, w.qdata, w.scales, w.zeros, w.perm, w.out_features, w.group_size)
    if path == _AMX:
        y = amx_op(*args)
    elif path == _INT8:
        y = q8_op(*args, isa)
    else:
        y = fp32_op(*args, isa, tiles)
    return y if flat else y.view(*x.shape[:-1], w.out_features)


def linear_int8(x: torch.Tensor, w: CpuPackedWeight, body: str | None = None) -> torch.Tensor:
    """x [..., in] @ W'^T through the int8-activation kernel at any row count, whatever QSERVE_CPU_ACT_INT8
    says; body: "avx512_vnni", "avx2" or "scalar" (default: the one QSERVE_CPU_ISA selects)."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features; this 4-bit layer takes {w.in_features}")
    code = _q8_isa()
    if body is not None:
        codes = {v: k for k, v in Q8_BODIES.items()}
        if body not in codes:
            raise ValueError(f"body={body!r} is not one of {', '.join(codes)}")
        code = codes[body]
    x2 = x.reshape(-1, w.in_features).contiguous()
    y = torch.ops.qserve_cpu.packed_linear_q8(
        x2, w.qdata, w.scales, w.zeros, w.perm, w.out_features, w.group_size, code
    )
    return y.view(*x.shape[:-1], w.out_features)


def quantize_activations(x: torch.Tensor, w: CpuPackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q int8 [M, in], scales fp32 [M, in / block]) as the int8 kernel quantizes x [M, in] for w, in w's
    resident input order (permuted for act-order); x_q * scale (per block) is what it multiplies."""
    _check_available()
    return torch.ops.qserve_cpu.quantize_activations_q8(x.contiguous(), w.perm, w.group_size)


def dequantize(w: CpuPackedWeight) -> torch.Tensor:
    """W' [out, in] float32 in the checkpoint's input order, computed by the C++ tile dequantizer (the one
    the prefill path multiplies with)."""
    isa = _isa()
    t = torch.ops.qserve_cpu.packed_dequantize(w.qdata, w.scales, w.zeros, w.out_features, w.group_size, isa)
    dense = t.t()  # [out, K] in resident order
    if w.perm is None:
        return dense.contiguous()
    out = torch.empty_like(dense)
    out[:, w.perm] = dense
    return out


def linear_bf16_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] (fp32 or bf16) @ weight^T for a bf16 weight [N, K], fp32 accumulation, in x's dtype."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features; this bf16 weight takes {weight.shape[1]}")
    x2 = x.reshape(-1, weight.shape[1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    isa = _isa()
    y = torch.ops.qserve_cpu.linear_bf16w(x2, weight, isa)
    return y.view(*x.shape[:-1], weight.shape[0])
