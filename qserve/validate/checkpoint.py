"""`validate_checkpoint`: run every check on a directory and collect the findings into a Report.

Order: files (config, metadata, tokenizer, symlinks) -> safetensors headers -> metadata -> per-Linear
shapes and dtypes -> (`deep`) tensor data. A bad checkpoint never raises: each problem is a finding.
Only a path that is not a checkpoint directory at all raises CheckpointError (the CLI's exit 2).
"""

from __future__ import annotations

import os

from qserve.errors import CheckpointError
from qserve.validate.checks import check_structure, expected_linears
from qserve.validate.dtypes import config_dtype
from qserve.validate.files import CheckpointDir
from qserve.validate.inventory import INDEX_NAME, take_inventory
from qserve.validate.metadata import find_metadata
from qserve.validate.report import Finding, Report, error

CONFIG = "config.json"
METADATA_FILES = ("quantize_config.json", "quant_config.json")
# Any one of these lets transformers build the tokenizer (vocab.json needs merges.txt beside it).
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def validate_checkpoint(path: str | os.PathLike, deep: bool = False, strict: bool = False) -> Report:
    """Check the GPTQ/AWQ checkpoint directory at `path`; see qserve/validate/__init__.py."""
    cdir = CheckpointDir.open(path)
    listing = cdir.listing()
    report = Report(path=str(path), strict=strict, deep=deep)
    findings: list[Finding] = []
    findings += _escaping_links(cdir, listing)

    config, problems = cdir.read_json(CONFIG)
    findings += problems
    if CONFIG not in listing:
        findings.append(
            error(
                "CONFIG_MISSING",
                CONFIG,
                "the model's config.json",
                "no such file",
                "config.json is missing; no loader can build the model",
                "copy config.json from the original model",
            )
        )
    elif config is not None and not isinstance(config, dict):
        findings.append(_not_object(CONFIG, config))
        config = None
    metadata_files = {}
    for name in METADATA_FILES:
        metadata_files[name], problems = cdir.read_json(name)
        findings += problems

    inventory, problems = take_inventory(cdir, listing)
    findings += problems
    has_weights = INDEX_NAME in listing or any(n.endswith(".safetensors") for n in listing)
    if CONFIG not in listing and not has_weights and not any(n in listing for n in METADATA_FILES):
        raise CheckpointError(
            f"{path}: holds no config.json, no quantization metadata and no *.safetensors; "
            "this is not a model checkpoint directory"
        )
    if not has_weights:
        pickles = [n for n in listing if n.endswith((".bin", ".pt", ".pth"))]
        findings.append(
            error(
                "WEIGHTS_MISSING",
                "*.safetensors",
                "model.safetensors or shards with model.safetensors.index.json",
                ", ".join(pickles[:3]) or "no weight file",
                "no safetensors weights found",
                "pickle weights are never loaded (they can run code); convert them to safetensors"
                if pickles
                else "the download is incomplete",
            )
        )
    findings += _tokenizer(cdir, listing)

    quantization_config = config.get("quantization_config") if isinstance(config, dict) else None
    sources = [*metadata_files.items(), (f"{CONFIG}:quantization_config", quantization_config)]
    has_qweight = any(name.endswith(".qweight") for name in inventory.tensors)
    meta, declared, problems = find_metadata(sources, has_qweight)
    findings += problems
    report.weight_files = len(inventory.files)
    report.quantized_linears = sum(1 for name in inventory.tensors if name.endswith(".qweight"))
    if meta is not None:
        report.method, report.bits, report.group_size = meta.method, meta.bits, meta.group_size
        report.checkpoint_format, report.version = meta.checkpoint_format, meta.version
        report.desc_act, report.metadata_source = meta.desc_act, meta.source
    elif declared is not None:  # unsupported: still say what the checkpoint claims to be
        report.method, report.bits, report.group_size = declared.method, declared.bits, declared.group_size
        if declared.method == "awq":
            report.version = declared.format
        else:
            report.checkpoint_format = declared.format
        report.desc_act, report.metadata_source = declared.desc_act, declared.source
    if meta is not None and inventory.tensors:
        expected, problems = expected_linears(config)
        findings += problems
        linears, problems = check_structure(meta, expected, inventory)
        findings += problems
        if deep:
            from qserve.validate.deep import deep_check  # imports torch: only when asked

            findings += deep_check(cdir, inventory, meta, linears)
    findings += config_dtype(config, inventory)
    report.findings = list(dict.fromkeys(findings))  # a link can be reported by two checks
    return report


def _escaping_links(cdir: CheckpointDir, listing: list[str]) -> list[Finding]:
    out = []
    for name in listing:
        if os.path.islink(cdir.root / name):
            resolved = cdir.resolve(name)
            if resolved.finding is not None:
                out.append(resolved.finding)
    return out


def _tokenizer(cdir: CheckpointDir, listing: list[str]) -> list[Finding]:
    for names in TOKENIZER_FILES:
        if all(n in listing and cdir.resolve(n).exists for n in names):
            return []
    return [
        error(
            "TOKENIZER_MISSING",
            "tokenizer.json",
            "tokenizer.json, tokenizer.model, or vocab.json + merges.txt",
            "none of them",
            "no tokenizer files; the server cannot turn text into tokens",
            "copy the tokenizer files from the original model (tokenizer.save_pretrained)",
        )
    ]


def _not_object(name: str, value: object) -> Finding:
    return error(
        "JSON_INVALID",
        name,
        "a JSON object",
        type(value).__name__,
        "is valid JSON but not an object",
        "regenerate the file",
    )
