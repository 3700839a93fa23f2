"""`--deep`: problems only the tensor data shows, each with its code; and the header check stays cheap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qserve.kernels import packing
from qserve.validate import validate_checkpoint

Q = "model.layers.1.self_attn.q_proj"
DOWN = "model.layers.2.mlp.down_proj"


def codes(report):
    return report.codes()


def assert_deep_error(ckpt, code, subject_part=""):
    shallow = validate_checkpoint(ckpt)
    assert code not in shallow.codes(), "a data problem must not be visible from the headers alone"
    report = validate_checkpoint(ckpt, deep=True)
    found = [f for f in report.findings if f.code == code]
    assert found, report.format_text()
    assert not report.ok and any(f.severity == "error" and subject_part in f.subject for f in found)
    return found


@pytest.mark.parametrize(
    "packed,declared,sym",
    [
        ("gptq_v2", "gptq", True),
        ("gptq", "gptq_v2", True),
        ("gptq_v2", "gptq", False),
        ("gptq", "gptq_v2", False),
    ],
)
def test_zero_convention_mislabelled(build_ckpt, tmp_path, packed, declared, sym):
    ckpt = build_ckpt(tmp_path / "a", pack_format=packed, declared_format=declared, sym=sym)
    (f,) = assert_deep_error(ckpt, "ZERO_CONVENTION_MISMATCH", "checkpoint_format")
    assert f"'{packed}'" in f.message and "28 of 28" in f.message
    assert f"set checkpoint_format to '{packed}'" in f.hint


def test_zero_convention_right_label_passes_asym_v2(build_ckpt, tmp_path):
    ckpt = build_ckpt(tmp_path / "a", pack_format="gptq_v2", sym=False)
    assert validate_checkpoint(ckpt, deep=True, strict=True).ok


def test_awq_zeros_offset_like_gptq_v1(valid_awq, clone, edit_tensors):
    def shift_zeros(t):
        for name in [n for n in t if n.endswith(".qzeros")]:
            z = packing.unpack_cols(t[name], 4, packing.AWQ_ORDER)
            t[name] = packing.pack_cols((z - 1) & 15, 4, packing.AWQ_ORDER)

    ckpt = clone(valid_awq)
    edit_tensors(ckpt, shift_zeros)
    assert_deep_error(ckpt, "ZERO_CONVENTION_MISMATCH", "qzeros")


def test_nan_scales(valid_gptq, clone, edit_tensors):
    def poison(t):
        t[f"{Q}.scales"][0, 3] = float("nan")

    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, poison)
    (f,) = assert_deep_error(ckpt, "NONFINITE", f"{Q}.scales")
    assert f.found == "1 of 128"


def test_nonpositive_scales(valid_awq, clone, edit_tensors):
    def negate(t):
        t[f"{Q}.scales"][1] *= -1

    ckpt = clone(valid_awq)
    edit_tensors(ckpt, negate)
    assert_deep_error(ckpt, "SCALES_NONPOSITIVE", f"{Q}.scales")


def test_nan_in_unquantized_tensor(valid_gptq, clone, edit_tensors):
    def poison(t):
        t["model.embed_tokens.weight"][100, 5] = float("inf")

    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, poison)
    assert_deep_error(ckpt, "NONFINITE", "model.embed_tokens.weight")


def test_g_idx_out_of_range(valid_gptq, clone, edit_tensors):
    def corrupt(t):
        t[f"{Q}.g_idx"][7] = 2  # q_proj has 64 inputs = 2 groups of 32

    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, corrupt)
    assert_deep_error(ckpt, "GIDX_OUT_OF_RANGE", f"{Q}.g_idx")


def test_act_order_checkpoint_declared_without_desc_act(build_ckpt, tmp_path, edit_json):
    ckpt = build_ckpt(tmp_path / "a", act_order=True)
    edit_json(ckpt / "quantize_config.json", lambda c: c.update(desc_act=False))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(desc_act=False))
    (f, *_) = assert_deep_error(ckpt, "GIDX_NOT_MONOTONIC", ".g_idx")
    assert "desc_act true" in f.hint


def test_group_sizes_wrong_under_act_order(build_ckpt, tmp_path, edit_tensors):
    def unbalance(t):
        g = t[f"{Q}.g_idx"]
        g[(g == 1).nonzero()[0]] = 0  # group 0 gets 33 channels, group 1 only 31

    ckpt = build_ckpt(tmp_path / "a", act_order=True)
    edit_tensors(ckpt, unbalance)
    assert_deep_error(ckpt, "GROUP_SIZE_WRONG", f"{Q}.g_idx")


def test_group_sizes_wrong_in_order(valid_gptq, clone, edit_tensors):
    def shift(t):
        t[f"{DOWN}.g_idx"] = (torch.arange(128, dtype=torch.int32) + 8).clamp(max=127) // 32

    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, shift)
    assert_deep_error(ckpt, "GROUP_SIZE_WRONG", f"{DOWN}.g_idx")


def test_magnitude_outlier(valid_gptq, clone, edit_tensors):
    def inflate(t):
        t[f"{DOWN}.scales"] *= 100

    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, inflate)
    report = validate_checkpoint(ckpt, deep=True)
    (f,) = [f for f in report.findings if f.code == "MAGNITUDE_OUTLIER"]
    assert f.subject == DOWN and f.severity == "warning"
    assert not validate_checkpoint(ckpt, deep=True, strict=True).ok


def test_deep_skips_files_with_bad_headers(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    report = validate_checkpoint(ckpt, deep=True)
    assert "FILE_TRUNCATED" in report.codes() and "DATA_UNREADABLE" not in report.codes()


def test_header_check_never_imports_torch(valid_gptq):
    code = (
        "import sys; from qserve.validate import validate_checkpoint; "
        f"r = validate_checkpoint({str(valid_gptq)!r}); "
        "assert r.ok, r.format_text(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_supported_bits_mirror_packing():
    from qserve.validate import metadata

    assert metadata.SUPPORTED_BITS == packing.SUPPORTED_BITS
