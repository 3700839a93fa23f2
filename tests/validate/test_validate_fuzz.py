"""Hostile input: random mutations of safetensors headers and of the JSON metadata.

Properties: no exception escapes `validate_checkpoint`; each call is fast and allocates little; a
file the reference safetensors loader refuses is never reported clean; metadata that does not
describe the tensors (4-bit GPTQ, group 32) is never reported clean.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qserve.validate import Report, validate_checkpoint

TIME_LIMIT_S = 2.0
PEAK_BYTES = 50 * 2**20
# Codes that say "this weight file itself is broken" (as opposed to its tensors not fitting the model).
HEADER_CODES = {"HEADER_CORRUPT", "FILE_TRUNCATED", "DTYPE_UNKNOWN", "DUPLICATE_TENSOR", "FILE_UNREADABLE"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def fuzz_ckpt(build_ckpt, tmp_path_factory):
    pristine = build_ckpt(tmp_path_factory.mktemp("fuzz-pristine"))
    work = tmp_path_factory.mktemp("fuzz-work") / "ckpt"
    shutil.copytree(pristine, work)
    return pristine, work


def bounded_validate(path, deep=False) -> Report:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        report = validate_checkpoint(path, deep=deep)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(report, Report)
    assert elapsed < TIME_LIMIT_S, f"validate took {elapsed:.2f}s"
    assert peak < PEAK_BYTES, f"validate allocated {peak / 2**20:.1f} MB"
    for f in report.findings:
        assert f.severity in ("error", "warning", "info") and f.code and f.message
    report.format_text()
    json.dumps(report.to_json())
    return report


def reference_refuses(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                f.get_slice(name)
    except Exception:  # any refusal by the reference loader counts
        return True
    return False


@FUZZ
@given(data=st.data())
def test_header_byte_mutations(fuzz_ckpt, data):
    pristine, work = fuzz_ckpt
    raw = bytearray((pristine / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header_end = 8 + n
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=8)
    )
    for pos, value in edits:
        raw[pos] = value
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    target = work / "model.safetensors"
    target.write_bytes(bytes(raw))
    report = bounded_validate(work, deep=data.draw(st.booleans()))
    if reference_refuses(target):
        assert HEADER_CODES & report.codes(), (
            f"the reference loader refuses the file, the validator found only {sorted(report.codes())}"
        )
        assert not report.ok


FIELD_VALUES = st.one_of(
    st.integers(-2, 2**64),
    st.lists(st.integers(-1, 5000), max_size=4),
    st.sampled_from(["F16", "BF16", "I32", "F32", "U8", "F4", "f16", ""]),
    st.none(),
    st.text(max_size=6),
)


@FUZZ
@given(data=st.data())
def test_header_field_mutations(fuzz_ckpt, data):
    """Structured edits (offsets, shapes, dtypes, names) that keep the header valid JSON."""
    pristine, work = fuzz_ckpt
    raw = (pristine / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        field = data.draw(
            st.sampled_from(["dtype", "shape", "data_offsets", "begin", "end", "drop", "rename"])
        )
        entry = header.get(name)
        if entry is None:
            continue
        if field == "drop":
            del header[name]
        elif field == "rename":
            header[data.draw(st.text(max_size=12))] = header.pop(name)
        elif field in ("begin", "end"):
            offsets = entry.get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
                offsets[field == "end"] += data.draw(st.integers(-64, 64))
        else:
            entry[field] = data.draw(FIELD_VALUES)
    encoded = json.dumps(header).encode()
    length = len(encoded) + data.draw(st.sampled_from([0, 0, 0, -1, 1]))
    target = work / "model.safetensors"
    target.write_bytes(struct.pack("<Q", max(length, 0)) + encoded + body)
    report = bounded_validate(work, deep=data.draw(st.booleans()))
    if reference_refuses(target):
        assert HEADER_CODES & report.codes(), (
            f"the reference loader refuses the file, the validator found only {sorted(report.codes())}"
        )


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_arbitrary_header_length_and_body(fuzz_ckpt, length, body):
    _, work = fuzz_ckpt
    (work / "model.safetensors").write_bytes(struct.pack("<Q", length) + body)
    report = bounded_validate(work)
    assert not report.ok


JSON_VALUES = st.one_of(
    st.integers(-3, 300),
    st.sampled_from(["gptq", "awq", "GPTQ", "gemm", "GEMM", "gemv", "gptq_v2", "marlin", "", "4"]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
META_KEYS = st.sampled_from(
    [
        "quant_method",
        "bits",
        "w_bit",
        "group_size",
        "q_group_size",
        "desc_act",
        "sym",
        "zero_point",
        "version",
        "checkpoint_format",
        "format",
        "is_marlin_format",
        "static_groups",
        "lm_head",
        "modules_to_not_convert",
        "dynamic",
        "other",
    ]
)


@FUZZ
@given(
    quantize_config=st.one_of(st.none(), st.dictionaries(META_KEYS, JSON_VALUES, max_size=8), JSON_VALUES),
    quantization_config=st.one_of(st.none(), st.dictionaries(META_KEYS, JSON_VALUES, max_size=8)),
)
def test_random_metadata_never_passes_unless_it_matches(fuzz_ckpt, quantize_config, quantization_config):
    pristine, work = fuzz_ckpt
    shutil.copy(pristine / "model.safetensors", work / "model.safetensors")
    config = json.loads((pristine / "config.json").read_text())
    config.pop("quantization_config")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (work / "config.json").write_text(json.dumps(config))
    qc = work / "quantize_config.json"
    if quantize_config is None:
        qc.unlink(missing_ok=True)
    else:
        qc.write_text(json.dumps(quantize_config))
    report = bounded_validate(work)
    if report.ok:  # the tensors are GPTQ 4-bit, group 32: nothing else may be accepted
        assert (report.method, report.bits, report.group_size) == ("gptq", 4, 32), report.to_json()


@FUZZ
@given(data=st.data())
def test_json_byte_mutations(fuzz_ckpt, data):
    pristine, work = fuzz_ckpt
    shutil.copy(pristine / "model.safetensors", work / "model.safetensors")
    for name in ("config.json", "quantize_config.json"):
        raw = bytearray((pristine / name).read_bytes())
        for pos, value in data.draw(
            st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6)
        ):
            raw[pos] = value
        (work / name).write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    bounded_validate(work, deep=data.draw(st.booleans()))
