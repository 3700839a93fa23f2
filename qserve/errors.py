"""Errors a user can hit. The CLI prints their message (no traceback) and exits non-zero.

Messages name the file, tensor or field, what was expected, what was found, and what to do.
"""

from __future__ import annotations


class QserveError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    exit_code = 1


class ModelNotFoundError(QserveError):
    """A model spec that is neither a local directory, a known name, nor a reachable hub id."""


class DataSourceError(QserveError):
    """A calibration or evaluation source that is missing, unreadable or too short."""


class ConfigError(QserveError):
    """An invalid combination of options (bad group size, unsupported architecture, ...)."""


class CheckpointError(QserveError):
    """A checkpoint that cannot be read or does not match its declared format."""

    exit_code = 2


class RecipeError(QserveError):
    """A malformed recipe file: unknown key, wrong type, missing field."""


class ResourceError(QserveError):
    """Not enough memory (or another resource) for the requested run."""
