"""Valid checkpoints pass, with and without --deep, and the report says what it detected."""

from __future__ import annotations

import json

import pytest

from qserve.validate import validate_checkpoint

VALID = {
    "gptq": dict(),
    "gptq-act-order": dict(act_order=True),
    "gptq-v2": dict(pack_format="gptq_v2"),
    "gptq-asym": dict(sym=False),
    "gptq-8bit": dict(bits=8),
    "gptq-per-channel": dict(group_size=-1),
    "gptq-autogptq-legacy": dict(style="autogptq"),
    "gptq-sharded": dict(shards=3),
    "awq": dict(method="awq", sym=False),
    "awq-autoawq": dict(method="awq", style="autoawq"),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_checkpoint_passes(build_ckpt, tmp_path, name):
    ckpt = build_ckpt(tmp_path / name, **VALID[name])
    for deep in (False, True):
        report = validate_checkpoint(ckpt, deep=deep, strict=True)
        assert report.findings == [], report.format_text()
        assert report.ok and report.deep == deep
        assert report.quantized_linears == 4 * 7
        assert report.method == VALID[name].get("method", "gptq")
        assert report.bits == VALID[name].get("bits", 4)
        assert report.group_size == VALID[name].get("group_size", 32)
        json.dumps(report.to_json())  # serialisable


def test_detected_format_fields(valid_gptq, valid_awq):
    gptq = validate_checkpoint(valid_gptq)
    assert (gptq.checkpoint_format, gptq.version, gptq.desc_act) == ("gptq", None, False)
    assert gptq.metadata_source == "quantize_config.json"
    awq = validate_checkpoint(valid_awq)
    assert (awq.checkpoint_format, awq.version) == (None, "gemm")
    assert awq.metadata_source == "config.json:quantization_config"


def test_autoawq_checkpoint_uses_legacy_aliases(build_ckpt, tmp_path):
    """AutoAWQ's quant_config.json (w_bit, q_group_size, version GEMM) agrees with config.json."""
    ckpt = build_ckpt(tmp_path / "a", method="awq", style="autoawq")
    legacy = json.loads((ckpt / "quant_config.json").read_text())
    assert {"w_bit", "q_group_size", "zero_point", "version"} <= legacy.keys()
    report = validate_checkpoint(ckpt)
    assert report.ok and report.metadata_source == "quant_config.json"
    assert report.weight_files == 2


def test_clean_report_text_is_one_summary_line(valid_gptq):
    text = validate_checkpoint(valid_gptq).format_text()
    assert text.count("\n") == 0
    assert text.startswith("valid: 0 error(s), 0 warning(s) - GPTQ 4-bit g32")


def test_modules_to_not_convert_allows_unquantized_linear(build_ckpt, tmp_path, edit_json, edit_tensors):
    import torch

    ckpt = build_ckpt(tmp_path / "a", method="awq", sym=False)

    def unquantize(t):
        for suffix in ("qweight", "qzeros", "scales"):
            del t[f"model.layers.1.mlp.down_proj.{suffix}"]
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 128, dtype=torch.float16)

    edit_tensors(ckpt, unquantize)
    assert "LINEAR_NOT_QUANTIZED" in validate_checkpoint(ckpt).codes()
    edit_json(
        ckpt / "config.json",
        lambda c: c["quantization_config"].update(modules_to_not_convert=["layers.1.mlp.down_proj"]),
    )
    report = validate_checkpoint(ckpt, strict=True)
    assert report.ok, report.format_text()
