"""Header-level checks: every Linear quantized completely, with the shapes and dtypes its metadata implies.

With a known architecture (quantize/arch.py) and config.json, the validator knows which Linears must
exist and their (in, out) features, so a wrong group size or bit width shows up as a named shape
mismatch. With an unknown architecture it checks whatever `*.qweight` it finds for internal consistency.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qserve.errors import ConfigError
from qserve.quantize.arch import arch_for_config
from qserve.validate.dtypes import check_quant_dtype, unquantized_consistency
from qserve.validate.inventory import TensorInventory
from qserve.validate.layout import QUANT_SUFFIXES, Layout, llama_linear_features
from qserve.validate.metadata import QuantMetadata
from qserve.validate.report import Finding, error, warning
from qserve.validate.safetensors_header import TensorInfo


@dataclass(frozen=True)
class QuantLinear:
    """A quantized Linear whose tensors passed the header checks; `--deep` reads only these."""

    prefix: str
    parts: dict[str, TensorInfo]  # suffix (qweight, qzeros, scales, g_idx, bias) -> tensor
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Expected:
    """What the architecture says must exist: Linear prefix -> (in, out) or None when unknown."""

    linears: dict[str, tuple[int, int] | None]
    blocks: str | None  # e.g. "model.layers"
    num_blocks: int | None


def expected_linears(config: object) -> tuple[Expected | None, list[Finding]]:
    if not isinstance(config, dict):
        return None, []
    try:
        spec = arch_for_config(config)
    except ConfigError as exc:
        return None, [
            warning(
                "ARCH_UNKNOWN",
                "config.json:architectures",
                "an architecture qserve knows",
                str(config.get("architectures") or config.get("model_type"))[:80],
                f"{exc}; only the quantized tensors present are checked",
                "shapes are checked against each other, not against the model's dimensions",
            )
        ]
    layers = config.get("num_hidden_layers")
    if not (isinstance(layers, int) and not isinstance(layers, bool) and 0 < layers <= 10_000):
        return None, [
            warning(
                "CONFIG_INCOMPLETE",
                "config.json:num_hidden_layers",
                "a positive integer",
                repr(layers)[:40],
                "the number of blocks is unknown; only the quantized tensors present are checked",
            )
        ]
    features = llama_linear_features(config) or {}
    linears = {
        f"{spec.blocks}.{i}.{name}": features.get(name) for i in range(layers) for name in spec.linears
    }
    return Expected(linears, spec.blocks, layers), []


def check_structure(
    meta: QuantMetadata, expected: Expected | None, inventory: TensorInventory
) -> tuple[list[QuantLinear], list[Finding]]:
    tensors = inventory.tensors
    by_prefix: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        by_prefix.setdefault(prefix, {})[suffix] = info
    quantized = {p for p, parts in by_prefix.items() if any(s in parts for s in QUANT_SUFFIXES)}
    layout = Layout(meta.method, meta.bits, meta.group_size)
    findings: list[Finding] = []
    good: list[QuantLinear] = []

    def check(prefix: str, features: tuple[int, int] | None) -> None:
        linear, problems = _check_linear(prefix, by_prefix[prefix], meta, layout, features)
        findings.extend(problems)
        if linear is not None:
            good.append(linear)

    # A Linear with a tensor in an unreadable shard cannot be checked; the shard itself was reported.
    unverifiable = {name.rpartition(".")[0] for name in inventory.unavailable}
    if expected is None:
        for prefix in sorted(quantized - unverifiable):
            check(prefix, None)
    else:
        for prefix, features in expected.linears.items():
            skipped = meta.skips(prefix)
            if prefix in unverifiable:
                continue
            if prefix in quantized:
                if skipped:
                    findings.append(_skipped_but_quantized(prefix))
                else:
                    check(prefix, features)
            elif f"{prefix}.weight" in tensors:
                if not skipped:
                    findings.append(_not_quantized(prefix, tensors[f"{prefix}.weight"]))
            elif inventory.complete:  # else the tensors may sit in the file that could not be read
                findings.append(_missing(prefix))
        beyond = _beyond_last_block(tensors, expected)
        reported = {f.subject for f in beyond}
        for prefix in sorted(quantized - expected.linears.keys()):
            if prefix == "lm_head" and meta.lm_head:
                check(prefix, None)
                continue
            for suffix in sorted(by_prefix[prefix]):
                if f"{prefix}.{suffix}" not in reported:
                    findings.append(
                        _orphan(f"{prefix}.{suffix}", "not a quantized Linear of this architecture")
                    )
        findings += beyond
    if not quantized and inventory.complete:
        findings.append(
            error(
                "NOTHING_QUANTIZED",
                "weights",
                "quantized Linears (*.qweight)",
                "none",
                "the metadata declares a quantized checkpoint but no tensor is quantized",
                "the weights come from the unquantized model; export the quantized weights",
            )
        )
    findings += unquantized_consistency(tensors, quantized)
    return good, findings


def _check_linear(
    prefix: str,
    parts: dict[str, TensorInfo],
    meta: QuantMetadata,
    layout: Layout,
    features: tuple[int, int] | None,
) -> tuple[QuantLinear | None, list[Finding]]:
    required = ["qweight", "qzeros", "scales"]
    if meta.method == "gptq" and meta.desc_act:
        required.append("g_idx")  # act-order groups cannot be recomputed
    findings: list[Finding] = []
    missing = [s for s in required if s not in parts]
    if missing:
        findings.append(
            error(
                "LAYER_INCOMPLETE",
                prefix,
                ", ".join(required),
                ", ".join(sorted(parts)) or "nothing",
                f"quantized Linear lacks {', '.join(missing)}",
                "the export was interrupted or the tensors were renamed; re-export the checkpoint",
            )
        )
        return None, findings
    if meta.method == "gptq" and "g_idx" not in parts:
        findings.append(
            warning(
                "LAYER_INCOMPLETE",
                prefix,
                "qweight, qzeros, scales, g_idx",
                ", ".join(sorted(parts)),
                "GPTQ Linear has no g_idx; loaders that require it will refuse the checkpoint",
                "re-export with g_idx (i // group_size without act-order)",
            )
        )
    if meta.method == "awq" and "g_idx" in parts:
        findings.append(_orphan(f"{prefix}.g_idx", "AWQ GEMM has no g_idx"))
    if "weight" in parts:
        findings.append(_orphan(f"{prefix}.weight", "an unquantized weight next to its qweight"))
    for suffix, info in sorted(parts.items()):
        findings += check_quant_dtype(f"{prefix}.{suffix}", suffix, info.dtype)
    qweight = parts["qweight"]
    implied = layout.features(qweight.shape)
    if implied is None:
        findings.append(_shape(f"{prefix}.qweight", "a 2-D tensor", qweight.shape, "qweight must be 2-D", ""))
        return None, findings
    in_f, out_f = features or implied
    if in_f % layout.per_word or out_f % layout.per_word:
        findings.append(
            error(
                "SHAPE_MISMATCH",
                prefix,
                f"in and out features divisible by {layout.per_word}",
                f"in {in_f}, out {out_f}",
                f"features cannot be packed {layout.per_word} per int32 word",
                "this Linear cannot be quantized in this format; list it in modules_to_not_convert",
            )
        )
        return None, findings
    if layout.group_size != -1 and in_f % layout.group_size:
        findings.append(
            error(
                "GROUP_SIZE_NOT_DIVIDING",
                prefix,
                f"in_features divisible by group_size {layout.group_size}",
                f"in_features {in_f}",
                f"group_size {layout.group_size} does not divide in_features {in_f}",
                "kernels (vLLM's included) require whole groups; quantize again with "
                + _dividing_group_sizes(in_f),
            )
        )
    shapes = layout.shapes(in_f, out_f)
    for suffix, want in shapes.items():
        info = parts.get(suffix)
        if info is None or info.shape == want:
            continue
        if suffix == "qzeros" and _same_group_error(parts, shapes):
            continue  # the scales finding already says the group count is wrong
        what = (
            f"{meta.method.upper()} {meta.bits}-bit, group_size {layout.group_size}, in {in_f}, out {out_f}"
        )
        if suffix == "qweight":
            hint = layout.explain_qweight(info.shape, in_f, out_f)
        elif suffix in ("scales", "qzeros") and len(info.shape) == 2 and info.shape[0] != want[0]:
            what = f"group_size {layout.group_size} and in_features {in_f}"
            hint = layout.explain_groups(info.shape[0], in_f)
        else:
            hint = "the tensor was packed for another shape; re-export the checkpoint"
        findings.append(_shape(f"{prefix}.{suffix}", list(want), info.shape, f"{what} need", hint))
    if any(f.severity == "error" for f in findings):
        return None, findings
    return QuantLinear(prefix, dict(parts), in_f, out_f), findings


def _dividing_group_sizes(in_f: int) -> str:
    sizes = [g for g in (128, 64, 32, 16) if in_f % g == 0]
    if not sizes:
        return "group_size -1 (one group per output channel)"
    return f"a group size that divides {in_f}: {' or '.join(map(str, sizes))}"


def _same_group_error(parts: dict[str, TensorInfo], shapes: dict[str, tuple[int, ...]]) -> bool:
    """True when scales and qzeros differ from the expected shapes only in their (equal) group count."""
    scales, qzeros = parts["scales"].shape, parts["qzeros"].shape
    want_s, want_z = shapes["scales"], shapes["qzeros"]
    return (
        len(scales) == len(qzeros) == 2
        and scales[0] == qzeros[0] != want_s[0]
        and (scales[1], qzeros[1]) == (want_s[1], want_z[1])
    )


def _beyond_last_block(tensors: dict[str, TensorInfo], expected: Expected) -> list[Finding]:
    pattern = re.compile(re.escape(expected.blocks) + r"\.(\d+)\.")
    findings = []
    for name in sorted(tensors):
        m = pattern.match(name)
        if m and int(m.group(1)) >= expected.num_blocks:
            findings.append(_orphan(name, f"block index beyond num_hidden_layers={expected.num_blocks}"))
    return findings


def _shape(subject: str, expected, found: tuple[int, ...], what: str, hint: str) -> Finding:
    return error(
        "SHAPE_MISMATCH",
        subject,
        str(expected),
        str(list(found)),
        f"shape {list(found)} but {what} {expected}",
        hint,
    )


def _orphan(name: str, why: str) -> Finding:
    return error(
        "ORPHAN_TENSOR",
        name,
        "only tensors the model's modules own",
        "an extra tensor",
        f"is not used by any module ({why}); strict loaders refuse unexpected keys",
        "remove it or fix the export that wrote it",
    )


def _not_quantized(prefix: str, weight: TensorInfo) -> Finding:
    return error(
        "LINEAR_NOT_QUANTIZED",
        prefix,
        "qweight/qzeros/scales, or the module listed in modules_to_not_convert",
        f"an unquantized weight {list(weight.shape)} {weight.dtype}",
        "is left unquantized but not listed in modules_to_not_convert",
        "loaders will look for qweight and fail; quantize it or add it to modules_to_not_convert",
    )


def _skipped_but_quantized(prefix: str) -> Finding:
    return error(
        "SKIPPED_BUT_QUANTIZED",
        prefix,
        "an unquantized weight (it is listed in modules_to_not_convert)",
        "qweight/qzeros/scales",
        "is quantized although modules_to_not_convert lists it",
        "loaders build it unquantized and fail on qweight; fix modules_to_not_convert",
    )


def _missing(prefix: str) -> Finding:
    return error(
        "LINEAR_MISSING",
        prefix,
        "qweight/qzeros/scales or weight",
        "no tensor",
        "has no weights at all",
        "the checkpoint is incomplete or belongs to another architecture",
    )
