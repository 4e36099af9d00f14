"""Every shipped pipeline on every tiled family's preset (LLaVA-NeXT, InternVL, LLaVA-OneVision):
it runs, or it is refused with a hint naming what runs instead (a CLS method on SigLIP, a
per-crop budget too small for the crops, positions from ids for tokens outside the stream),
never a crash deep inside torch. The default budgets and one that papers report on these models."""

from __future__ import annotations

from pathlib import Path

import pytest

from nuwa_graph import RunError, load
from nuwa_graph.adapters import load_adapter
from nuwa_graph.adapters.tiny_tiled import wide_image

PIPES = Path(__file__).resolve().parents[1] / "pipelines"
SHIPPED = sorted(str(p.relative_to(PIPES)) for p in PIPES.glob("**/*.yaml"))
# a wide picture each: LLaVA-NeXT and OneVision 2x2 tiles cut by unpad (5 crops), InternVL 1x3 tiles +
# thumbnail; OneVision's interpolated canvas is covered in test_adapter_llava_onevision.py
PRESETS = {"tiny-llava-next": (200, 150), "tiny-internvl": (160, 64), "tiny-llava-onevision": (200, 150)}
_ADAPTERS: dict = {}


def adapter(preset: str):
    if preset not in _ADAPTERS:
        _ADAPTERS[preset] = load_adapter(preset)
    return _ADAPTERS[preset]


@pytest.mark.parametrize("path", SHIPPED)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_shipped_pipeline_runs_or_is_refused_with_a_hint(preset, path):
    a = adapter(preset)
    pipe = load(PIPES / path)
    over = {"budget": 320} if "budget" in pipe.variables and "visionzip" in path else {}
    try:
        rep = a.generate(load(PIPES / path, over), [wide_image(*PRESETS[preset])], ["what is left of the red circle ?"],
                         max_new_tokens=1)
    except RunError as exc:
        assert "hint:" in str(exc) or "lower the budget" in str(exc), str(exc)
        return
    assert rep.visual_tokens_per_layer[0] and "," in rep.geometry[0]
