"""Findings and the report that groups them.

A finding is one fact about one tensor, field or file. A 30-layer model with a wrong group size has
the same problem in 30 places, so the text report folds findings that differ only in the layer index
into one line (`model.layers.{0..29}.mlp.down_proj.scales (30 layers): ...`); `to_json` keeps them all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

# The first `.<n>.` segment of a tensor name is its decoder-block index (`model.layers.7.mlp...`).
_LAYER_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.)")


@dataclass(frozen=True)
class Finding:
    code: str  # stable identifier, e.g. SHAPE_MISMATCH; scripts match on it
    severity: Severity
    subject: str  # tensor name, metadata field (`quantize_config.json:bits`) or file name
    expected: str
    found: str
    message: str  # what is wrong, without the subject (the report prefixes it)
    hint: str = ""  # the likely cause and what to do

    def line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


def error(code: str, subject: str, expected: str, found: str, message: str, hint: str = "") -> Finding:
    return Finding(code, "error", subject, expected, found, message, hint)


def warning(code: str, subject: str, expected: str, found: str, message: str, hint: str = "") -> Finding:
    return Finding(code, "warning", subject, expected, found, message, hint)


def info(code: str, subject: str, message: str, hint: str = "") -> Finding:
    return Finding(code, "info", subject, "", "", message, hint)


@dataclass(frozen=True)
class FindingGroup:
    """Findings with the same code, message and hint whose subjects differ only in the layer index."""

    first: Finding
    pattern: str  # subject with the layer index replaced by the set of indices
    count: int

    def line(self) -> str:
        where = self.pattern if self.count == 1 else f"{self.pattern} ({self.count} layers)"
        return f"{self.first.severity:<7} {self.first.code:<26} {where}: {self.first.line()}"


def layer_pattern(subject: str) -> tuple[str, int | None]:
    """`model.layers.7.mlp.up_proj.scales` -> (`model.layers.{}.mlp.up_proj.scales`, 7)."""
    match = _LAYER_INDEX.search(subject)
    if match is None:
        return subject, None
    return subject[: match.start()] + "{}" + subject[match.end() :], int(match.group(1))


def compress_indices(indices: Iterable[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> '0..3,7,9..10'."""
    values = sorted(set(indices))
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def group_findings(findings: Iterable[Finding]) -> list[FindingGroup]:
    buckets: dict[tuple, tuple[Finding, list[int | None]]] = {}
    for f in findings:
        pattern, index = layer_pattern(f.subject)
        key = (f.severity, f.code, pattern, f.message, f.hint)
        buckets.setdefault(key, (f, []))[1].append(index)
    groups = []
    for (_, _, pattern, *_), (first, indices) in buckets.items():
        known = [i for i in indices if i is not None]
        if len(known) == len(indices) and len(known) > 1:
            shown = pattern.replace("{}", "{" + compress_indices(known) + "}")
        elif known:
            shown = first.subject
        else:
            shown = pattern
        groups.append(FindingGroup(first=first, pattern=shown, count=len(indices)))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(groups, key=lambda g: order[g.first.severity])


@dataclass
class Report:
    """What `validate_checkpoint` found; `ok` is the verdict, `findings` the evidence."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    strict: bool = False
    deep: bool = False
    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    checkpoint_format: str | None = None  # GPTQ: gptq (v1) / gptq_v2
    version: str | None = None  # AWQ: gemm / gemv / ...
    desc_act: bool | None = None
    metadata_source: str | None = None
    quantized_linears: int = 0
    weight_files: int = 0

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def ok(self) -> bool:
        failing = ("error", "warning") if self.strict else ("error",)
        return not any(f.severity in failing for f in self.findings)

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def describe_format(self) -> str:
        if self.method is None:
            return "no quantization metadata"
        parts = [self.method.upper()]
        if self.bits is not None:
            parts.append(f"{self.bits}-bit")
        if self.group_size is not None:
            parts.append("per-channel" if self.group_size == -1 else f"g{self.group_size}")
        if self.checkpoint_format:
            parts.append(f"checkpoint_format={self.checkpoint_format}")
        if self.version:
            parts.append(f"version={self.version}")
        if self.desc_act:
            parts.append("act-order")
        return " ".join(parts)

    def summary(self) -> str:
        errors, warnings = self.count("error"), self.count("warning")
        verdict = "valid" if self.ok else "INVALID"
        strict = " (strict: warnings fail)" if self.strict and warnings else ""
        depth = "headers + data" if self.deep else "headers only"
        return (
            f"{verdict}{strict}: {errors} error(s), {warnings} warning(s) - {self.describe_format()}, "
            f"{self.quantized_linears} quantized linears in {self.weight_files} weight file(s), "
            f"checked {depth}: {self.path}"
        )

    def format_text(self) -> str:
        lines = [group.line() for group in group_findings(self.findings)]
        lines.append(self.summary())
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "strict": self.strict,
            "deep": self.deep,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "checkpoint_format": self.checkpoint_format,
            "version": self.version,
            "desc_act": self.desc_act,
            "metadata_source": self.metadata_source,
            "quantized_linears": self.quantized_linears,
            "weight_files": self.weight_files,
            "counts": {s: self.count(s) for s in SEVERITIES},
            "findings": [asdict(f) for f in self.findings],
        }
