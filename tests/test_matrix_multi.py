"""The matrix on a prompt of TWO images of different sizes: every shipped pipeline file x every
model (each tiny preset in PRESETS, and the embedded model), unchanged.

Each cell either runs (the visual tokens of every LLM layer, measured in the layer hooks, equal
what the run's own Keep actions imply; a budget counts per image unless the file says
`per: prompt`), or is refused before any forward pass with a hint naming shipped files, the
first of which is run on the same two-image prompt and must run; or (a budget counted per crop,
too small on a tiny preset) the `--set` its hint names runs. Driven by the same registries as
tests/test_matrix.py (its adapters are shared, so nothing is loaded twice).
"""

from __future__ import annotations

import pytest
import yaml

from nuwa_graph import RunError
from tests.test_matrix import MODELS, NAMED, PIPELINES, SET_HINT, adapter_of, run_unchanged

PROMPT = "which picture has more red ?"
_runs_ok: set[tuple[str, str]] = set()


def second_image(adapter):
    """A second picture, of another size (another token count on dynamic-resolution and tiled models)."""
    from nuwa_graph.adapters.tiny import synthetic_image, tiny_qwen_image
    from nuwa_graph.adapters.tiny_tiled import wide_image

    vc = getattr(adapter.model.config, "vision_config", None)
    merge = getattr(vc, "spatial_merge_size", None)
    if merge:
        return tiny_qwen_image((8, 10), seed=5, unit=int(vc.patch_size) * int(merge))
    if adapter.model_variables().get("crops", 1) > 1:
        return wide_image(120, 90)
    return synthetic_image(200, seed=5)


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_file_runs_on_two_images_or_is_refused_with_a_hint(model, name):
    adapter, image = adapter_of(model)
    images = [image, second_image(adapter)]
    try:
        rep = run_unchanged(adapter, images, name, prompt=PROMPT)
    except RunError as exc:
        message = str(exc)
        setting = SET_HINT.search(message)
        if "does not fit this model" in message and setting:
            try:
                run_unchanged(adapter, images, name, {setting["name"]: yaml.safe_load(setting["value"])}, PROMPT)
                return
            except RunError as again:
                message = str(again)
        assert "cannot run" in message and "hint:" in message, message
        named = NAMED.findall(message.split("hint:", 1)[1])
        assert named and set(named) <= set(PIPELINES) and name not in named, message
        if (model, named[0]) not in _runs_ok:  # what the hint names runs on two images (once per model)
            run_unchanged(adapter, images, named[0], prompt=PROMPT)
            _runs_ok.add((model, named[0]))
        return
    geometry = rep.geometry[0]
    assert geometry.startswith("image 1:") and "| image 2:" in geometry, geometry
    _runs_ok.add((model, name))
