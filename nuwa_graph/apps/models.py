"""Which model an application runs when none is named: the embedded one.

Its own module so that `run` (runner.py) and the plug-ins find it without importing the
evaluation (evaluate.py).
"""

from __future__ import annotations

from .errors import EvalError


def default_model() -> str:
    """The embedded model (preset `embedded` if one is registered, else its weights folder)."""
    from ..adapters import PRESETS
    from ..embedded import WEIGHTS_DIR

    if "embedded" in PRESETS:
        return "embedded"
    if (WEIGHTS_DIR / "config.json").is_file():
        return str(WEIGHTS_DIR)
    raise EvalError(f"the embedded model is not trained yet ({WEIGHTS_DIR} has no config.json). Train it with "
                    f"`python scripts/train_embedded.py` (see docs/embedded.md), or pass --model "
                    f"(a local model folder, a cached hub id, or the untrained preset tiny-llava for a smoke test)")
