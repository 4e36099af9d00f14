"""Errors of the applications (the engine's own are in nuwa_graph/errors.py)."""

from __future__ import annotations

from ..errors import RunError


class EvalError(RunError):
    """A user error of an evaluation (bad data file, no model, bad --set): one clear message."""
