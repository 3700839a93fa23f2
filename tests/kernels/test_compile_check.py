"""The compile check: real Triton + ptxas compilation for sm_80 / sm_90 on this CPU machine, and the
parsing and failure rules it applies to the cubins."""

from __future__ import annotations

import json

import pytest

triton = pytest.importorskip("triton")

from qserve.kernels import compile_check as cc  # noqa: E402

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _dequant_gemm_kernel:
  REG:255 STACK:40 SHARED:1024 LOCAL:0 CONSTANT[0]:440 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other_kernel:
  REG:32 STACK:0 SHARED:0 LOCAL:16 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
        code for sm_90a
                Function : _dequant_gemm_kernel
        /*2c30*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4].tnspB, R24 ;   /* 0x43e00000041879f0 */
        /*2c80*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0 ; /* 0x43e0 */
        /*2d00*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;                  /* 0x000000100c08723c */
        /*3300*/                   STL [R1+0x18], R7 ;                                     /* 0x0000180701007387 */
        /*3310*/                   LDL.64 R4, [R1+0x18] ;                                  /* 0x0000180701007387 */
        /*3320*/                   IMAD R2, R3, R4, RZ ;                                   /* 0x0000000403027224 */
"""


def test_parse_res_usage_reads_every_function():
    usage = cc.parse_res_usage(RES_USAGE)
    assert usage["_dequant_gemm_kernel"] == {"REG": 255, "STACK": 40, "SHARED": 1024, "LOCAL": 0}
    assert usage["other_kernel"]["LOCAL"] == 16


def test_parse_sass_counts_tensor_core_and_local_memory_instructions():
    mma, local_ops = cc.parse_sass(SASS)
    assert mma == {"HGMMA.64x256x16.F32.BF16": 2, "HMMA.16816.F32.BF16": 1}
    assert local_ops == 2
    assert cc.parse_sass("        /*0000*/  IMAD R1, R2, R3, RZ ; /* 0x0 */\n") == ({}, 0)


def _result(**kw) -> cc.Result:
    base = dict(id="x", kernel="k", family="gemm-tiled", arch=90, label="l", num_warps=4, num_stages=3,
                registers=128, stack_bytes=0, local_bytes=0, local_ops=0, shared_bytes=1024,
                smem_limit=cc.SMEM_LIMITS[90], mma={"HGMMA.64x64x16.F32.BF16": 1}, needs_mma=True)  # fmt: skip
    base.update(kw)
    return cc.Result(**base)


def test_failure_rules():
    assert cc.judge(_result()) == []
    assert cc.judge(_result(stack_bytes=40))[0].startswith("spills")
    assert cc.judge(_result(local_bytes=8))[0].startswith("spills")
    assert cc.judge(_result(local_ops=3))[0].startswith("spills")
    over = cc.judge(_result(arch=89, smem_limit=cc.SMEM_LIMITS[89], shared_bytes=147456))
    assert over == ["shared memory 147456 B over sm_89's per-block limit of 101376 B"]
    assert cc.judge(_result(shared_bytes=cc.SMEM_LIMITS[90])) == []  # the limit itself fits
    assert cc.judge(_result(mma={})) == ["no tensor-core (MMA) instruction in the SASS"]
    assert cc.judge(_result(mma={}, needs_mma=False, family="dequant")) == []
    assert cc.judge(_result(error="CompilationError: boom")) == ["compile error: CompilationError: boom"]
    assert len(cc.judge(_result(stack_bytes=8, mma={}))) == 2


def test_smem_limits_match_the_cuda_guide():
    assert cc.SMEM_LIMITS[80] == 163 * 1024  # A100: 166912 B opt-in per block
    assert cc.SMEM_LIMITS[89] == 99 * 1024  # Ada: 101376 B
    assert cc.SMEM_LIMITS[90] == 227 * 1024  # Hopper: 232448 B


def test_bad_arch_is_exit_2(capsys):
    assert cc.main(["--arch", "75"]) == 2
    assert "--arch '75' is not a known compute capability" in capsys.readouterr().err


def test_full_matrix_covers_what_the_engine_launches():
    from qserve.kernels import triton_attention, triton_gemm, triton_moe

    variants = cc.all_variants([80, 90], "full")
    ids = [v.id for v in variants]
    assert len(ids) == len(set(ids))
    for arch in (80, 90):
        gemm = [v for v in variants if v.arch == arch and v.kernel == "_dequant_gemm_kernel"]
        shapes = {(v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"], v.constexprs["BLOCK_K"],
                   v.constexprs["SPLIT_K"]) for v in gemm}  # fmt: skip
        expected = {tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
                    for family in (True, False) for c in triton_gemm.autotune_configs(family, arch)}  # fmt: skip
        assert shapes == expected  # every autotune candidate of this arch, no other
        assert {v.constexprs["DOT_DTYPE"] for v in gemm} == {"tl.float16", "tl.bfloat16"}
        assert {(v.constexprs["AWQ"], v.constexprs["ACT_ORDER"], v.constexprs["HAS_BIAS"]) for v in gemm} >= {
            (True, False, False), (True, False, True), (False, True, False), (False, False, False)}  # fmt: skip
        assert {v.constexprs["BITS"] for v in gemm} == {4, 8}
        # batch-1 decode: Triton compiles M == 1 as a constant, a kernel of its own
        m1 = [v for v in gemm if v.constexprs.get("M") == 1]
        assert m1 and all(v.family == "gemm-split-k" and "M" not in v.types for v in m1)
        assert len(m1) == len([v for v in gemm if v.family == "gemm-split-k"]) // 2
        decode = [v for v in variants if v.arch == arch and v.kernel == "_decode_kernel"]
        assert {v.constexprs["BLOCK_SIZE"] for v in decode} == set(triton_attention.BLOCK_SIZES)
        assert {v.constexprs["GROUP"] for v in decode} >= {1, 4, 8}
        assert {v.constexprs["HEAD_DIM"] for v in decode} == {64, 128, 256}  # 256: Gemma 3
        prefill = [v for v in variants if v.arch == arch and v.kernel == "_prefill_kernel"]
        assert {v.constexprs["BLOCK_M"] for v in prefill} == {16, 64}
        moe = [v for v in variants if v.arch == arch and v.kernel == "_fused_moe_kernel"]
        tiles = {(v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"], v.constexprs["BLOCK_K"], v.num_warps,
                  v.num_stages) for v in moe}  # fmt: skip
        assert tiles == {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages)
                         for c in triton_moe.MOE_CONFIGS.values()}  # fmt: skip  # every launch config
        # both roles (gate|up gathers token rows; down reads pair rows and applies the routing weights)
        # for every weight format and both activation dtypes
        assert {(v.constexprs["A_PER_PAIR"], v.constexprs["MUL_WEIGHT"]) for v in moe} == {(False, False), (True, True)}
        assert {(v.constexprs["AWQ"], v.constexprs["BITS"], v.constexprs["ACT_ORDER"]) for v in moe} == {
            (True, 4, False), (False, 4, False), (False, 4, True), (False, 8, False)}  # fmt: skip
        assert {v.constexprs["DOT_DTYPE"] for v in moe} == {"tl.float16", "tl.bfloat16"}
        assert all(v.needs_mma for v in moe)
        # sliding-window attention for Mistral's and Gemma 3's layouts; Gemma 3's 256-dim heads without
        # the window too (its global layers), prefill at the warps the wrapper launches with
        window = [v for v in variants if v.arch == arch and v.family.endswith("-window")]
        assert {(v.kernel, v.constexprs.get("HEAD_DIM"), v.constexprs.get("SLIDING")) for v in window} >= {
            ("_decode_kernel", 128, True), ("_decode_kernel", 256, True), ("_decode_kernel", 256, False),
            ("_prefill_kernel", 128, True), ("_prefill_kernel", 256, True), ("_prefill_kernel", 256, False)}  # fmt: skip
        assert all(v.num_warps == triton_attention.prefill_warps(v.constexprs["HEAD_DIM"])
                   for v in window if v.kernel == "_prefill_kernel")  # fmt: skip
        assert not any(v.constexprs.get("SLIDING") for v in variants if v.family in ("attention-decode", "attention-prefill"))


def _pick(variants, kernel, label_part):
    found = [v for v in variants if v.kernel == kernel and label_part in v.label]
    assert found, f"no {kernel} variant with {label_part!r}"
    return found[0]


@pytest.fixture
def fresh_triton_cache(tmp_path, monkeypatch):
    """A private cache so the compilation below really runs (workers inherit the environment)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


def test_representative_variants_compile_clean_for_sm80_and_sm90(fresh_triton_cache, tmp_path):
    variants = []
    for arch in (80, 90):
        ci = cc.all_variants([arch], "ci")
        variants += [
            _pick(ci, "_dequant_gemm_kernel", "awq4-g128-bf16-16x64x128-sk4"),
            _pick(ci, "_dequant_gemm_kernel", "gptq4-actorder-g128-bf16-128x256x32-sk1-bias"),
            _pick(ci, "_decode_kernel", "h32-kv8-d128-fp16-bs16-splits4"),
            _pick(ci, "_prefill_kernel", "h32-kv8-d128-fp16-bs16-bm64"),
        ]
    results = cc.run_check(variants, jobs=2)
    by_id = {r.id: r for r in results}
    assert [r.failures for r in results] == [[]] * len(variants)
    for r in results:
        assert r.registers is not None and 0 < r.registers <= 255
        assert r.stack_bytes == 0 and r.local_ops == 0
        assert 0 < r.shared_bytes <= cc.SMEM_LIMITS[r.arch]
    # mma.sync on Ampere, wgmma for the Hopper GEMM's large tile
    assert any(m.startswith("HMMA.16816.F32.BF16") for m in by_id[variants[0].id].mma)
    assert any(m.startswith("HGMMA.") for m in by_id[variants[5].id].mma)
    report = {"summary": cc.summary(results)}
    assert report["summary"]["failures"] == 0 and report["summary"]["variants"] == 8
    json.dumps(report)  # the report is plain JSON


def test_fused_moe_variants_compile_clean(fresh_triton_cache):
    """The fused MoE kernel's two launch configurations, each in the role the ci subset gives it, for
    Ampere and Hopper: no spill, shared memory within the limit, tensor-core instructions."""
    variants = [
        _pick(cc.all_variants([80], "ci"), "_fused_moe_kernel", "gptq4-actorder-g128-bf16-small-gateup"),
        _pick(cc.all_variants([90], "ci"), "_fused_moe_kernel", "awq4-g128-bf16-large-down"),
    ]
    results = cc.run_check(variants, jobs=2)
    assert [r.failures for r in results] == [[], []]
    for r in results:
        assert r.stack_bytes == 0 and r.local_ops == 0 and 0 < r.shared_bytes <= cc.SMEM_LIMITS[r.arch]
    assert any(m.startswith("HMMA.16816.F32.BF16") for m in results[0].mma)
    assert any(m.startswith(("HGMMA.", "HMMA.")) for m in results[1].mma)


def test_real_spill_and_shared_memory_overflow_are_failures(fresh_triton_cache):
    """The former split-K candidate 16x64x256 (8 splits, 3 stages), dropped from the autotune lists
    because of this, spills on sm_80 (bf16) and needs 144 KiB of shared memory on sm_89."""
    ci = cc.all_variants([80, 89], "ci")
    base = [v for v in ci if v.kernel == "_dequant_gemm_kernel" and v.family == "gemm-split-k"]
    variants = []
    for arch in (80, 89):
        v = next(b for b in base if b.arch == arch)
        v = cc.Variant(**{**v.__dict__, "label": v.label + "-16x64x256-sk8",
                          "constexprs": {**v.constexprs, "BLOCK_K": 256, "SPLIT_K": 8}})  # fmt: skip
        variants.append(v)
    sm80, sm89 = cc.run_check(variants, jobs=2)
    assert any(f.startswith("spills") for f in sm80.failures), sm80
    assert any(f.startswith("shared memory") for f in sm89.failures), sm89
    assert sm89.shared_bytes > cc.SMEM_LIMITS[89]
