"""Find the quantization metadata wherever the ecosystem puts it, under whichever alias.

Sources, in the order qserve (like AutoGPTQ / GPTQModel) reads them: `quantize_config.json`,
`quant_config.json` (AutoAWQ's legacy file: `w_bit`, `q_group_size`, `zero_point`, `version`), and
`config.json["quantization_config"]` (what transformers and vLLM read first). When two sources
disagree, different loaders will build different models from the same files: that is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from qserve.validate.report import Finding, error, info, warning

# Mirrors qserve.kernels.packing.SUPPORTED_BITS (a test keeps them equal): importing packing would
# import torch, and the header-only check must start in well under a second.
SUPPORTED_BITS = (2, 4, 8)

# (canonical field, aliases in lookup order)
_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("method", ("quant_method",)),
    ("bits", ("bits", "w_bit", "wbits")),
    ("group_size", ("group_size", "q_group_size", "groupsize")),
    ("sym", ("sym",)),
    ("desc_act", ("desc_act",)),
    ("static_groups", ("static_groups",)),
    ("zero_point", ("zero_point",)),
    ("lm_head", ("lm_head",)),
    ("format", ("checkpoint_format", "format", "version")),
    ("is_marlin_format", ("is_marlin_format",)),
    ("modules_to_not_convert", ("modules_to_not_convert",)),
    ("dynamic", ("dynamic",)),
)
_BOOL_FIELDS = ("sym", "desc_act", "static_groups", "zero_point", "lm_head", "is_marlin_format")
_CONFLICT_FIELDS = ("method", "bits", "group_size", "sym", "desc_act", "zero_point", "format")
_AWQ_ONLY_KEYS = ("w_bit", "q_group_size", "zero_point", "version")
_GPTQ_ONLY_KEYS = ("desc_act", "damp_percent", "static_groups", "true_sequential")

GPTQ_FORMATS = {"gptq": "v1: qzeros store z - 1", "gptq_v2": "v2: qzeros store z"}
_GPTQ_REPACKED = {
    "marlin": "Marlin's tile-permuted layout",
    "bitblas": "BitBLAS's repacked layout",
    "qqq": "QQQ's W4A8 layout",
}
_AWQ_OTHER_VERSIONS = {
    "gemv": "AutoAWQ's GEMV layout packs qweight along the input dim ([out, in / 8]) for a batch-1 kernel",
    "gemv_fast": "llm-awq's GEMV-fast layout interleaves and reorders weights for its own kernel",
    "marlin": "AutoAWQ's Marlin layout stores weight tiles permuted for the Marlin kernel",
}


@dataclass(frozen=True)
class QuantMetadata:
    method: str  # "gptq" or "awq"; anything else was reported and stops the checks
    bits: int
    group_size: int  # -1: one group over the whole input
    sym: bool
    desc_act: bool
    static_groups: bool
    zero_point: bool
    checkpoint_format: str | None  # GPTQ: gptq | gptq_v2
    version: str | None  # AWQ: gemm
    lm_head: bool
    modules_to_not_convert: tuple[str, ...]
    source: str

    def skips(self, module: str) -> bool:
        """True when `module` is listed as not converted (substring match, as vLLM's AWQ loader does)."""
        return any(entry and entry in module for entry in self.modules_to_not_convert)


@dataclass(frozen=True)
class Declared:
    """What the highest-precedence metadata source says, even when it is unsupported (for the report)."""

    source: str
    method: str | None
    bits: int | None
    group_size: int | None
    format: str | None  # checkpoint_format / version as written
    desc_act: bool | None


def find_metadata(
    sources: list[tuple[str, object]], has_qweight: bool
) -> tuple[QuantMetadata | None, Declared | None, list[Finding]]:
    """`sources`: (label, raw dict or None) in precedence order.

    Returns (metadata, or None when it is missing or unsupported; what was declared; findings).
    """
    findings: list[Finding] = []
    normalized: list[tuple[str, dict]] = []
    for label, raw in sources:
        if raw is None:
            continue
        if not isinstance(raw, dict):
            findings.append(_invalid(label, "a JSON object", type(raw).__name__))
            continue
        fields, problems = _normalize(label, raw)
        findings += problems
        normalized.append((label, fields))
    if not normalized:
        hint = (
            "the tensors are quantized (*.qweight): add the quantize_config.json the quantizer wrote"
            if has_qweight
            else "this looks like an unquantized model; run `qserve quantize` on it first"
        )
        findings.append(
            error(
                "META_MISSING",
                "quantization_config",
                "config.json quantization_config, quantize_config.json or quant_config.json",
                "none of them",
                "no quantization metadata found",
                hint,
            )
        )
        return None, None, findings
    primary_label, primary = normalized[0]
    declared = Declared(
        source=primary_label,
        method=primary.get("method"),
        bits=primary.get("bits"),
        group_size=primary.get("group_size"),
        format=primary.get("format"),
        desc_act=primary.get("desc_act"),
    )
    for label, other in normalized[1:]:
        for name in _CONFLICT_FIELDS:
            if name in primary and name in other and primary[name] != other[name]:
                findings.append(
                    error(
                        "META_CONFLICT",
                        f"{label}:{name}",
                        f"{primary[name]!r} (as in {primary_label})",
                        repr(other[name]),
                        f"disagrees with {primary_label}",
                        "loaders read different files, so they would build different models; "
                        "make the files agree",
                    )
                )
    meta, problems = _resolve(primary_label, primary)
    return meta, declared, findings + problems


def _normalize(label: str, raw: dict) -> tuple[dict, list[Finding]]:
    fields: dict = {}
    findings: list[Finding] = []
    for name, aliases in _ALIASES:
        key = next((k for k in aliases if k in raw), None)
        if key is None:
            continue
        value, subject = raw[key], f"{label}:{key}"
        if name in ("bits", "group_size"):
            if not (isinstance(value, int) and not isinstance(value, bool)):
                findings.append(_invalid(subject, "an integer", repr(value)[:40]))
                continue
        elif name in _BOOL_FIELDS:
            if not isinstance(value, bool):
                findings.append(_invalid(subject, "true or false", repr(value)[:40]))
                continue
        elif name in ("method", "format"):
            if value is None:
                continue
            if not isinstance(value, str):
                findings.append(_invalid(subject, "a string", repr(value)[:40]))
                continue
            value = value.lower()
        elif name == "modules_to_not_convert":
            if value is None:
                continue
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                findings.append(_invalid(subject, "a list of module names", repr(value)[:40]))
                continue
            value = tuple(value)
        fields[name] = value
    if "method" not in fields:
        # Legacy files carry no quant_method: AutoAWQ's quant_config.json and old AutoGPTQ files.
        if any(k in raw for k in _AWQ_ONLY_KEYS):
            fields["method"] = "awq"
        elif any(k in raw for k in _GPTQ_ONLY_KEYS) or label.startswith("quantize_config"):
            fields["method"] = "gptq"
    return fields, findings


def _resolve(label: str, f: dict) -> tuple[QuantMetadata | None, list[Finding]]:
    findings: list[Finding] = []
    method = f.get("method")
    if method not in ("gptq", "awq"):
        findings.append(
            error(
                "METHOD_UNKNOWN",
                f"{label}:quant_method",
                "gptq or awq",
                repr(method),
                "names a quantization method qserve does not read",
                "qserve validates and serves GPTQ and AWQ-GEMM checkpoints only",
            )
        )
        return None, findings
    for name in ("bits", "group_size"):
        if name not in f:
            findings.append(
                error(
                    "META_MISSING",
                    f"{label}:{name}",
                    f"an integer {name}",
                    "no such field",
                    f"{name} is missing; loaders refuse the checkpoint",
                    "add it from the quantization run's settings",
                )
            )
    if "bits" not in f or "group_size" not in f:
        return None, findings
    bits, group_size = f["bits"], f["group_size"]
    allowed_bits = (4,) if method == "awq" else SUPPORTED_BITS
    if bits not in allowed_bits:
        why = "AWQ GEMM exists only at 4 bits" if method == "awq" else "3-bit packs across word boundaries"
        findings.append(
            error(
                "BITS_UNSUPPORTED",
                f"{label}:bits",
                " or ".join(map(str, allowed_bits)),
                str(bits),
                f"bits={bits} is not a supported {method.upper()} width",
                why if bits == 3 or method == "awq" else "the packed format has no such width",
            )
        )
        return None, findings
    if group_size != -1 and group_size <= 0:
        findings.append(_invalid(f"{label}:group_size", "-1 or a positive integer", str(group_size)))
        return None, findings
    fmt = f.get("format")
    checkpoint_format = version = None
    if method == "gptq":
        checkpoint_format = "marlin" if f.get("is_marlin_format") else (fmt or "gptq")
        if checkpoint_format not in GPTQ_FORMATS:
            layout = _GPTQ_REPACKED.get(checkpoint_format, "an unknown layout")
            findings.append(
                error(
                    "GPTQ_FORMAT_UNSUPPORTED",
                    f"{label}:checkpoint_format",
                    "gptq (v1) or gptq_v2",
                    repr(checkpoint_format),
                    f"the tensors are in {layout}, not the GPTQ layout",
                    "export the checkpoint again in plain GPTQ format (checkpoint_format 'gptq')",
                )
            )
            return None, findings
    else:
        version = fmt or "gemm"
        if fmt is None:
            findings.append(info("AWQ_VERSION_DEFAULTED", f"{label}:version", "no version; assuming gemm"))
        if version != "gemm":
            reason = _AWQ_OTHER_VERSIONS.get(version, f"'{version}' is not an AWQ layout qserve knows")
            findings.append(
                error(
                    "AWQ_VERSION_UNSUPPORTED",
                    f"{label}:version",
                    "gemm",
                    repr(version),
                    f"AWQ version '{version}' is a different packed layout: {reason}; "
                    "vLLM's and qserve's AWQ loaders read only GEMM",
                    "re-quantize or re-export with version 'gemm' (AutoAWQ: quant_config version='GEMM')",
                )
            )
            return None, findings
    if f.get("dynamic"):
        findings.append(
            warning(
                "DYNAMIC_NOT_CHECKED",
                f"{label}:dynamic",
                "no per-module overrides",
                "per-module overrides",
                "per-module `dynamic` overrides are not evaluated (their regexes are untrusted input)",
                "modules they change may be reported as shape mismatches",
            )
        )
    meta = QuantMetadata(
        method=method,
        bits=bits,
        group_size=group_size,
        sym=f.get("sym", True),
        desc_act=f.get("desc_act", False),
        static_groups=f.get("static_groups", False),
        zero_point=f.get("zero_point", True),
        checkpoint_format=checkpoint_format,
        version=version,
        lm_head=f.get("lm_head", False),
        modules_to_not_convert=f.get("modules_to_not_convert", ()),
        source=label,
    )
    return meta, findings


def _invalid(subject: str, expected: str, found: str) -> Finding:
    return error(
        "META_INVALID",
        subject,
        expected,
        found,
        f"has the wrong type or value: expected {expected}, found {found}",
        "fix the metadata file; loaders will refuse or misread it",
    )
