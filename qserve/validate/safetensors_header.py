"""A hardened, bounded reader for safetensors headers; it never touches tensor data.

File layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
`{name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data buffer; offsets are relative to the buffer's start. The reference loader refuses a
header over 100 MB and a buffer that the tensors do not tile exactly (no gap, no overlap, no tail),
so this reader applies the same rules and reports each violation instead of raising.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from qserve.validate.report import Finding, error

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_RANK = 16  # bounds the cost of multiplying out a hostile shape; real weights have rank <= 5

# dtype string -> bytes per element. Sub-byte float formats (F4, F6_*) are not handled here.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E8M0"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data buffer
    end: int
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    file: str
    tensors: dict[str, TensorInfo]  # entries with a well-formed dtype/shape/offsets (data may be cut off)
    metadata: dict[str, str]
    sound: bool  # True when the whole file satisfies the format: only then may its data be read


def read_header(path: Path, name: str, file_size: int) -> tuple[SafetensorsHeader | None, list[Finding]]:
    """Read and check the header of the safetensors file at `path` (shown to the user as `name`)."""
    if file_size < 8:
        return None, [_truncated(name, "at least 8 bytes (the header length)", f"{file_size} bytes")]
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                return None, [
                    _corrupt(name, f"a header length <= {MAX_HEADER_BYTES}", f"{n} bytes", "absurd length")
                ]
            if 8 + n > file_size:
                return None, [
                    _truncated(name, f"a {n}-byte header after the length", f"{file_size - 8} bytes")
                ]
            raw = fh.read(n)
    except OSError as exc:
        return None, [
            error("FILE_UNREADABLE", name, "a readable file", exc.strerror or "I/O error", "cannot be read")
        ]
    entries, findings = _parse(name, raw)
    if entries is None:
        return None, findings
    buffer_len = file_size - 8 - n
    header, more = _check_entries(name, entries, buffer_len)
    return header, findings + more


def _parse(name: str, raw: bytes) -> tuple[dict | None, list[Finding]]:
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            return None, [_corrupt(name, "a JSON object", repr(text[:20]), "header is not a JSON object")]
        parsed = json.loads(text, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        return None, [
            _corrupt(name, "UTF-8 JSON", f"invalid UTF-8 at byte {exc.start}", "header is not text")
        ]
    except RecursionError:
        return None, [_corrupt(name, "a flat JSON header", "deep nesting", "header is nested too deeply")]
    except ValueError as exc:
        return None, [_corrupt(name, "valid JSON", str(exc)[:120], "header is not valid JSON")]
    if not isinstance(parsed, dict):
        return None, [_corrupt(name, "a JSON object", type(parsed).__name__, "header is not a JSON object")]
    findings = [
        error(
            "DUPLICATE_TENSOR",
            f"{name}:{key}",
            "each key once",
            "the key twice",
            "appears twice in the header; loaders silently keep one of them",
            "the file was written by a broken exporter; re-export it",
        )
        for key in sorted(set(duplicates))
    ]
    return parsed, findings


def _check_entries(name: str, entries: dict, buffer_len: int) -> tuple[SafetensorsHeader, list[Finding]]:
    findings: list[Finding] = []
    metadata = entries.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        findings.append(_corrupt(name, "__metadata__ as {str: str}", type(metadata).__name__, "bad metadata"))
        metadata = {}
    sound = True
    tensors: dict[str, TensorInfo] = {}
    truncated: list[str] = []
    for key, entry in entries.items():
        subject = key
        info, problem = _tensor_info(name, key, entry)
        if problem is not None:
            findings.append(problem)
            sound = False
            continue
        if info.end > buffer_len:  # listed (the structure checks may use it) but never read
            truncated.append(subject)
            sound = False
        tensors[key] = info
    if truncated:
        findings.append(
            _truncated(
                name,
                "the data of every tensor inside the file",
                f"{len(truncated)} tensor(s) ending beyond the file's {buffer_len}-byte data buffer "
                f"(first: {truncated[0]})",
            )
        )
    if sound:
        tiling = _tiling_problem(name, sorted(tensors.values(), key=lambda t: (t.begin, t.end)), buffer_len)
        if tiling is not None:
            findings.append(tiling)
            sound = False
    return SafetensorsHeader(file=name, tensors=tensors, metadata=metadata, sound=sound), findings


def _tensor_info(name: str, key: str, entry: object) -> tuple[TensorInfo | None, Finding | None]:
    subject = key
    if not isinstance(entry, dict):
        return None, _corrupt(name, "an object with dtype/shape/data_offsets", type(entry).__name__, subject)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        return None, error(
            "DTYPE_UNKNOWN",
            subject,
            f"one of {', '.join(DTYPE_SIZES)}",
            repr(dtype)[:40],
            f"has a dtype this reader does not know (in {name})",
            "a newer safetensors dtype or a corrupt header",
        )
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(_is_count(d) for d in shape)):
        return None, _corrupt(name, f"shape as <= {MAX_RANK} non-negative ints", repr(shape)[:60], subject)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return None, _corrupt(name, "data_offsets as [begin, end]", repr(offsets)[:60], subject)
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end < begin or end - begin != nbytes:
        return None, _corrupt(
            name,
            f"{nbytes} bytes for {dtype} {shape}",
            f"data_offsets [{begin}, {end}]",
            f"{subject}: byte range does not match its shape and dtype",
        )
    return TensorInfo(key, dtype, tuple(shape), begin, end, name), None


def _tiling_problem(name: str, ordered: list[TensorInfo], buffer_len: int) -> Finding | None:
    position = 0
    for t in ordered:
        if t.begin < position:
            return _corrupt(name, f"{t.name} to start at or after byte {position}", str(t.begin), "overlap")
        if t.begin > position:
            return _corrupt(name, f"{t.name} to start at byte {position}", str(t.begin), "gap in the data")
        position = t.end
    if position != buffer_len:
        return _corrupt(
            name, f"{buffer_len} data bytes used by the tensors", f"{position} used", "trailing bytes"
        )
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _corrupt(name: str, expected: str, found: str, what: str) -> Finding:
    return error(
        "HEADER_CORRUPT",
        name,
        expected,
        found,
        f"safetensors header is corrupt ({what})",
        "the file is damaged or not a safetensors file; re-download or re-export it",
    )


def _truncated(name: str, expected: str, found: str) -> Finding:
    return error(
        "FILE_TRUNCATED",
        name,
        expected,
        found,
        f"file is truncated: expected {expected}, found {found}",
        "an interrupted download or copy; fetch the file again",
    )
