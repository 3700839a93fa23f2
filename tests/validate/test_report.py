"""The report folds findings that differ only in their layer index, and decides `ok`."""

from __future__ import annotations

from qserve.validate.report import Report, compress_indices, error, group_findings, layer_pattern, warning


def test_layer_pattern_replaces_the_block_index_only():
    assert layer_pattern("model.layers.17.mlp.experts.3.up_proj.qweight") == (
        "model.layers.{}.mlp.experts.3.up_proj.qweight",
        17,
    )
    assert layer_pattern("model.norm.weight") == ("model.norm.weight", None)


def test_compress_indices():
    assert compress_indices([3, 0, 1, 2, 7, 10, 9]) == "0..3,7,9..10"
    assert compress_indices([5]) == "5"


def test_grouping_folds_layers_but_not_different_messages():
    same = [
        error("SHAPE_MISMATCH", f"model.layers.{i}.mlp.up_proj.scales", "a", "b", "m", "h") for i in range(30)
    ]
    other = error("SHAPE_MISMATCH", "model.layers.4.mlp.up_proj.scales", "a", "c", "other message", "h")
    groups = group_findings([*same, other, warning("W", "model.norm.weight", "x", "y", "w")])
    assert [g.count for g in groups] == [30, 1, 1]
    assert "model.layers.{0..29}.mlp.up_proj.scales (30 layers): m; h" in groups[0].line()
    assert "model.layers.4.mlp.up_proj.scales: other message" in groups[1].line()
    assert groups[2].first.severity == "warning"  # errors first


def test_ok_and_strict():
    findings = [warning("W", "s", "x", "y", "w")]
    assert Report(path="p", findings=findings).ok
    assert not Report(path="p", findings=findings, strict=True).ok
    assert not Report(path="p", findings=[error("E", "s", "x", "y", "e")]).ok
    assert Report(path="p").to_json()["counts"] == {"error": 0, "warning": 0, "info": 0}
