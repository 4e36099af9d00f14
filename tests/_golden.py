"""Where the golden reference tensors are: $NUWA_GOLDEN, else shared/golden beside the checkout."""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_CANDIDATES = [Path(os.environ["NUWA_GOLDEN"])] if os.environ.get("NUWA_GOLDEN") else []
_CANDIDATES += [_ROOT.parent / "shared" / "golden", Path("/work/shared/golden")]

GOLDEN = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
