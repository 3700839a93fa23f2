"""Validate a GPTQ / AWQ checkpoint against its own metadata before anyone serves it.

    from qserve.validate import validate_checkpoint
    report = validate_checkpoint(path, deep=False, strict=False)
    report.ok, report.findings, report.format_text(), report.to_json()

The default check reads only config/metadata JSON and safetensors headers (no tensor data, no torch
import), so it takes well under a second even for a 70B checkpoint. `deep=True` also reads the data
one Linear at a time. A bad checkpoint yields findings, never an exception; only an input that is not
a checkpoint directory at all raises `qserve.errors.CheckpointError`. Finding codes are stable and
listed with their meaning in `qserve.validate.codes.CODES`.
"""

from __future__ import annotations

from qserve.validate.checkpoint import validate_checkpoint
from qserve.validate.codes import CODES
from qserve.validate.report import Finding, Report

__all__ = ["CODES", "Finding", "Report", "validate_checkpoint"]
