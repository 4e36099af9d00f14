"""The committed embedded model: loads offline and still scores what docs/embedded.md records."""

from __future__ import annotations

import re
from pathlib import Path

from nuwa_graph.embedded import WEIGHTS_DIR
from nuwa_graph.embedded.train import SLICE_N, slice_accuracy

ROOT = Path(__file__).resolve().parent.parent
RECORD = re.compile(r"fixed 100-sample slice[^*]*grounding Acc@0\.5 \*\*([\d.]+) %\*\*, VQA EM \*\*([\d.]+) %\*\*")


def test_committed_model_reaches_the_recorded_accuracy_on_the_fixed_slice():
    assert (WEIGHTS_DIR / "config.json").is_file() and (WEIGHTS_DIR / "model.safetensors").is_file()
    m = RECORD.search((ROOT / "docs/embedded.md").read_text())
    assert m, "docs/embedded.md must record the fixed 100-sample slice accuracy of the committed model"
    got = slice_accuracy()  # the shipped weights, offline (HF_HUB_OFFLINE=1 in conftest)
    assert got["n"] == SLICE_N == 100
    assert abs(100 * got["grounding_acc50"] - float(m[1])) <= 2.0
    assert abs(100 * got["vqa_em"] - float(m[2])) <= 2.0
