"""Checkpoints written by `qserve quantize` itself (the real exporter) validate clean, deep included."""

from __future__ import annotations

import pytest

from qserve.validate import validate_checkpoint

CALIB_TEXT = "The quick brown fox jumps over the lazy dog. Quantization keeps the weights small. " * 40


@pytest.mark.parametrize(
    "method,fields",
    # act-order covers plain GPTQ's tensors plus a permuted g_idx; a coarse AWQ search keeps it fast.
    [("gptq", {"desc_act": True}), ("awq", {"n_grid": 4, "clip": False})],
    ids=["gptq-act-order", "awq"],
)
def test_qserve_quantized_checkpoint_is_valid(base_model, tmp_path, method, fields):
    from qserve.quantize.config import QuantConfig
    from qserve.quantize.pipeline import quantize_model

    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    out = tmp_path / f"out-{method}"
    cfg = QuantConfig(
        model=str(base_model),
        output=str(out),
        method=method,
        group_size=32,
        calib=str(calib),
        n_samples=4,
        seqlen=32,
        device="cpu",
        eval=False,
        quiet=True,
        **fields,
    )
    quantize_model(cfg, log=lambda _: None)  # also runs the validator on its output
    report = validate_checkpoint(out, deep=True, strict=True)
    assert report.ok and report.findings == [], report.format_text()
    assert (report.method, report.bits, report.group_size) == (method, 4, 32)
    assert report.quantized_linears == 4 * 7
