"""Where the golden reference tensors are: $NUWA_GOLDEN, else shared/golden beside the checkout.

No other place is searched (a copy of the tree elsewhere sets NUWA_GOLDEN). A missing folder
makes the golden tests FAIL with `MISSING` (never skip: CI must not pass without them).
"""

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
BESIDE = _ROOT.parent / "shared" / "golden"
_ENV = os.environ.get("NUWA_GOLDEN")
_CANDIDATES = ([Path(_ENV)] if _ENV else []) + [BESIDE]

GOLDEN = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
MISSING = None if GOLDEN.is_dir() else (
    f"no golden folder: {'NUWA_GOLDEN=' + _ENV + ' is not a folder and ' if _ENV else 'NUWA_GOLDEN is not set and '}"
    f"{BESIDE} does not exist; set NUWA_GOLDEN to the folder of reference tensors (shared/golden)")


def golden_file(name: str) -> Path:
    """GOLDEN / name, or a test failure that says where it looked and what to set."""
    path = GOLDEN / name
    if not path.is_file():
        pytest.fail(MISSING or f"golden file {path} not found (folder {GOLDEN}; set NUWA_GOLDEN to change it)")
    return path
