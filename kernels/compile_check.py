"""Compile every Triton kernel the engine can launch for real NVIDIA targets, without a GPU.

    python -m qserve.kernels.compile_check --arch 80,89,90 [--subset ci|full] [--json OUT] [--md OUT]

Each variant (a kernel with one set of constexprs, num_warps and num_stages, exactly as the wrappers in
`triton_gemm` / `triton_attention` / `triton_moe` launch it) goes through `triton.compile` for `GPUTarget("cuda", arch,
32)`: Triton's own passes, then the `ptxas` bundled with the triton wheel. The cubin is read back with
the bundled `cuobjdump` (`-res-usage`: registers, stack, local memory; `-sass`: the machine code).

A variant fails on: a compile error; a spill (a stack frame, local memory, or LDL/STL instructions in
the SASS); shared memory (Triton's dynamic allocation plus static) over the architecture's per-block
limit; or, for a GEMM or attention kernel, no tensor-core (MMA) instruction in the SASS. Exit status 1
when any variant fails, 2 on bad arguments or missing tools, 0 otherwise.

Nothing is launched, so a CPU-only torch is enough. Compiled kernels land in Triton's cache
(~/.triton/cache or $TRITON_CACHE_DIR), so a second run over unchanged kernels is fast.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Maximum shared memory one block may use (the opt-in limit, cudaDevAttrMaxSharedMemoryPerBlockOptin),
# from the CUDA C Programming Guide's table of compute-capability limits: A100 163 KiB, A10/L4/L40/RTX
# 4090 99 KiB, H100/H200 227 KiB, B200 227 KiB.
SMEM_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
ARCH_NAMES = {80: "A100", 86: "A10/RTX 30xx", 89: "L4/L40/RTX 4090", 90: "H100/H200", 100: "B200"}
DEFAULT_ARCHS = (80, 89, 90)

# Tensor-core instructions: HMMA/IMMA (mma.sync, sm_80+), HGMMA/IGMMA/QGMMA (wgmma, sm_90a),
# UTC*MMA (tcgen05, sm_100a).
_MMA_RE = re.compile(r"\b((?:UTC)?[HIQDBO]G?MMA)(\.[A-Za-z0-9_.]+)?")
_LOCAL_RE = re.compile(r"\b(LDL|STL)(\.[A-Z0-9.]+)?\b")
_RES_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")

DTYPES = ("fp16", "bf16")
HEAD_DIMS = (64, 128)
GQA_RATIOS = (1, 4, 8)
KV_HEADS = 8  # GQA ratio r: 8 kv heads and 8 * r query heads (Llama-3-8B is r = 4)
SMOLLM2_HEADS = (9, 3, 64)  # the embedded model: 9 query heads, 3 kv heads, head dim 64


@dataclass
class Variant:
    """One compilation: kernel name, arch, runtime-arg types, constexprs and launch options."""

    kernel: str  # the @triton.jit function's name
    family: str  # what the engine uses it for: gemm-split-k, gemm-tiled, dequant, attention-decode, ...
    arch: int
    label: str  # the parameters that distinguish this variant, for people
    types: dict[str, str]  # runtime argument -> Triton type ("*bf16", "i32", "fp32")
    constexprs: dict[str, object]  # constexpr argument -> value ("tl.bfloat16" strings for tl dtypes)
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple[str, ...] = ()  # runtime args specialised as multiples of 16 (as launches see them)
    needs_mma: bool = False

    @property
    def id(self) -> str:
        return f"sm_{self.arch}/{self.kernel}/{self.label}/w{self.num_warps}s{self.num_stages}"


@dataclass
class Result:
    id: str
    kernel: str
    family: str
    arch: int
    label: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    local_ops: int | None = None  # LDL/STL instructions in the SASS
    shared_bytes: int | None = None  # dynamic (Triton) + static
    smem_limit: int = 0
    mma: dict[str, int] = field(default_factory=dict)
    needs_mma: bool = False
    seconds: float = 0.0
    error: str | None = None
    failures: list[str] = field(default_factory=list)


# ---- parsing ---------------------------------------------------------------------------------------


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump -res-usage` output -> {function: {"REG", "STACK", "SHARED", "LOCAL"}}."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Function ") and stripped.endswith(":"):
            current = stripped[len("Function ") : -1].strip()
            continue
        if current is not None and "REG:" in stripped:
            usage[current] = {k: int(v) for k, v in _RES_RE.findall(stripped)}
            current = None
    return usage


def parse_sass(text: str) -> tuple[Counter, int]:
    """`cuobjdump -sass` output -> (tensor-core opcodes with their shape/type suffix: count, LDL/STL count)."""
    mma: Counter = Counter()
    local_ops = 0
    for line in text.splitlines():
        if "/*" not in line:  # instruction lines carry the address comment /*0a30*/
            continue
        code = line.split("*/", 1)[-1].split(";", 1)[0]
        for op, suffix in _MMA_RE.findall(code):
            mma[op + suffix] += 1
        local_ops += len(_LOCAL_RE.findall(code))
    return mma, local_ops


def judge(r: Result) -> list[str]:
    """The failure rules; an empty list means the variant passes."""
    if r.error is not None:
        return [f"compile error: {r.error}"]
    out = []
    if (r.stack_bytes or 0) > 0 or (r.local_bytes or 0) > 0 or (r.local_ops or 0) > 0:
        out.append(
            f"spills: {r.stack_bytes} B stack, {r.local_bytes} B local, {r.local_ops} LDL/STL "
            f"at {r.registers} registers"
        )
    if r.shared_bytes is not None and r.shared_bytes > r.smem_limit:
        out.append(
            f"shared memory {r.shared_bytes} B over sm_{r.arch}'s per-block limit of {r.smem_limit} B"
        )
    if r.needs_mma and not r.mma:
        out.append("no tensor-core (MMA) instruction in the SASS")
    return out


# ---- the variant matrix ----------------------------------------------------------------------------


def _gemm_formats(subset: str) -> list[tuple[str, int, bool]]:
    """(fmt, bits, act_order) combinations: every one changes the weight-decode code."""
    if subset == "ci":
        return [("awq", 4, False), ("gptq", 4, True)]
    return [("awq", 4, False), ("gptq", 4, False), ("gptq", 4, True), ("gptq", 8, False)]


def gemm_variants(arch: int, subset: str) -> list[Variant]:
    import triton.language as tl  # noqa: F401  (the dtype names below are resolved in the worker)

    from qserve.kernels import triton_gemm

    variants = []
    formats = _gemm_formats(subset)
    dtypes = DTYPES if subset == "full" else ("bf16",)
    for dname in dtypes:
        for fmt, bits, act_order in formats:
            # 128: one group per K tile (scales load once per tile) for BLOCK_K <= 128; 32: a group
            # boundary inside every tile (per-row scales), the path of SmolLM2's g64 with BLOCK_K 128.
            # GPTQ shares that group code (only the unpacking differs), and with act-order every row
            # is gathered through g_idx, so GPTQ variants use 128 alone.
            groups = (128, 32) if fmt == "awq" else (128,)
            if subset == "ci":
                groups = groups[:1]
            for group in groups:
                consts = triton_gemm._format_constants(
                    fmt, bits, group, 4096, object() if act_order else None, "gptq"
                )
                base = {**consts, "DOT_DTYPE": f"tl.{_tl_name(dname)}", "DOT_PRECISION": "tf32"}
                types = {
                    "x_ptr": f"*{dname}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                    # the wrapper passes scales as the unused g_idx / bias pointers
                    "g_idx_ptr": "*i32" if act_order else "*fp16", "bias_ptr": "*fp16",
                    "out_ptr": f"*{dname}", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
                }  # fmt: skip
                fmt_label = f"{fmt}{bits}{'-actorder' if act_order else ''}-g{group}-{dname}"
                for split_family in (True, False):
                    configs = triton_gemm.autotune_configs(split_family, arch)
                    if subset == "ci":
                        configs = configs[:1] if split_family else configs[-1:]
                    # HAS_BIAS only changes the tiled family's epilogue (split-K adds the bias after the
                    # reduction): crossed with every tiled config, for one format per dtype
                    biases = (False,) if split_family else (False, True) if fmt_label.startswith("awq4-g128") else (False,)
                    if subset == "ci" and not split_family:
                        biases = (True,)
                    # Triton specialises an integer argument equal to 1 as a constant, so a batch-1
                    # decode (M = M_BUCKET = 1) runs its own compiled kernel: the split-K family
                    # compiles both that and the general M
                    rows = ("m1", "m") if split_family and subset == "full" else ("m",)
                    for cfg, bias, m_kind in ((c, b, r) for c in configs for b in biases for r in rows):
                        kw = cfg.kwargs
                        t = dict(types)
                        t["bias_ptr"] = f"*{dname}" if bias else "*fp16"
                        m_consts = {}
                        if m_kind == "m1":
                            del t["M"], t["M_BUCKET"]
                            m_consts = {"M": 1, "M_BUCKET": 1}
                        if split_family:
                            t["out_ptr"] = "*fp32"  # partial sums go to the fp32 buffer
                        shape = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-sk{kw['SPLIT_K']}"
                        variants.append(Variant(
                            kernel="_dequant_gemm_kernel",
                            family="gemm-split-k" if split_family else "gemm-tiled",
                            arch=arch, types=t,
                            label=f"{fmt_label}-{shape}{'-bias' if bias else ''}{'-M1' if m_consts else ''}",
                            constexprs={**base, "HAS_BIAS": bias, **kw, **m_consts},
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            divisible=("x_ptr", "qweight_ptr", "qzeros_ptr", "scales_ptr", "g_idx_ptr",
                                       "bias_ptr", "out_ptr", "N", "K"),
                            needs_mma=True,
                        ))  # fmt: skip
                # the dequantize + cuBLAS path (> FUSED_MAX_TOKENS rows): no dot, so no MMA expected
                variants.append(Variant(
                    kernel="_dequant_kernel", family="dequant", arch=arch, label=f"{fmt_label}-64x64",
                    types={k: types[k] for k in ("qweight_ptr", "qzeros_ptr", "scales_ptr", "g_idx_ptr")}
                    | {"out_ptr": f"*{dname}", "K": "i32", "N": "i32"},
                    constexprs={**consts, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3,
                    divisible=("qweight_ptr", "qzeros_ptr", "scales_ptr", "g_idx_ptr", "out_ptr", "K", "N"),
                ))  # fmt: skip
    return variants


def _tl_name(dname: str) -> str:
    return {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dname]


def _head_layouts(subset: str) -> list[tuple[int, int, int]]:
    """(query heads, kv heads, head dim) layouts: GQA ratios 1/4/8 at both head dims, plus SmolLM2's."""
    if subset == "ci":
        return [(32, KV_HEADS, 128), SMOLLM2_HEADS]
    layouts = [(KV_HEADS * r, KV_HEADS, d) for d in HEAD_DIMS for r in GQA_RATIOS]
    return [*layouts, SMOLLM2_HEADS]


def attention_variants(arch: int, subset: str) -> list[Variant]:
    from qserve.kernels import triton_attention as ta

    variants = []
    dtypes = DTYPES if subset == "full" else ("fp16",)
    aligned = ("q_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr", "out_ptr")
    for dname in dtypes:
        dot = {"DOT_DTYPE": f"tl.{_tl_name(dname)}", "DOT_PRECISION": "tf32"}
        for heads, kv_heads, dim in _head_layouts(subset):
            layout = f"h{heads}-kv{kv_heads}-d{dim}-{dname}"
            variants.append(Variant(
                kernel="_write_kv_kernel", family="kv-write", arch=arch, label=layout,
                types={"key_ptr": f"*{dname}", "value_ptr": f"*{dname}", "key_cache_ptr": f"*{dname}",
                       "value_cache_ptr": f"*{dname}", "slot_ptr": "*i64"},
                constexprs=ta.write_kv_meta(kv_heads, dim), num_warps=4, num_stages=3,
                divisible=("key_ptr", "value_ptr", "key_cache_ptr", "value_cache_ptr", "slot_ptr"),
            ))  # fmt: skip
            # The cache block size enters only the index arithmetic (a shift and a mask per key): every
            # accepted size is crossed with the GQA-4 d128 layout and SmolLM2's; the others use 16.
            crossed = subset == "full" and (heads, kv_heads, dim) in ((4 * KV_HEADS, KV_HEADS, 128), SMOLLM2_HEADS)
            for bs in ta.BLOCK_SIZES if crossed else (16,):
                for splits in (1, 4):
                    part = "*fp32" if splits > 1 else f"*{dname}"
                    variants.append(Variant(
                        kernel="_decode_kernel", family="attention-decode", arch=arch,
                        label=f"{layout}-bs{bs}-splits{splits}",
                        types={"q_ptr": f"*{dname}", "k_cache_ptr": f"*{dname}", "v_cache_ptr": f"*{dname}",
                               "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": f"*{dname}",
                               "part_acc_ptr": part, "part_ml_ptr": part, "scale": "fp32", "max_blocks": "i32",
                               "window": "i32"},
                        constexprs={**ta.decode_meta(heads, kv_heads, dim, bs, splits), **dot},
                        num_warps=4, num_stages=3, divisible=(*aligned, "part_acc_ptr", "part_ml_ptr"),
                        needs_mma=True,
                    ))  # fmt: skip
                for max_q in (16, 512):  # BLOCK_M 16 (short chunks) and 64
                    variants.append(Variant(
                        kernel="_prefill_kernel", family="attention-prefill", arch=arch,
                        label=f"{layout}-bs{bs}-bm{ta.prefill_meta(heads, kv_heads, dim, bs, max_q, True)['BLOCK_M']}",
                        types={"q_ptr": f"*{dname}", "k_cache_ptr": f"*{dname}", "v_cache_ptr": f"*{dname}",
                               "block_tables_ptr": "*i32", "query_start_ptr": "*i32", "seq_lens_ptr": "*i32",
                               "out_ptr": f"*{dname}", "scale": "fp32", "max_blocks": "i32", "window": "i32"},
                        constexprs={**ta.prefill_meta(heads, kv_heads, dim, bs, max_q, True), **dot},
                        num_warps=4, num_stages=3, divisible=(*aligned, "query_start_ptr"), needs_mma=True,
                    ))  # fmt: skip
        for dim in HEAD_DIMS:
            for splits in (4, 16) if subset == "full" else (4,):
                variants.append(Variant(
                    kernel="_combine_splits_kernel", family="attention-combine", arch=arch,
                    label=f"d{dim}-splits{splits}-{dname}",
                    types={"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": f"*{dname}"},
                    constexprs=ta.combine_meta(dim, splits), num_warps=4, num_stages=3,
                    divisible=("part_acc_ptr", "part_ml_ptr", "out_ptr"),
                ))  # fmt: skip
    return variants


# Layouts of the sliding-window families (query heads, kv heads, head dim): Mistral-7B-v0.1, Gemma 3 1B,
# 4B and 27B. Gemma 3's 256-dim heads are also compiled without the window (its global layers).
WINDOW_LAYOUTS = ((32, 8, 128), (4, 1, 256), (8, 4, 256), (32, 16, 128))


def window_variants(arch: int, subset: str) -> list[Variant]:
    """Attention with SLIDING on (and the 256-dim head layouts with it off), block size 16."""
    from qserve.kernels import triton_attention as ta

    variants = []
    dtypes = DTYPES if subset == "full" else ("bf16",)
    layouts = WINDOW_LAYOUTS if subset == "full" else WINDOW_LAYOUTS[2:3]
    aligned = ("q_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr", "out_ptr")
    for dname in dtypes:
        dot = {"DOT_DTYPE": f"tl.{_tl_name(dname)}", "DOT_PRECISION": "tf32"}
        for heads, kv_heads, dim in layouts:
            for sliding in (True, False) if dim > 128 else (True,):
                layout = f"h{heads}-kv{kv_heads}-d{dim}-{dname}{'-sliding' if sliding else ''}"
                for splits in (1, 4):
                    part = "*fp32" if splits > 1 else f"*{dname}"
                    variants.append(Variant(
                        kernel="_decode_kernel", family="attention-decode-window", arch=arch,
                        label=f"{layout}-bs16-splits{splits}",
                        types={"q_ptr": f"*{dname}", "k_cache_ptr": f"*{dname}", "v_cache_ptr": f"*{dname}",
                               "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "out_ptr": f"*{dname}",
                               "part_acc_ptr": part, "part_ml_ptr": part, "scale": "fp32", "max_blocks": "i32",
                               "window": "i32"},
                        constexprs={**ta.decode_meta(heads, kv_heads, dim, 16, splits, sliding), **dot},
                        num_warps=4, num_stages=3, divisible=(*aligned, "part_acc_ptr", "part_ml_ptr"),
                        needs_mma=True,
                    ))  # fmt: skip
                for max_q in (16, 512):
                    meta = ta.prefill_meta(heads, kv_heads, dim, 16, max_q, True, sliding)
                    variants.append(Variant(
                        kernel="_prefill_kernel", family="attention-prefill-window", arch=arch,
                        label=f"{layout}-bs16-bm{meta['BLOCK_M']}",
                        types={"q_ptr": f"*{dname}", "k_cache_ptr": f"*{dname}", "v_cache_ptr": f"*{dname}",
                               "block_tables_ptr": "*i32", "query_start_ptr": "*i32", "seq_lens_ptr": "*i32",
                               "out_ptr": f"*{dname}", "scale": "fp32", "max_blocks": "i32", "window": "i32"},
                        constexprs={**meta, **dot}, num_warps=ta.prefill_warps(dim), num_stages=3,
                        divisible=(*aligned, "query_start_ptr"), needs_mma=True,
                    ))  # fmt: skip
        if subset == "full":  # the split merge at head dim 256 (64 and 128 are in attention_variants)
            for splits in (4, 16):
                variants.append(Variant(
                    kernel="_combine_splits_kernel", family="attention-combine-window", arch=arch,
                    label=f"d256-splits{splits}-{dname}",
                    types={"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": f"*{dname}"},
                    constexprs=ta.combine_meta(256, splits), num_warps=4, num_stages=3,
                    divisible=("part_acc_ptr", "part_ml_ptr", "out_ptr"),
                ))  # fmt: skip
    return variants


def moe_variants(arch: int, subset: str) -> list[Variant]:
    """The fused MoE dequant-GEMM (kernels/triton_moe.py): both launch configurations, each in its two
    roles (gate|up: rows gathered per token; down: rows per pair, routing weights in the epilogue)."""
    from qserve.kernels import triton_gemm, triton_moe

    variants = []
    dtypes = DTYPES if subset == "full" else ("bf16",)
    formats = [(f, b, a, g) for f, b, a in _gemm_formats(subset) for g in ((128, 32) if f == "awq" else (128,))]
    if subset == "ci":
        formats = [(f, b, a, 128) for f, b, a in _gemm_formats(subset)]
    roles = {"gateup": (False, False), "down": (True, True)}  # A_PER_PAIR, MUL_WEIGHT
    for dname in dtypes:
        for fmt, bits, act_order, group in formats:
            consts = triton_gemm._format_constants(fmt, bits, group, 4096, object() if act_order else None, "gptq")
            fmt_label = f"{fmt}{bits}{'-actorder' if act_order else ''}-g{group}-{dname}"
            for size, cfg in triton_moe.MOE_CONFIGS.items():
                for role, (per_pair, mul_weight) in roles.items():
                    if subset == "ci" and (size == "small") != (role == "gateup"):
                        continue  # ci: the small tiles as gate|up, the large ones as down
                    variants.append(Variant(
                        kernel="_fused_moe_kernel", family=f"moe-{size}", arch=arch,
                        label=f"{fmt_label}-{size}-{role}",
                        types={
                            "a_ptr": f"*{dname}", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                            "g_idx_ptr": "*i32" if act_order else "*fp16", "out_ptr": f"*{dname}",
                            # the wrapper passes the fp32 routing weights to down, the scales (unused) to gate|up
                            "topk_weights_ptr": "*fp32" if mul_weight else "*fp16",
                            "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
                            "N": "i32", "K": "i32", "num_pairs": "i32", "num_m_blocks": "i32", "stride_qw": "i32",
                            "stride_qz": "i32", "stride_s": "i32", "stride_g": "i32",
                        },
                        constexprs={
                            **consts, "DOT_DTYPE": f"tl.{_tl_name(dname)}", "DOT_PRECISION": "tf32",
                            "TOP_K": 8, "A_PER_PAIR": per_pair, "MUL_WEIGHT": mul_weight,
                            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": 8,
                        },
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        divisible=("a_ptr", "qweight_ptr", "qzeros_ptr", "scales_ptr", "g_idx_ptr", "out_ptr",
                                   "topk_weights_ptr", "sorted_ids_ptr", "expert_ids_ptr", "N", "K",
                                   "stride_qw", "stride_qz", "stride_s", "stride_g"),
                        needs_mma=True,
                    ))  # fmt: skip
    return variants


def all_variants(archs: list[int], subset: str, kernels: set[str] | None = None) -> list[Variant]:
    out = []
    for arch in archs:
        out += (gemm_variants(arch, subset) + attention_variants(arch, subset) + moe_variants(arch, subset)
                + window_variants(arch, subset))
    if kernels:
        out = [v for v in out if v.kernel in kernels or v.family in kernels]
    return out


# ---- compiling one variant (runs in a worker process) ---------------------------------------------


def tool_path(name: str) -> str:
    """A CUDA binary shipped in the triton wheel (triton/backends/nvidia/bin), else from PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found in the triton wheel ({bundled.parent}) or on PATH; install triton>=3.3"
        )
    return found


def _kernel_fn(name: str):
    from qserve.kernels import triton_attention, triton_gemm, triton_moe

    for module in (triton_gemm, triton_attention, triton_moe):
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    raise KeyError(f"no Triton kernel named {name}")


def _source(v: Variant):
    import triton.language as tl
    from triton.compiler import ASTSource

    fn = _kernel_fn(v.kernel)
    names = list(fn.arg_names)
    missing = set(names) - set(v.types) - set(v.constexprs)
    unknown = (set(v.types) | set(v.constexprs)) - set(names)
    if missing or unknown:
        raise ValueError(f"{v.kernel}: arguments missing {sorted(missing)}, unknown {sorted(unknown)}")
    consts = {k: getattr(tl, val[3:]) if isinstance(val, str) and val.startswith("tl.") else val
              for k, val in v.constexprs.items()}  # fmt: skip
    signature = {n: v.types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in v.divisible}
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def compile_variant(v: Variant) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    r = Result(v.id, v.kernel, v.family, v.arch, v.label, v.num_warps, v.num_stages,
               smem_limit=SMEM_LIMITS[v.arch], needs_mma=v.needs_mma)  # fmt: skip
    start = time.perf_counter()
    try:
        k = triton.compile(
            _source(v), target=GPUTarget("cuda", v.arch, 32),
            options={"num_warps": v.num_warps, "num_stages": v.num_stages},
        )  # fmt: skip
    except Exception as e:  # the compiler's own message is the report
        r.error = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
        r.seconds = round(time.perf_counter() - start, 2)
        r.failures = judge(r)
        return r
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{v.kernel}.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = _run([tool_path("cuobjdump"), "-res-usage", str(cubin)])
        sass = _run([tool_path("cuobjdump"), "-sass", str(cubin)])
    usage = parse_res_usage(res).get(v.kernel)
    if usage is None:
        r.error = f"cuobjdump -res-usage names no function {v.kernel}: {res[-500:]}"
    else:
        r.registers, r.stack_bytes, r.local_bytes = usage.get("REG"), usage.get("STACK"), usage.get("LOCAL")
        r.shared_bytes = int(k.metadata.shared) + usage.get("SHARED", 0)
        mma, r.local_ops = parse_sass(sass)
        r.mma = dict(sorted(mma.items()))
    r.seconds = round(time.perf_counter() - start, 2)
    r.failures = judge(r)
    return r


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


# ---- driver ----------------------------------------------------------------------------------------


def run_check(variants: list[Variant], jobs: int, progress=None) -> list[Result]:
    """Compile all variants in `jobs` worker processes; results in the variants' order."""
    results: list[Result | None] = [None] * len(variants)
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(compile_variant, v): i for i, v in enumerate(variants)}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as e:  # a crashed worker is a failure of that variant, never a hang
                v = variants[i]
                r = Result(v.id, v.kernel, v.family, v.arch, v.label, v.num_warps, v.num_stages,
                           smem_limit=SMEM_LIMITS[v.arch], needs_mma=v.needs_mma,
                           error=f"{type(e).__name__}: {e}")  # fmt: skip
                r.failures = judge(r)
                results[i] = r
            if progress is not None:
                progress(done, len(variants), results[i])
    return [r for r in results if r is not None]


def _progress_line(done: int, total: int, r: Result) -> None:
    status = "ok" if not r.failures else "FAIL " + "; ".join(f[:120] for f in r.failures)
    smem = "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.0f}K"
    mma = ",".join(sorted({m.split(".")[0] for m in r.mma})) or "-"
    print(
        f"[{done:4d}/{total}] sm_{r.arch} {r.kernel:<22} {r.label:<44} w{r.num_warps}s{r.num_stages} "
        f"reg {r.registers} smem {smem} mma {mma} {r.seconds:5.1f}s {status}",
        flush=True,
    )


def summary(results: list[Result]) -> dict:
    failed = [r for r in results if r.failures]
    spills = [r for r in results if r.error is None and any(f.startswith("spills") for f in r.failures)]
    by_arch: dict[str, dict] = {}
    for r in results:
        a = by_arch.setdefault(f"sm_{r.arch}", {"variants": 0, "failures": 0, "max_registers": 0,
                                                 "max_shared_bytes": 0, "smem_limit": r.smem_limit,
                                                 "mma": Counter()})  # fmt: skip
        a["variants"] += 1
        a["failures"] += bool(r.failures)
        a["max_registers"] = max(a["max_registers"], r.registers or 0)
        a["max_shared_bytes"] = max(a["max_shared_bytes"], r.shared_bytes or 0)
        a["mma"].update({m.split(".")[0]: 1 for m in r.mma})
    for a in by_arch.values():
        a["mma"] = dict(a["mma"])  # variants using each tensor-core opcode
    return {
        "variants": len(results),
        "failures": len(failed),
        "compile_errors": sum(r.error is not None for r in results),
        "spills": len(spills),
        "smem_over_limit": sum(any(f.startswith("shared memory") for f in r.failures) for r in results),
        "missing_mma": sum(any(f.startswith("no tensor-core") for f in r.failures) for r in results),
        "by_arch": by_arch,
    }


def _commit() -> str | None:
    """HEAD, with "+dirty" when the Triton kernels or this check have uncommitted changes (the figures
    are then not HEAD's)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here)
        files = ["triton_gemm.py", "triton_attention.py", "triton_moe.py", "triton_common.py", "compile_check.py"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], capture_output=True, text=True,
                               check=True, cwd=here)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def markdown(report: dict) -> str:
    """A per-variant table (one row per compiled variant) under a per-arch summary."""
    s = report["summary"]
    lines = [
        "# Compile check: every engine Triton kernel for real NVIDIA targets",
        "",
        f"`{report['command']}` at commit `{report['commit']}` ({report['date']}, triton "
        f"{report['triton']}, ptxas from the triton wheel; no GPU involved).",
        "",
        f"{s['variants']} variants, {s['failures']} failures ({s['compile_errors']} compile errors, "
        f"{s['spills']} with spills, {s['smem_over_limit']} over the shared-memory limit, "
        f"{s['missing_mma']} GEMM/attention variants without tensor-core instructions).",
        "",
        "| arch | variants | failures | max registers | max shared memory | per-block limit | tensor-core opcodes (variants) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, a in s["by_arch"].items():
        mma = ", ".join(f"{k} ({v})" for k, v in sorted(a["mma"].items())) or "-"
        lines.append(
            f"| {arch} | {a['variants']} | {a['failures']} | {a['max_registers']} | "
            f"{a['max_shared_bytes'] / 1024:.1f} KiB | {a['smem_limit'] // 1024} KiB | {mma} |"
        )
    excluded = report.get("excluded_autotune_shapes") or {}
    if excluded:
        lines += ["", "Autotune candidates left out per architecture (kernels/triton_gemm.py ARCH_EXCLUDED_SHAPES):", ""]
        lines += [f"- sm_{arch}: {', '.join(shapes)}" for arch, shapes in excluded.items()]
    lines += [
        "",
        "Per variant (registers per thread; stack/local bytes and LDL/STL count are spills; shared memory "
        "is Triton's dynamic allocation plus static; s is compile + disassembly wall time on a shared CPU, "
        "Triton's cache may have served the compile):",
        "",
        "| arch | kernel | variant | warps/stages | regs | spill (stack/local/ops) | smem KiB | MMA instructions | s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mma = ", ".join(f"{k} x{v}" for k, v in r["mma"].items()) or "-"
        smem = "-" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1024:.1f}"
        status = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])[:200]
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['label']} | {r['num_warps']}/{r['num_stages']} | "
            f"{r['registers']} | {r['stack_bytes']}/{r['local_bytes']}/{r['local_ops']} | {smem} | {mma} | "
            f"{r['seconds']} | {status} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m qserve.kernels.compile_check",
        description="Compile every engine Triton kernel for NVIDIA targets (no GPU needed) and check "
        "registers, spills, shared memory and tensor-core use.",
    )
    p.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                   help=f"compute capabilities, comma separated (known: {', '.join(map(str, SMEM_LIMITS))})")
    p.add_argument("--subset", choices=("ci", "full"), default="full",
                   help="ci: a few representative variants per arch; full: the whole matrix")
    p.add_argument("--kernels", default="", help="only these kernels or families, comma separated")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--md", type=Path, help="write the per-variant table here (Markdown)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    return p.parse_args(argv)  # fmt: skip


def _parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.split(","):
        part = part.strip().removeprefix("sm_")
        if not part.isdigit() or int(part) not in SMEM_LIMITS:
            raise ValueError(
                f"--arch {part!r} is not a known compute capability; use some of "
                f"{', '.join(map(str, SMEM_LIMITS))} (e.g. --arch 80,89,90)"
            )
        archs.append(int(part))
    return archs


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        archs = _parse_archs(args.arch)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        tool_path("cuobjdump")
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    kernels = {k.strip() for k in args.kernels.split(",") if k.strip()} or None
    variants = all_variants(archs, args.subset, kernels)
    if not variants:
        print(f"compile_check: no variant matches --kernels {args.kernels!r}", file=sys.stderr)
        return 2
    if args.list:
        for v in variants:
            print(v.id)
        return 0
    print(f"compiling {len(variants)} variants for {', '.join(f'sm_{a}' for a in archs)} "
          f"with {args.jobs} worker(s)", flush=True)  # fmt: skip
    start = time.perf_counter()
    results = run_check(variants, args.jobs, progress=_progress_line)
    import triton

    from qserve.kernels import triton_gemm

    report = {
        "command": "python -m qserve.kernels.compile_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "triton": triton.__version__,
        "archs": archs,
        "subset": args.subset,
        "smem_limits": {f"sm_{a}": SMEM_LIMITS[a] for a in archs},
        "excluded_autotune_shapes": {
            str(a): ["x".join(map(str, s)) for s in sorted(triton_gemm.ARCH_EXCLUDED_SHAPES.get(a, ()))]
            for a in archs if triton_gemm.ARCH_EXCLUDED_SHAPES.get(a)
        },
        "wall_seconds": round(time.perf_counter() - start, 1),
        "summary": summary([r for r in results]),
        "results": [asdict(r) for r in results],
    }  # fmt: skip
    s = report["summary"]
    print(f"{s['variants']} variants in {report['wall_seconds']} s: {s['failures']} failures "
          f"({s['compile_errors']} compile errors, {s['spills']} spills, {s['smem_over_limit']} over shared "
          f"memory, {s['missing_mma']} without tensor cores)")  # fmt: skip
    for r in results:
        for f in r.failures:
            print(f"FAIL {r.id}: {f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(report))
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
