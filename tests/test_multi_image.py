"""Prompts of several images (visual blocks with text between them), on every family's tiny
preset: keep-all == the stock model (logits and greedy generate), cached decoding == recompute
when each image is pruned, a left-padded batch of a one-image and a two-image prompt == the
single runs; plus the layout rules themselves (prompt geometry, per image / per prompt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nuwa_graph import RunError, load, load_text
from nuwa_graph.adapters import PRESETS
from nuwa_graph.geometry import Geometry
from nuwa_graph.prompt_geometry import PromptGeometry, prompt_geometry

PROMPT = "compare the two pictures ."
PROMPT1 = "what colour is the square ?"
_adapters: dict[str, object] = {}


def adapter_of(model: str):
    from nuwa_graph.adapters import load_adapter

    if model not in _adapters:
        _adapters[model] = load_adapter(model, "float32", "cpu")
    return _adapters[model]


def two_images(adapter) -> list:
    """Two pictures of different sizes (a different token count on dynamic-resolution models)."""
    from nuwa_graph.adapters.tiny import synthetic_image, tiny_qwen_image
    from nuwa_graph.adapters.tiny_tiled import wide_image

    vc = getattr(adapter.model.config, "vision_config", None)
    merge = getattr(vc, "spatial_merge_size", None)
    if merge:
        unit = int(vc.patch_size) * int(merge)
        return [tiny_qwen_image((6, 8), seed=2, unit=unit), tiny_qwen_image((4, 6), seed=3, unit=unit)]
    if adapter.family == "idefics3":  # 2x2 tiles + global, 1x2 tiles + global: 5 and 3 runs
        return [wide_image(200, 150), wide_image(200, 60, seed=4)]
    if adapter.model_variables().get("crops", 1) > 1:
        return [wide_image(160, 64) if adapter.family == "internvl" else wide_image(120, 90), synthetic_image(64, seed=4)]
    return [synthetic_image(), synthetic_image(200, seed=5)]


def kept_per_image(run, runs) -> list[int]:
    """Tokens present per image, from a segment's runs (one run per image; Idefics3: one per crop)."""
    blocks = run.state.geometries[0].blocks
    sizes = [1] * len(blocks) if len(runs) == len(blocks) else [len(g.crops) for g in blocks]
    at = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [sum(k for _, k in runs[at[i]:at[i + 1]]) for i in range(len(sizes))]


def stock_logits(adapter, images, prompt):
    enc = adapter.encode([images], [prompt])
    extra = {k: v for k, v in enc.extras.items() if k == "mm_token_type_ids"}
    with torch.no_grad():
        return adapter.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.vision_inputs,
                             **extra).logits, enc


def keep_yaml(site: str, k: int, policy: str = "pesp", per: str = "image") -> str:
    return f"""
name: keep-per-{per}
nodes:
  - name: s
    type: scorer.external
    params: {{name: sc, site: {site if site.startswith("llm") else "vision"}}}
  - name: k
    type: selector.top-k
    params: {{k: {k}, order: index}}
    per: {per}
    inputs: {{scores: s.scores}}
  - name: pos
    type: position-reencoder.policy
    params: {{policy: {policy}}}
    inputs: {{selection: k.selection}}
  - name: a
    type: applier.keep
    params: {{site: {site}}}
    inputs: {{selection: k.selection, positions: pos.positions}}
"""


VANILLA = load(Path(__file__).resolve().parent.parent / "pipelines" / "vanilla.yaml")


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_two_images_keep_all_is_the_stock_model(model):
    adapter = adapter_of(model)
    images = two_images(adapter)
    ref, enc = stock_logits(adapter, images, PROMPT)
    logits, run = adapter.forward_logits(VANILLA, [images], [PROMPT])
    assert len(run.state.geometries[0].blocks) == 2
    assert [im.n for im in run.layouts[0].images][0] != 0
    assert torch.equal(logits, ref)
    rep = adapter.generate(VANILLA, [images], [PROMPT], max_new_tokens=4, stop_at_eos=False, return_logits=True)
    extra = {k: v for k, v in enc.extras.items() if k == "mm_token_type_ids"}
    with torch.no_grad():
        out = adapter.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.vision_inputs,
                                     **extra, max_new_tokens=4, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, min_new_tokens=4)
    assert rep.new_tokens[0] == out.sequences[0, enc.input_ids.shape[1]:].tolist()
    steps = torch.stack(rep.step_logits)[:, 0]
    assert (steps - torch.stack(out.logits)[:, 0].float()).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model", sorted(PRESETS))
@pytest.mark.parametrize("site,policy", [("pre_llm", "perc"), ("llm.1", "pesp")])
def test_two_images_cached_decoding_equals_recompute(model, site, policy):
    adapter = adapter_of(model)
    images = two_images(adapter)
    n = adapter.encode([images], [PROMPT]).input_ids.eq(adapter.image_token_id).sum().item()
    ext = {"sc": [torch.randn(n, generator=torch.Generator().manual_seed(1))]}
    pipe = load_text(keep_yaml(site, 3, policy))
    T = 4
    rep = adapter.generate(pipe, [images], [PROMPT], max_new_tokens=T, external=ext, stop_at_eos=False,
                           return_logits=True)
    kept = rep.kept[0][site]
    assert len(kept) == 6  # 3 per image: the budget counts per image
    full, run = adapter.forward_logits(pipe, [images], [PROMPT], external=ext,
                                       extra_ids=[torch.tensor(rep.new_tokens[0][:-1])])
    cached = torch.stack(rep.step_logits)[:, 0]
    assert (cached - full[0, -T:].float()).abs().max().item() <= 1e-5
    seg = run.segments[-1]
    assert kept_per_image(run, seg.runs[0]) == [3, 3]  # each image's kept tokens sit in its own block(s)


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_padded_batch_of_one_and_two_images_equals_singles(model):
    adapter = adapter_of(model)
    images = two_images(adapter)
    pipe = load_text(keep_yaml("llm.1", 3, "pesp"))
    one = adapter.encode([images[:1]], [PROMPT1]).input_ids.eq(adapter.image_token_id).sum().item()
    two = adapter.encode([images], [PROMPT]).input_ids.eq(adapter.image_token_id).sum().item()
    g = torch.Generator().manual_seed(3)
    ext = [torch.randn(one, generator=g), torch.randn(two, generator=g)]
    T = 3
    batch = adapter.generate(pipe, [images[:1], images], [PROMPT1, PROMPT], max_new_tokens=T, external={"sc": ext},
                             stop_at_eos=False, return_logits=True)
    for b, (ims, pr) in enumerate([(images[:1], PROMPT1), (images, PROMPT)]):
        single = adapter.generate(pipe, [ims], [pr], max_new_tokens=T, external={"sc": [ext[b]]}, stop_at_eos=False,
                                  return_logits=True)
        assert single.new_tokens[0] == batch.new_tokens[b]
        assert single.visual_tokens_per_layer[0] == batch.visual_tokens_per_layer[b]
        diff = (torch.stack(single.step_logits)[:, 0] - torch.stack(batch.step_logits)[:, b]).abs().max().item()
        assert diff <= 1e-5


def test_a_budget_per_prompt_counts_every_image_together():
    adapter = adapter_of("tiny-llava")
    images = two_images(adapter)
    g = torch.Generator().manual_seed(0)
    sc = torch.randn(128, generator=g)
    sc[:64] += 10  # the first image's tokens all score higher
    rep = adapter.generate(load_text(keep_yaml("llm.1", 6, per="prompt")), [images], [PROMPT], max_new_tokens=1,
                           external={"sc": [sc]})
    assert all(t < 64 for t in rep.kept[0]["llm.1"]) and len(rep.kept[0]["llm.1"]) == 6
    rep = adapter.generate(load_text(keep_yaml("llm.1", 6, per="image")), [images], [PROMPT], max_new_tokens=1,
                           external={"sc": [sc]})
    kept = rep.kept[0]["llm.1"]
    assert sum(t < 64 for t in kept) == 6 and sum(t >= 64 for t in kept) == 6


def test_prompt_geometry_puts_every_image_in_one_id_space():
    from nuwa_graph.family_geometries import anyres_geometry

    a = Geometry((2, 3), image_start=5)
    b = anyres_geometry((2, 2), (1, 2), (20, 40), image_start=20)
    assert prompt_geometry([a]) is a
    g = PromptGeometry([a, b])
    assert g.n_tokens == a.n_tokens + b.n_tokens
    assert len(g.crops) == 1 + len(b.crops)
    assert g.block_of(torch.tensor([0, 5, 6, g.n_tokens - 1])).tolist() == [0, 0, 1, 1]
    assert g.image_local(torch.tensor([0, 5, 6, 7])).tolist() == [0, 5, 0, 1]
    units = g.units("image")
    assert [u.geometry for u in units] == [a, b]
    keep, local = units[1].to_local(torch.tensor([1, 6, 8]))
    assert keep.tolist() == [False, True, True] and local.tolist() == [0, 2]
    assert units[1].to_block(local).tolist() == [6, 8]
    assert g.cls_id(0) != g.cls_id(1) and g.block_of(torch.tensor([g.cls_id(0), g.cls_id(2)])).tolist() == [0, 1]
    assert [label for label, _ in g.views()][0].startswith("image 1")


def test_position_plans_are_refused_per_prompt():
    from nuwa_graph.errors import PipelineError

    text = keep_yaml("llm.1", 3).replace("    type: position-reencoder.policy\n",
                                         "    type: position-reencoder.policy\n    per: prompt\n")
    with pytest.raises(PipelineError, match="per: prompt is not allowed"):
        load_text(text)


def test_a_prompt_with_too_few_placeholders_is_refused():
    adapter = adapter_of("tiny-llava")
    images = two_images(adapter)
    with pytest.raises(RunError):
        adapter.generate(VANILLA, [images], ["USER: <image>\nwhat ? ASSISTANT:"], max_new_tokens=1)


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl"])
def test_run_places_each_image_at_its_placeholder(model, tmp_path):
    """`nuwa-graph run pipelines/fastv.yaml --image a.png --image b.png --prompt "Is <image> ... <image>?"`."""
    import json

    from typer.testing import CliRunner

    from nuwa_graph.apps import cli

    adapter = adapter_of(model)
    paths = []
    for i, im in enumerate(two_images(adapter)):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        im.save(tmp_path / f"{i}.png")
    root = Path(__file__).resolve().parent.parent
    args = ["run", str(root / "pipelines/fastv.yaml"), "--model", model, *paths, "--max-new-tokens", "1", "--json"]
    result = CliRunner().invoke(cli.app, [*args, "--prompt", "is <image> brighter than <image> ?"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["geometry"][0].startswith("image 1:") and "| image 2:" in data["geometry"][0]
    assert data["visual_tokens_per_layer"][0][-1] < data["visual_tokens_full"]
    placed = adapter.chat_prompt("is <image> brighter than <image> ?", 2)
    assert placed.index("brighter") > placed.index(">" if model == "tiny-llava" else "<|image_pad|>")
    result = CliRunner().invoke(cli.app, [*args, "--prompt", "is <image> brighter ?"])  # one placeholder, two images
    assert result.exit_code == 1 and "1 image placeholders" in result.output


def test_eval_data_records_of_several_images_run_on_the_embedded_model(tmp_path):
    """`images: [..]` in a VQA data file: one prompt of several images on the embedded model (plumbing
    only: it was trained on one image per prompt, so no accuracy is claimed), kept-token pictures
    of both images."""
    import json

    from nuwa_graph.adapters.tiny import synthetic_image
    from nuwa_graph.apps.evaluate import evaluate, plan_runs
    from nuwa_graph.apps.models import default_model
    from nuwa_graph.apps.tasks import load_data
    from nuwa_graph.apps.viz import write_pictures

    for i in range(2):
        synthetic_image(seed=i).save(tmp_path / f"{i}.png")
    recs = [{"id": "a", "images": ["0.png", "1.png"], "question": "how many circles ?", "answer": "2"},
            {"id": "b", "images": ["1.png", "0.png"], "question": "is <image> like <image> ?", "answer": "no"},
            {"id": "c", "image": "0.png", "question": "how many circles ?", "answer": "1"}]
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    tasks = load_data([data])
    assert isinstance(tasks[0].samples[0].image, list) and len(tasks[0].samples[0].image) == 2
    root = Path(__file__).resolve().parent.parent
    adapter = adapter_of(default_model())
    result = evaluate(adapter, plan_runs([root / "pipelines/fastv.yaml"]), tasks, batch=3, max_new_tokens=2,
                      warmup=False)
    preds = result["results"][0]["predictions"]
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    assert preds[1]["prompt"].count("<image>") == 2  # placed where its question says
    n = adapter.grid[0] * adapter.grid[1]
    assert result["results"][0]["visual_tokens_full"] == pytest.approx((2 * n + 2 * n + n) / 3)
    pics = write_pictures(result, tmp_path / "out")
    assert pics and all(p.is_file() for p in pics)


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen"])
def test_flops_count_the_tower_once_per_image(model):
    adapter = adapter_of(model)
    a, b = two_images(adapter)
    one = adapter.generate(VANILLA, [[a]], [PROMPT], max_new_tokens=1).flops[0]
    other = adapter.generate(VANILLA, [[b]], [PROMPT], max_new_tokens=1).flops[0]
    both = adapter.generate(VANILLA, [[a, b]], [PROMPT], max_new_tokens=1).flops[0]
    assert "unavailable" not in both
    assert both["vision"] == one["vision"] + other["vision"]
    assert both["projector"] == one["projector"] + other["projector"]


def test_validate_says_what_each_node_runs_over():
    from typer.testing import CliRunner

    from nuwa_graph.apps import cli

    root = Path(__file__).resolve().parent.parent
    result = CliRunner().invoke(cli.app, ["validate", str(root / "pipelines/fastv.yaml")])
    assert result.exit_code == 0, result.output
    assert "each image: attn; whole prompt: topk, prune" in " ".join(result.output.split())
