"""Dtype rules: packed integers are int32, scales fp16, and unquantized tensors share one dtype.

Loaders cast what they can (bf16 scales become fp16, an fp32 norm in an fp16 model is cast down), so
those are warnings; a dtype a loader cannot interpret (float qweight, integer scales) is an error.
"""

from __future__ import annotations

from collections import Counter

from qserve.validate.inventory import TensorInventory
from qserve.validate.layout import INT_SUFFIXES, QUANT_SUFFIXES
from qserve.validate.report import Finding, error, warning
from qserve.validate.safetensors_header import FLOAT_DTYPES, TensorInfo

_CONFIG_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def check_quant_dtype(subject: str, suffix: str, dtype: str) -> list[Finding]:
    """The dtype rule for one tensor of a quantized Linear (`suffix`: qweight, scales, bias, ...)."""
    if suffix in INT_SUFFIXES and dtype != "I32":
        return [_mismatch(subject, "I32", dtype, "packed integers must be int32", error)]
    if suffix == "scales" and dtype != "F16":
        if dtype in ("BF16", "F32"):
            return [_mismatch(subject, "F16", dtype, "loaders cast scales to fp16", warning)]
        return [_mismatch(subject, "F16", dtype, "scales must be floating point", error)]
    if suffix == "bias" and dtype not in FLOAT_DTYPES:
        return [_mismatch(subject, "F16", dtype, "a bias must be floating point", error)]
    return []


def unquantized_consistency(tensors: dict[str, TensorInfo], quantized: set[str]) -> list[Finding]:
    """Unquantized float tensors (embeddings, norms, lm_head) should share one dtype."""
    plain = [
        t
        for name, t in tensors.items()
        if t.dtype in FLOAT_DTYPES and name.rpartition(".")[0] not in quantized
    ]
    if not plain:
        return []
    counts = Counter(t.dtype for t in plain)
    majority = counts.most_common(1)[0][0]
    return [
        warning(
            "UNQUANT_DTYPE_INCONSISTENT",
            t.name,
            majority,
            t.dtype,
            f"is {t.dtype} while {counts[majority]} other unquantized tensors are {majority}",
            "a mixed export; loaders cast it, but check that it is the intended tensor",
        )
        for t in plain
        if t.dtype != majority
    ]


def config_dtype(config: object, inventory: TensorInventory) -> list[Finding]:
    """config.json's dtype should be the dtype the unquantized weights were saved in."""
    if not isinstance(config, dict):
        return []
    key = "torch_dtype" if "torch_dtype" in config else "dtype"  # transformers 5 writes `dtype`
    declared = config.get(key)
    want = _CONFIG_DTYPES.get(declared) if isinstance(declared, str) else None
    found = Counter(
        t.dtype
        for name, t in inventory.tensors.items()
        if t.dtype in FLOAT_DTYPES and name.rpartition(".")[2] not in (*QUANT_SUFFIXES, "bias")
    )
    if want is None or not found or want in found:
        return []
    return [
        warning(
            "UNQUANT_DTYPE_INCONSISTENT",
            f"config.json:{key}",
            f"unquantized tensors in {want}",
            ", ".join(sorted(found)),
            f"config.json declares {declared} but no unquantized tensor has that dtype",
            f"set {key} in config.json to the dtype the weights were saved in",
        )
    ]


def _mismatch(subject: str, expected: str, found: str, why: str, make) -> Finding:
    return make("DTYPE_MISMATCH", subject, expected, found, f"dtype {found}, expected {expected} ({why})")
