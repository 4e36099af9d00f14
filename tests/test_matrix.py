"""The matrix: every shipped pipeline file x every model (each tiny preset in PRESETS, and the
embedded model), unchanged and without overrides.

One parametrised test. Each cell either
- runs, with the visual tokens of every LLM layer (measured in the layer hooks) equal to what
  the run's own Keep actions imply, and only legal sites; or
- is refused BEFORE any forward pass (nothing encoded, no vision tower run) with a RunError
  whose hint names shipped files that run on that model; the first one named is run there
  and must run (every other one named is a cell of this matrix, so it is run too); or
- does not fit the model's variables (a budget counted per crop that leaves a crop no token
  on a tiny preset's small crops) with a hint naming the `--set` that fits: the file is run
  with it and must run.

Everything comes from the registries (`PRESETS`, the `pipelines/` folder), so a family or a
pipeline added later is covered without editing this file. Images are small (12 x 12 visual
tokens on models whose resolution is dynamic) and runs generate one token.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from nuwa_graph import RunError, load, tokens_per_layer
from nuwa_graph.adapters import PRESETS
from nuwa_graph.context import Keep

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = sorted(str(p.relative_to(ROOT / "pipelines").with_suffix("")) for p in (ROOT / "pipelines").rglob("*.yaml"))
MODELS = sorted(PRESETS) + ["embedded"]
PROMPT = "what colour is the square ?"
NAMED = re.compile(r"pipelines/([\w/]+)\.yaml")
WIDE = {"default": (200, 150), "internvl": (160, 64)}  # sizes of the wide picture on tiled families
SET_HINT = re.compile(r"hint:.*--set (?P<name>\w+)=(?P<value>\S+)")
_adapters: dict[str, object] = {}
_runs_ok: dict[tuple[str, str], bool] = {}


def adapter_of(model: str):
    """The model's adapter (built once per session), and a small image for it."""
    if model not in _adapters:
        from nuwa_graph.adapters import load_adapter
        from nuwa_graph.apps.models import default_model

        _adapters[model] = load_adapter(default_model() if model == "embedded" else model, "float32", "cpu")
    adapter = _adapters[model]
    return adapter, image_for(adapter)


def image_for(adapter):
    """12 x 12 visual tokens where the model's resolution is dynamic (a merged token is patch x
    merge pixels: the Qwen-VL line); a wide picture on a model that cuts images into crops
    (LLaVA-NeXT, OneVision: 2x2 tiles cut by unpad + the base crop; InternVL: 1x3 tiles + the
    thumbnail); otherwise the built-in picture (fixed grids resize it)."""
    from nuwa_graph.adapters.tiny import synthetic_image, tiny_qwen_image
    from nuwa_graph.adapters.tiny_tiled import wide_image

    if adapter.model_variables().get("crops", 1) > 1:
        return wide_image(*WIDE.get(adapter.family, WIDE["default"]))

    vc = getattr(adapter.model.config, "vision_config", None)
    merge = getattr(vc, "spatial_merge_size", None)
    if merge:
        return tiny_qwen_image((12, 12), seed=2, unit=int(vc.patch_size) * int(merge))
    return synthetic_image()


def run_unchanged(adapter, image, name: str, overrides: dict | None = None):
    """Run a shipped file (with no override unless a refusal's hint named one); check the
    counts against its Keep actions."""
    rep = adapter.generate(load(ROOT / "pipelines" / f"{name}.yaml", overrides), [image], [PROMPT], max_new_tokens=1)
    counts = rep.visual_tokens_per_layer[0]
    acts = [Keep(a["site"], torch.zeros(a["kept"], dtype=torch.long)) for a in rep.actions[0]]
    assert counts == tokens_per_layer(acts, rep.visual_tokens_full, adapter.n_layers), name
    assert rep.visual_tokens_avg[0] == pytest.approx(sum(counts) / len(counts))
    for s in rep.schedule["sites"]:
        assert s in ("vision", "pre_llm") or (s.startswith("llm.") and 0 <= int(s[4:]) < adapter.n_layers), s
    return rep


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_file_runs_or_is_refused_with_a_hint(model, name, monkeypatch):
    adapter, image = adapter_of(model)
    calls = {"encode": 0, "vision_forward": 0}
    for attr in calls:
        original = getattr(adapter, attr)

        def counted(*a, _attr=attr, _original=original, **k):
            calls[_attr] += 1
            return _original(*a, **k)

        monkeypatch.setattr(adapter, attr, counted)
    try:
        rep = run_unchanged(adapter, image, name)
    except RunError as exc:
        assert calls == {"encode": 0, "vision_forward": 0}, f"{name} on {model} was refused after a forward pass"
        message = str(exc)
        setting = SET_HINT.search(message)
        if "does not fit this model" in message and setting:  # a budget counted per crop, too small here
            over = {setting["name"]: yaml.safe_load(setting["value"])}
            try:
                run_unchanged(adapter, image, name, over)  # the setting the hint names really runs here
                return
            except RunError as again:  # or the file, fitted, is refused for what it is (checked below)
                message = str(again)
        check_refusal(model, adapter, image, name, message)
        return
    assert calls["vision_forward"] == 1
    if rep.schedule["instead_of"]:  # family_files picked another file: the one the family's authors wrote
        assert rep.schedule["chosen_for_family"] == adapter.family


def check_refusal(model: str, adapter, image, name: str, message: str) -> None:
    """A refusal says 'cannot run', and its hint names shipped files; the first one runs here."""
    assert "cannot run" in message and "hint:" in message, message
    named = NAMED.findall(message.split("hint:", 1)[1])
    assert named and set(named) <= set(PIPELINES), message
    assert name not in named
    first = named[0]
    if (model, first) not in _runs_ok:
        run_unchanged(adapter, image, first)  # the file the hint names really runs here
        _runs_ok[(model, first)] = True


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_a_square_photo_fits_every_tiny_preset(model, tmp_path):
    """`nuwa-graph run pipelines/nuwa_qwen.yaml --model <preset> --image square.png`: a 448 x 448
    photo at the preset's default resolution, a prompt and the default 32 new tokens fit its
    context (each family's Nüwa recipe runs: nuwa_qwen.yaml, or nuwa.yaml on a CLS family; a
    family with neither, LLaVA-OneVision, runs the first shipped file its refusals name)."""
    import json

    from typer.testing import CliRunner

    from nuwa_graph.adapters.tiny import synthetic_image
    from nuwa_graph.apps import cli
    from nuwa_graph.preflight import check_context

    photo = tmp_path / "square.png"
    synthetic_image(448, seed=3).save(photo)
    adapter, _ = adapter_of(model)
    from nuwa_graph.apps.runner import DEFAULT_PROMPT, load_image

    check_context(adapter, load_image(str(photo)), DEFAULT_PROMPT, 32)  # the CLI's default new tokens
    runnable = [name for name, _ in adapter.runnable_shipped()]
    pipe = "nuwa_qwen" if "nuwa_qwen" in runnable else runnable[0]
    result = CliRunner().invoke(cli.app, ["run", str(ROOT / f"pipelines/{pipe}.yaml"), "--model", model, "--image",
                                          str(photo), "--prompt", "what shapes are there ?", "--max-new-tokens", "2",
                                          "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    want = ("nuwa_qwen.yaml" if adapter.model_variables()["family_group"] == "qwen-vl"
            else "nuwa.yaml" if pipe == "nuwa_qwen" else f"{pipe}.yaml")
    assert data["schedule"]["file"].endswith(want)
    assert data["visual_tokens_full"] > 0


def test_nuwa_runs_its_qwen_recipe_on_qwen3_vl(tmp_path):
    """The issue's command: `nuwa-graph run pipelines/nuwa.yaml --model tiny-qwen3-vl --image
    square.png --prompt ...` runs Nüwa's Qwen recipe (nuwa_qwen.yaml, chosen by the file)."""
    import json

    from typer.testing import CliRunner

    from nuwa_graph.adapters.tiny import synthetic_image
    from nuwa_graph.apps import cli

    photo = tmp_path / "square.png"
    synthetic_image(448, seed=3).save(photo)
    result = CliRunner().invoke(cli.app, ["run", str(ROOT / "pipelines/nuwa.yaml"), "--model", "tiny-qwen3-vl",
                                          "--image", str(photo), "--prompt", "what is left of the red circle ?",
                                          "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["schedule"]["file"].endswith("nuwa_qwen.yaml") and data["schedule"]["instead_of"].endswith("nuwa.yaml")
    assert data["schedule"]["chosen_for_family"] == "qwen3_vl"
    assert any(s.startswith("vision.attention_received(layer=-1)") for s in data["signals"])
    counts = data["visual_tokens_per_layer"][0]
    assert counts[0] < data["visual_tokens_full"] and counts[-1] < counts[0]  # both stages pruned
