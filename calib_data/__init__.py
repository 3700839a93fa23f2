"""Calibration and evaluation text: sources (files, presets, hub datasets) and token sampling."""

from qserve.calib_data.sampling import MODES, get_calib_samples
from qserve.calib_data.sources import (
    PRESETS,
    ResolvedSource,
    check_source,
    data_root,
    load_documents,
    load_eval_rows,
    resolve_source,
)

__all__ = [
    "MODES",
    "PRESETS",
    "ResolvedSource",
    "check_source",
    "data_root",
    "get_calib_samples",
    "load_documents",
    "load_eval_rows",
    "resolve_source",
]
