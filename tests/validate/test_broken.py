"""A corpus of broken checkpoints, each made by one mutation of a valid one, and the code it must raise."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from qserve.validate import validate_checkpoint

Q = "model.layers.1.self_attn.q_proj"
DOWN = "model.layers.2.mlp.down_proj"


def findings_with(report, code):
    found = [f for f in report.findings if f.code == code]
    assert found, f"expected {code}, got:\n{report.format_text()}"
    return found


def assert_error(report, code, subject_part: str = ""):
    found = findings_with(report, code)
    assert not report.ok
    assert any(f.severity == "error" and subject_part in f.subject for f in found), report.format_text()
    return found


# ---- metadata -----------------------------------------------------------------------------------


def test_metadata_missing(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    os.remove(ckpt / "quantize_config.json")
    edit_json(ckpt / "config.json", lambda c: c.pop("quantization_config"))
    (f,) = assert_error(validate_checkpoint(ckpt), "META_MISSING")
    assert "qweight" in f.hint  # says the tensors are quantized even though the metadata is gone


def test_unknown_method(valid_awq, clone, edit_json):
    ckpt = clone(valid_awq)
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_method="bitsandbytes"))
    assert_error(validate_checkpoint(ckpt), "METHOD_UNKNOWN", "quant_method")


@pytest.mark.parametrize("version", ["gemv", "gemv_fast", "marlin"])
def test_awq_other_version_refused_with_reason(valid_awq, clone, edit_json, version):
    ckpt = clone(valid_awq)
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(version=version.upper()))
    report = validate_checkpoint(ckpt)
    (f,) = assert_error(report, "AWQ_VERSION_UNSUPPORTED", "version")
    assert "different packed layout" in f.message and "gemm" in f.hint
    assert "SHAPE_MISMATCH" not in report.codes()  # the reason, not a shape error


def test_gptq_marlin_format_refused(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    edit_json(
        ckpt / "quantize_config.json", lambda c: (c.pop("checkpoint_format"), c.update(is_marlin_format=True))
    )
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].pop("checkpoint_format"))
    assert_error(validate_checkpoint(ckpt), "GPTQ_FORMAT_UNSUPPORTED")


@pytest.mark.parametrize("bits", [3, 16])
def test_bits_unsupported(valid_gptq, clone, edit_json, bits):
    ckpt = clone(valid_gptq)
    for name in ("quantize_config.json",):
        edit_json(ckpt / name, lambda c: c.update(bits=bits))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(bits=bits))
    assert_error(validate_checkpoint(ckpt), "BITS_UNSUPPORTED", "bits")


def test_bits_metadata_wrong_named_by_shape(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    edit_json(ckpt / "quantize_config.json", lambda c: c.update(bits=8))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(bits=8))
    found = assert_error(validate_checkpoint(ckpt), "SHAPE_MISMATCH", f"{Q}.qweight")
    assert any("fits bits=4" in f.hint for f in found)


def test_metadata_sources_conflict(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(group_size=64))
    (f,) = assert_error(validate_checkpoint(ckpt), "META_CONFLICT", "group_size")
    assert f.found == "64"


def test_metadata_wrong_type(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    edit_json(ckpt / "quantize_config.json", lambda c: c.update(bits="four"))
    assert_error(validate_checkpoint(ckpt), "META_INVALID", "bits")


def test_group_size_not_dividing(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    for name in ("quantize_config.json",):
        edit_json(ckpt / name, lambda c: c.update(group_size=48))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(group_size=48))
    report = validate_checkpoint(ckpt)
    assert_error(report, "GROUP_SIZE_NOT_DIVIDING", "q_proj")


def test_wrong_group_size_metadata_one_line_per_pattern(valid_gptq, clone, edit_json):
    """All 4 blocks' down_proj scales are wrong the same way: the text report shows one line."""
    ckpt = clone(valid_gptq)
    edit_json(ckpt / "quantize_config.json", lambda c: c.update(group_size=64))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(group_size=64))
    report = validate_checkpoint(ckpt)
    found = assert_error(report, "SHAPE_MISMATCH", "down_proj.scales")
    down = [f for f in found if f.subject.endswith("down_proj.scales")]
    assert len(down) == 4
    assert down[0].message == "shape [4, 64] but group_size 64 and in_features 128 need [2, 64]"
    assert "fit group_size 32" in down[0].hint
    lines = [ln for ln in report.format_text().splitlines() if "down_proj.scales" in ln]
    assert len(lines) == 1 and "model.layers.{0..3}.mlp.down_proj.scales (4 layers)" in lines[0]


# ---- tensors: shapes, dtypes, completeness --------------------------------------------------------


def test_wrong_scales_shape(valid_gptq, clone, edit_tensors):
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: t.update({f"{DOWN}.scales": t[f"{DOWN}.scales"][:2].clone()}))
    assert_error(validate_checkpoint(ckpt), "SHAPE_MISMATCH", f"{DOWN}.scales")


def test_wrong_qweight_dtype(valid_gptq, clone, edit_tensors):
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}))
    (f,) = assert_error(validate_checkpoint(ckpt), "DTYPE_MISMATCH", f"{Q}.qweight")
    assert (f.expected, f.found) == ("I32", "F32")


def test_bf16_scales_are_a_warning(valid_awq, clone, edit_tensors):
    ckpt = clone(valid_awq)
    edit_tensors(ckpt, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].bfloat16()}))
    report = validate_checkpoint(ckpt)
    assert report.ok and [f.severity for f in findings_with(report, "DTYPE_MISMATCH")] == ["warning"]
    assert not validate_checkpoint(ckpt, strict=True).ok


def test_layer_without_scales(valid_gptq, clone, edit_tensors):
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: t.pop(f"{Q}.scales"))
    (f,) = assert_error(validate_checkpoint(ckpt), "LAYER_INCOMPLETE", Q)
    assert "scales" in f.message


def test_linear_left_unquantized(valid_gptq, clone, edit_tensors):
    def unquantize(t):
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            del t[f"{Q}.{s}"]
        t[f"{Q}.weight"] = torch.zeros(64, 64, dtype=torch.float16)

    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, unquantize)
    assert_error(validate_checkpoint(ckpt), "LINEAR_NOT_QUANTIZED", Q)


def test_linear_missing(valid_gptq, clone, edit_tensors):
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: [t.pop(f"{Q}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")])
    assert_error(validate_checkpoint(ckpt), "LINEAR_MISSING", Q)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.9.self_attn.q_proj.qweight",  # beyond num_hidden_layers
        "model.layers.0.self_attn.rotary.qweight",  # not a Linear of the architecture
        f"{Q}.weight",  # an fp weight left beside its qweight
    ],
)
def test_orphan_tensor(valid_gptq, clone, edit_tensors, extra):
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: t.update({extra: torch.zeros(8, 64, dtype=torch.int32)}))
    found = assert_error(validate_checkpoint(ckpt), "ORPHAN_TENSOR", extra)
    assert [f.subject for f in found] == [extra]  # reported once, however many rules it breaks


def test_awq_with_g_idx_is_orphan(valid_awq, clone, edit_tensors):
    ckpt = clone(valid_awq)
    edit_tensors(ckpt, lambda t: t.update({f"{Q}.g_idx": torch.arange(64, dtype=torch.int32) // 32}))
    assert_error(validate_checkpoint(ckpt), "ORPHAN_TENSOR", f"{Q}.g_idx")


def test_unquantized_dtype_inconsistent(valid_gptq, clone, edit_tensors):
    name = "model.layers.0.input_layernorm.weight"
    ckpt = clone(valid_gptq)
    edit_tensors(ckpt, lambda t: t.update({name: t[name].float()}))
    report = validate_checkpoint(ckpt)
    (f,) = findings_with(report, "UNQUANT_DTYPE_INCONSISTENT")
    assert f.subject == name and f.severity == "warning" and report.ok
    assert not validate_checkpoint(ckpt, strict=True).ok


def test_config_dtype_disagrees_with_weights(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    edit_json(ckpt / "config.json", lambda c: c.update(dtype="bfloat16"))
    findings_with(validate_checkpoint(ckpt), "UNQUANT_DTYPE_INCONSISTENT")


# ---- files ---------------------------------------------------------------------------------------


def test_missing_tokenizer(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.remove(ckpt / "tokenizer.json")
    assert_error(validate_checkpoint(ckpt), "TOKENIZER_MISSING")


def test_missing_config(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.remove(ckpt / "config.json")
    report = validate_checkpoint(ckpt)
    assert_error(report, "CONFIG_MISSING")
    assert "ARCH_UNKNOWN" not in report.codes() and report.method == "gptq"


def test_unknown_architecture_checks_tensors_present(valid_gptq, clone, edit_json, edit_tensors):
    ckpt = clone(valid_gptq)
    edit_json(
        ckpt / "config.json", lambda c: c.update(architectures=["FancyForCausalLM"], model_type="fancy")
    )
    report = validate_checkpoint(ckpt)
    assert [f.severity for f in findings_with(report, "ARCH_UNKNOWN")] == ["warning"] and report.ok
    edit_tensors(ckpt, lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:, :4].clone()}))
    assert_error(validate_checkpoint(ckpt), "SHAPE_MISMATCH", f"{Q}.qzeros")


def test_weights_missing(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.rename(ckpt / "model.safetensors", ckpt / "pytorch_model.bin")
    (f,) = assert_error(validate_checkpoint(ckpt), "WEIGHTS_MISSING")
    assert "pickle" in f.hint


def test_missing_shard(build_ckpt, tmp_path):
    ckpt = build_ckpt(tmp_path / "a", shards=3)
    os.remove(ckpt / "model-00002-of-00003.safetensors")
    report = validate_checkpoint(ckpt)
    assert_error(report, "SHARD_MISSING", "model-00002-of-00003.safetensors")
    assert report.codes() == {"SHARD_MISSING"}  # its tensors are not reported missing one by one


def test_index_points_to_wrong_shard(build_ckpt, tmp_path, edit_json):
    ckpt = build_ckpt(tmp_path / "a", shards=2)
    index = ckpt / "model.safetensors.index.json"
    name = "model.embed_tokens.weight"
    other = {
        "model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
        "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors",
    }
    edit_json(index, lambda i: i["weight_map"].update({name: other[i["weight_map"][name]]}))
    assert_error(validate_checkpoint(ckpt), "INDEX_MISMATCH", name)


def test_index_escaping_the_directory(build_ckpt, tmp_path, edit_json):
    ckpt = build_ckpt(tmp_path / "a", shards=2)
    index = ckpt / "model.safetensors.index.json"
    edit_json(index, lambda i: i["weight_map"].update({"model.norm.weight": "../../etc/passwd"}))
    assert_error(validate_checkpoint(ckpt), "PATH_ESCAPE")


def test_duplicate_tensor_across_files(valid_gptq, clone, edit_tensors):
    from safetensors.torch import save_file

    ckpt = clone(valid_gptq)
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.float16)}, str(ckpt / "extra.safetensors"))
    assert_error(validate_checkpoint(ckpt), "DUPLICATE_TENSOR", "model.norm.weight")


def test_duplicate_key_in_header(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].decode()
    entry = header[header.index('"model.norm.weight"') :].split("}", 1)[0] + "}"
    patched = header.replace("{", "{" + entry + ",", 1).encode()
    path.write_bytes(struct.pack("<Q", len(patched)) + patched + data[8 + n :])
    assert_error(validate_checkpoint(ckpt), "DUPLICATE_TENSOR", "model.norm.weight")


def test_truncated_file(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    report = validate_checkpoint(ckpt)
    (f,) = assert_error(report, "FILE_TRUNCATED", "model.safetensors")
    assert "1 tensor(s)" in f.found and report.codes() == {"FILE_TRUNCATED"}


def test_truncated_inside_header(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.truncate(ckpt / "model.safetensors", 100)
    assert_error(validate_checkpoint(ckpt), "FILE_TRUNCATED", "model.safetensors")


def test_garbage_header(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:64] = os.urandom(56)
    path.write_bytes(bytes(data))
    report = validate_checkpoint(ckpt)
    assert_error(report, "HEADER_CORRUPT", "model.safetensors")
    assert report.codes() == {"HEADER_CORRUPT"}


@pytest.mark.parametrize("length", [2**60, 2**64 - 1, 200_000_000])
def test_absurd_header_length(valid_gptq, clone, length):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])
    assert_error(validate_checkpoint(ckpt), "HEADER_CORRUPT", "model.safetensors")


def test_offsets_overlap(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["data_offsets"] = [0, 128]  # the first tensor's bytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    assert_error(validate_checkpoint(ckpt), "HEADER_CORRUPT", "model.safetensors")


def test_symlink_escaping_directory(valid_gptq, clone, tmp_path):
    ckpt = clone(valid_gptq)
    outside = tmp_path / "outside.json"
    outside.write_text((ckpt / "tokenizer.json").read_text())
    os.remove(ckpt / "tokenizer.json")
    os.symlink(outside, ckpt / "tokenizer.json")
    report = validate_checkpoint(ckpt)
    assert_error(report, "SYMLINK_ESCAPE", "tokenizer.json")
    assert "TOKENIZER_MISSING" in report.codes()  # the link was not followed


def test_symlink_inside_directory_is_fine(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.rename(ckpt / "tokenizer.json", ckpt / "tok.json")
    os.symlink("tok.json", ckpt / "tokenizer.json")
    assert validate_checkpoint(ckpt, strict=True).ok


def test_json_bomb_is_refused_cheaply(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    (ckpt / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    (ckpt / "quantize_config.json").write_text('{"a": ' * 50 + "1" * 10_000 + "}" * 50)
    report = validate_checkpoint(ckpt)
    subjects = {f.subject for f in findings_with(report, "JSON_INVALID")}
    assert subjects == {"config.json", "quantize_config.json"}


def test_oversized_json_is_not_read(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    (ckpt / "config.json").write_text('{"pad": "' + "x" * (5 * 2**20) + '"}')
    (f,) = assert_error(validate_checkpoint(ckpt), "JSON_INVALID", "config.json")
    assert "limit" in f.found


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_instead_of_config_does_not_hang(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    os.remove(ckpt / "config.json")
    os.mkfifo(ckpt / "config.json")
    assert_error(validate_checkpoint(ckpt), "FILE_UNREADABLE", "config.json")


# ---- less common codes ----------------------------------------------------------------------------


def test_dynamic_overrides_are_flagged_not_evaluated(valid_gptq, clone, edit_json):
    ckpt = clone(valid_gptq)
    edit_json(ckpt / "quantize_config.json", lambda c: c.update(dynamic={r"-:.*down_proj": {}}))
    report = validate_checkpoint(ckpt)
    (f,) = findings_with(report, "DYNAMIC_NOT_CHECKED")
    assert f.severity == "warning" and report.ok


def test_quantized_although_listed_as_not_converted(valid_awq, clone, edit_json):
    ckpt = clone(valid_awq)
    edit_json(
        ckpt / "config.json",
        lambda c: c["quantization_config"].update(modules_to_not_convert=["mlp.down_proj"]),
    )
    found = assert_error(validate_checkpoint(ckpt), "SKIPPED_BUT_QUANTIZED", "down_proj")
    assert len(found) == 4


def test_unreferenced_shard_is_a_warning(build_ckpt, tmp_path):
    from safetensors.torch import save_file

    ckpt = build_ckpt(tmp_path / "a", shards=2)
    save_file({"x": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    report = validate_checkpoint(ckpt)
    (f,) = findings_with(report, "SHARD_UNREFERENCED")
    assert f.subject == "model.safetensors" and report.ok
    assert "DUPLICATE_TENSOR" not in report.codes()  # the stale file is not read


def test_unknown_architecture_with_nothing_quantized(base_model, clone, edit_json):
    ckpt = clone(base_model)
    edit_json(ckpt / "config.json", lambda c: c.update(architectures=["X"], model_type="x"))
    (ckpt / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": 32, "quant_method": "gptq"})
    )
    assert_error(validate_checkpoint(ckpt), "NOTHING_QUANTIZED")


def test_unquantized_model_says_so(base_model):
    (f,) = assert_error(validate_checkpoint(base_model), "META_MISSING")
    assert "unquantized" in f.hint


def test_unknown_dtype_string(valid_gptq, clone):
    ckpt = clone(valid_gptq)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F12"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    (f,) = assert_error(validate_checkpoint(ckpt), "DTYPE_UNKNOWN", "model.norm.weight")
    assert f.found == "'F12'"


def test_hugging_face_cache_layout_is_not_an_escape(valid_gptq, tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<sha> is how the hub cache stores every checkpoint."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, src in enumerate(sorted(valid_gptq.iterdir())):
        blob = repo / "blobs" / f"sha{i}"
        blob.write_bytes(src.read_bytes())
        os.symlink(f"../../blobs/sha{i}", snapshot / src.name)
    assert validate_checkpoint(snapshot, strict=True).ok
    os.symlink(valid_gptq / "config.json", snapshot / "stray.json")  # outside the repo's blobs
    assert_error(validate_checkpoint(snapshot), "SYMLINK_ESCAPE", "stray.json")
