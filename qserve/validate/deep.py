"""`--deep`: read the tensor data, one Linear at a time, and check the numbers.

Only files whose header passed every check are opened (lazily, with safetensors' `safe_open`), and
only Linears whose shapes passed. Per Linear it reads the full scales and g_idx (small) and the first
SAMPLE_COLUMNS output columns of qweight/qzeros, so memory stays bounded on a 70B model; unquantized
tensors are scanned for NaN/Inf in row chunks.

The zero-point convention is inferred from the data rather than trusted: within a group, the mean
integer code sits at the true zero point (weights are roughly centred), so the stored zeros read
under the right convention give mean(q) - z close to 0, and under the wrong one close to +-1.
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass

from qserve.validate.checks import QuantLinear
from qserve.validate.files import CheckpointDir
from qserve.validate.inventory import TensorInventory
from qserve.validate.layout import QUANT_SUFFIXES
from qserve.validate.metadata import GPTQ_FORMATS, QuantMetadata
from qserve.validate.report import Finding, error, layer_pattern, warning
from qserve.validate.safetensors_header import FLOAT_DTYPES
from qserve.validate.tensor_reader import TensorReader

SAMPLE_COLUMNS = 128  # output columns sampled per Linear for the zero-point and magnitude checks
OUTLIER_RATIO = 20.0  # sample RMS this far from the median of the same Linear across blocks
MIN_PEERS = 3  # a median over fewer blocks says nothing
FIT, MISFIT = 0.35, 0.65  # |median(mean q - z)| under the right / wrong zero convention
CHUNK_ELEMENTS = 1 << 22  # rows of an unquantized tensor scanned at once for NaN/Inf


@dataclass(frozen=True)
class LinearStats:
    prefix: str
    zero_fit: str | None  # the convention the stored zeros fit, None when undecided
    rms: float


def deep_check(
    cdir: CheckpointDir, inventory: TensorInventory, meta: QuantMetadata, linears: list[QuantLinear]
) -> list[Finding]:
    from safetensors import SafetensorError

    read_errors = (SafetensorError, OSError, RuntimeError, ValueError)
    findings: list[Finding] = []
    stats: list[LinearStats] = []
    readable = [lin for lin in linears if all(t.file in inventory.sound_files for t in lin.parts.values())]
    with TensorReader(cdir, inventory) as reader, _single_thread():
        for linear in readable:
            try:
                linear_stats, problems = _check_linear(reader, linear, meta)
            except read_errors as exc:  # the file changed or is damaged in a way the header hid
                findings.append(_unreadable(linear.prefix, exc))
                continue
            findings += problems
            if linear_stats is not None:
                stats.append(linear_stats)
        quantized = {lin.prefix for lin in linears}
        for name, info in sorted(inventory.tensors.items()):
            prefix, _, suffix = name.rpartition(".")
            if info.dtype not in FLOAT_DTYPES or info.file not in inventory.sound_files:
                continue
            if prefix in quantized and suffix in QUANT_SUFFIXES:
                continue  # scales were checked above
            try:
                findings += _check_finite(reader, name, info.shape)
            except read_errors as exc:
                findings.append(_unreadable(name, exc))
    findings += _zero_convention(meta, stats)
    findings += _magnitude_outliers(stats)
    return findings


@contextlib.contextmanager
def _single_thread():
    """Per-layer tensors are small: intra-op thread fan-out costs more than it saves (and the caller,
    e.g. the server about to load the model, gets its own thread setting back)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_linear(reader: TensorReader, linear: QuantLinear, meta: QuantMetadata):
    import torch

    from qserve.kernels import packing

    prefix, findings = linear.prefix, []
    scales = reader.full(f"{prefix}.scales").float()  # [G, out]
    n_groups, in_f = scales.shape[0], linear.in_features
    bad = int((~torch.isfinite(scales)).sum())
    if bad:
        findings.append(_count("NONFINITE", f"{prefix}.scales", bad, scales.numel(), "NaN/Inf scales"))
    nonpositive = int((scales <= 0).sum())
    if nonpositive:
        findings.append(
            _count("SCALES_NONPOSITIVE", f"{prefix}.scales", nonpositive, scales.numel(), "scales <= 0")
        )
    gs = packing.effective_group_size(in_f, meta.group_size)
    contiguous = torch.arange(in_f, dtype=torch.int64) // gs
    g_idx = contiguous
    if "g_idx" in linear.parts:
        g_idx = reader.full(f"{prefix}.g_idx").long()
        problem = _check_g_idx(f"{prefix}.g_idx", g_idx, contiguous, n_groups, gs, meta)
        if problem is not None:
            return None, [*findings, problem]
    k = min(SAMPLE_COLUMNS, linear.out_features)
    raw, candidates, declared = _sample_codes(reader, linear, meta, scales[:, :k], g_idx, gs)
    intweight = raw.intweight.float()  # [k, in]
    # Mean code of each (group, column): sum the codes of the group's input channels.
    sums = torch.zeros(n_groups, intweight.shape[0]).index_add_(0, g_idx, intweight.t())
    means = sums / torch.bincount(g_idx, minlength=n_groups).clamp(min=1)[:, None].float()
    offsets = {name: float((means - z.float()).median()) for name, z in candidates.items()}
    fit = _decide(offsets)
    zeros = candidates[declared]
    w = packing.QuantizedWeight(raw.intweight, raw.scales, zeros, g_idx.int(), meta.bits, meta.group_size)
    sample = w.dequantize()  # [k, in]
    finite = sample[torch.isfinite(sample)]
    rms = float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0
    if "bias" in linear.parts:
        findings += _check_finite(reader, f"{prefix}.bias", linear.parts["bias"].shape)
    return LinearStats(prefix, fit, rms), findings


def _sample_codes(reader: TensorReader, linear: QuantLinear, meta: QuantMetadata, scales_k, g_idx, gs: int):
    """Integer codes and stored zeros of the first k output columns, plus each zero-point reading.

    Returns (QuantizedWeight with the zeros exactly as stored, {convention: true zeros}, declared).
    """
    from qserve.kernels import packing

    prefix, k = linear.prefix, scales_k.shape[1]
    words = k // (32 // meta.bits)
    maxq = 2**meta.bits - 1
    if meta.method == "gptq":
        qweight = reader.columns(f"{prefix}.qweight", k)  # [in * bits / 32, k]
        qzeros = reader.columns(f"{prefix}.qzeros", words)  # [G, k * bits / 32]
        # gptq_v2 applies no offset, so these zeros are the stored values.
        raw = packing.unpack_gptq(qweight, qzeros, scales_k, g_idx, meta.bits, gs, "gptq_v2")
        return raw, {"gptq": (raw.zeros + 1) & maxq, "gptq_v2": raw.zeros}, meta.checkpoint_format
    qweight = reader.columns(f"{prefix}.qweight", words)  # [in, k / 8]
    qzeros = reader.columns(f"{prefix}.qzeros", words)  # [G, k / 8]
    raw = packing.unpack_awq(qweight, qzeros, scales_k, meta.group_size)
    return raw, {"z": raw.zeros, "z - 1": (raw.zeros + 1) & maxq}, "z"


def _check_g_idx(subject, g_idx, contiguous, n_groups: int, gs: int, meta: QuantMetadata) -> Finding | None:
    import torch

    out_of_range = int(((g_idx < 0) | (g_idx >= n_groups)).sum())
    if out_of_range:
        return error(
            "GIDX_OUT_OF_RANGE",
            subject,
            f"values in [0, {n_groups})",
            f"{out_of_range} values outside",
            f"{out_of_range} of {g_idx.numel()} group indices fall outside the {n_groups} groups of scales",
            "kernels would read past the scales; the tensor is corrupt or from another export",
        )
    ordered = not meta.desc_act or meta.static_groups
    if ordered and not torch.equal(g_idx, contiguous) and bool((g_idx[1:] < g_idx[:-1]).any()):
        return error(
            "GIDX_NOT_MONOTONIC",
            subject,
            "i // group_size (desc_act is false)",
            "a permuted order",
            "group indices are permuted but the metadata says desc_act false",
            "the checkpoint was quantized with act-order: set desc_act true in its metadata",
        )
    counts = torch.bincount(g_idx, minlength=n_groups)
    wrong = int((counts != gs).sum())
    if wrong or (ordered and not torch.equal(g_idx, contiguous)):
        return error(
            "GROUP_SIZE_WRONG",
            subject,
            f"{gs} input channels per group",
            f"{wrong} of {n_groups} groups with another count",
            f"group indices do not make groups of {gs} channels",
            "the group_size metadata does not match how the tensors were quantized",
        )
    return None


def _decide(offsets: dict[str, float]) -> str | None:
    fits = [name for name, off in offsets.items() if abs(off) < FIT]
    misfits = [name for name, off in offsets.items() if abs(off) > MISFIT]
    if len(fits) == 1 and len(misfits) == len(offsets) - 1:
        return fits[0]
    return None


def _zero_convention(meta: QuantMetadata, stats: list[LinearStats]) -> list[Finding]:
    votes = Counter(s.zero_fit for s in stats if s.zero_fit is not None)
    if not votes:
        return []
    winner, count = votes.most_common(1)[0]
    declared = meta.checkpoint_format if meta.method == "gptq" else "z"
    if winner == declared or count * 2 <= sum(votes.values()):
        return []
    if meta.method == "gptq":
        return [
            error(
                "ZERO_CONVENTION_MISMATCH",
                f"{meta.source}:checkpoint_format",
                f"{declared} ({GPTQ_FORMATS[declared]})",
                f"{winner} in {count} of {len(stats)} Linears",
                f"declares '{declared}' ({GPTQ_FORMATS[declared]}) but the stored zeros of {count} of "
                f"{len(stats)} quantized Linears fit '{winner}' ({GPTQ_FORMATS[winner]})",
                f"every weight would dequantize one step off; set checkpoint_format to '{winner}'",
            )
        ]
    return [
        error(
            "ZERO_CONVENTION_MISMATCH",
            "qzeros",
            "true zero points (AWQ)",
            f"z - 1 in {count} of {len(stats)} Linears",
            f"AWQ stores true zero points, but the stored zeros of {count} of {len(stats)} Linears are "
            "offset by one (GPTQ v1's z - 1 convention)",
            "the checkpoint was packed by a GPTQ exporter; re-export it as AWQ",
        )
    ]


def _magnitude_outliers(stats: list[LinearStats]) -> list[Finding]:
    import statistics

    peers: dict[str, list[LinearStats]] = defaultdict(list)
    for s in stats:
        peers[layer_pattern(s.prefix)[0]].append(s)
    findings = []
    for group in peers.values():
        if len(group) < MIN_PEERS:
            continue
        median = statistics.median(s.rms for s in group)
        if median <= 0:
            continue
        for s in group:
            ratio = s.rms / median
            if ratio > OUTLIER_RATIO or ratio < 1 / OUTLIER_RATIO:
                findings.append(
                    warning(
                        "MAGNITUDE_OUTLIER",
                        s.prefix,
                        f"RMS within {OUTLIER_RATIO:g}x of {median:.3g}",
                        f"{s.rms:.3g}",
                        f"dequantized sample RMS {s.rms:.3g} is {ratio:.3g}x the median {median:.3g} of "
                        f"the same Linear in {len(group)} blocks",
                        "scales or zeros of this layer are probably corrupt",
                    )
                )
    return findings


def _check_finite(reader: TensorReader, name: str, shape: tuple[int, ...]) -> list[Finding]:
    import torch

    if not shape or shape[0] == 0:
        tensors = [reader.full(name)]
    else:
        row = max(1, int(torch.Size(shape[1:]).numel()))
        step = max(1, CHUNK_ELEMENTS // row)
        tensors = (reader.rows(name, i, i + step) for i in range(0, shape[0], step))
    bad = total = 0
    for t in tensors:
        bad += int((~torch.isfinite(t.float())).sum())
        total += t.numel()
    if not bad:
        return []
    return [_count("NONFINITE", name, bad, total, "NaN/Inf values")]


def _count(code: str, subject: str, bad: int, total: int, what: str) -> Finding:
    return error(
        code,
        subject,
        f"no {what}",
        f"{bad} of {total}",
        f"holds {bad} {what} out of {total}",
        "the quantizer diverged or the file is corrupt; re-quantize this model",
    )


def _unreadable(subject: str, exc: Exception) -> Finding:
    return error(
        "DATA_UNREADABLE",
        subject,
        "readable tensor data",
        f"{type(exc).__name__}: {str(exc)[:120]}",
        "tensor data could not be read",
        "the weight file is damaged; re-download it",
    )
