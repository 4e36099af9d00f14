"""The lmms-eval plugin (`--model nuwa_graph`), offline: registration through the entry point,
its refusals, lmms-eval's RefCOCO scoring against ours, and lmms-eval's own CLI on the embedded
model with two local tasks (a VQA task from a JSON file, a RefCOCO-style task saved with
`save_to_disk`) against `nuwa-graph eval` on the same samples and prompts, in one process and
under `torchrun --nproc_per_node 2`.

Needs the `lmms` extra (`pip install -e '.[dev,lmms]'`); skipped without it. CI runs these in a
separate step (.ci/run)."""

import glob
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from nuwa_graph.apps.evaluate import sample_data  # noqa: E402
from nuwa_graph.apps.prompts import lmms_grounding_score, parse_lmms_box  # noqa: E402

pytestmark = [pytest.mark.lmms, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

UTILS = '''
from PIL import Image
from lmms_eval.tasks.refcoco import utils_rec
from nuwa_graph.apps.data import exact_match

def vqa_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]

def vqa_text(doc):
    return doc["question"]

def vqa_results(doc, results):
    return {"exact_match": float(exact_match(results[0], doc["answers"]))}

# lmms-eval's own RefCOCO REC functions (box normalisation, parsing, IoU, Acc@0.5)
rec_docs = utils_rec.refcoco_bbox_rec_preprocess_dataset
rec_visual = utils_rec.refcoco_bbox_rec_doc_to_visual
rec_results = utils_rec.refcoco_bbox_rec_process_result
rec_acc05 = utils_rec.refcoco_bbox_rec_acc05
rec_iou = utils_rec.refcoco_bbox_rec_iou

def rec_text(doc):
    return "where is " + doc["answer"] + " ?"   # the embedded model's grounding prompt
'''

GEN = '''output_type: generate_until
generation_kwargs:
  max_new_tokens: 6
  until: ["ASSISTANT:"]
'''


def make_tasks(out: Path) -> dict:
    """Shapes-world samples as two lmms-eval tasks on disk; returns their paths."""
    import datasets
    from PIL import Image

    g, v = sample_data(out / "data", n_images=4, seed=4242)
    recs = [json.loads(line) for line in v.read_text().splitlines() if line.strip()]
    for r in recs:
        r["image"] = str((v.parent / r["image"]).resolve())
    (out / "vqa.json").write_text(json.dumps(recs))
    rows = [{"question_id": str(r["question_id"]), "image": Image.open(g.parent / r["file_name"]).convert("RGB"),
             "answer": r["answer"], "bbox": [float(x) for x in r["bbox"]]} for r in json.loads(g.read_text())]
    feats = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                               "answer": datasets.Sequence(datasets.Value("string")),
                               "bbox": datasets.Sequence(datasets.Value("float64"))})
    datasets.DatasetDict({"val": datasets.Dataset.from_list(rows, features=feats)}).save_to_disk(str(out / "rec_ds"))
    tasks = out / "tasks"
    tasks.mkdir()
    (tasks / "nuwa_local_utils.py").write_text(UTILS)
    (tasks / "nuwa_local_vqa.yaml").write_text(
        f"task: nuwa_local_vqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'vqa.json'}\n"
        f"test_split: test\n{GEN}doc_to_visual: !function nuwa_local_utils.vqa_visual\n"
        f"doc_to_text: !function nuwa_local_utils.vqa_text\ndoc_to_target: answer\n"
        f"process_results: !function nuwa_local_utils.vqa_results\n"
        f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "nuwa_local_rec.yaml").write_text(
        f"task: nuwa_local_rec\ndataset_path: {out / 'rec_ds'}\ndataset_kwargs:\n  load_from_disk: true\n"
        f"test_split: val\n{GEN}process_docs: !function nuwa_local_utils.rec_docs\n"
        f"doc_to_visual: !function nuwa_local_utils.rec_visual\ndoc_to_text: !function nuwa_local_utils.rec_text\n"
        f"doc_to_target: bbox\nprocess_results: !function nuwa_local_utils.rec_results\n"
        f"metric_list:\n  - metric: refcoco_IoU\n    aggregation: !function nuwa_local_utils.rec_iou\n"
        f"    higher_is_better: true\n  - metric: refcoco_ACC@0.5\n"
        f"    aggregation: !function nuwa_local_utils.rec_acc05\n    higher_is_better: true\n")
    return {"tasks": tasks, "refcoco": g, "vqa": v}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lmms(tasks: Path, out: Path, batch: int, nproc: int = 1) -> dict:
    """lmms-eval's CLI with the plugin (fastv, budget=32); lmms-eval exits 0 after errors, so the
    results file is what tells success."""
    args = ["-m", "lmms_eval", "--model", "nuwa_graph",
            "--model_args", f"pipeline={PIPELINES / 'fastv.yaml'},budget=32,stats={out / 'stats'}",
            "--tasks", "nuwa_local_vqa,nuwa_local_rec", "--include_path", str(tasks), "--batch_size", str(batch),
            "--device", "cpu", "--output_path", str(out / "lmms"), "--log_samples"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_port()), *args]
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=out, timeout=900,
                       check=False)
    found = glob.glob(str(out / "lmms" / "**" / "*_results.json"), recursive=True)
    assert p.returncode == 0 and found, (p.stdout + p.stderr)[-4000:]
    results = json.loads(Path(found[0]).read_text())["results"]
    samples = {}
    for t in ("nuwa_local_vqa", "nuwa_local_rec"):
        f = glob.glob(str(out / "lmms" / "**" / f"*_samples_{t}.jsonl"), recursive=True)[0]
        rows = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        samples[t] = [r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0]
                      for r in sorted(rows, key=lambda r: r["doc_id"])]
    stats = [json.loads(line) for f in sorted((out / "stats").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return {"results": results, "answers": samples, "stats": stats}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms")
    return out, make_tasks(out)


@pytest.fixture(scope="module")
def single(local):
    out, paths = local
    d = out / "single"
    d.mkdir()
    return run_lmms(paths["tasks"], d, batch=2)


# --- registration and refusals ---------------------------------------------------------------------
def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from nuwa_graph.integrations.lmms import NuwaGraph

    assert get_model("nuwa_graph") is NuwaGraph


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    from nuwa_graph.integrations.lmms import NuwaGraph

    return NuwaGraph(pipeline=str(PIPELINES / "fastv.yaml"), budget="32", device="cpu",
                     stats=str(tmp_path_factory.mktemp("stats")))


def test_plugin_arguments_and_refusals(plugin, tmp_path):
    from PIL import Image

    from nuwa_graph.integrations.lmms import NuwaGraph, PluginError

    assert (plugin.rank, plugin.world_size, plugin.batch_size, str(plugin.device)) == (0, 1, 1, "cpu")
    with pytest.raises(PluginError, match="loglikelihood"):
        plugin.loglikelihood([])
    with pytest.raises(PluginError, match="text-only"):
        plugin._visual([], "t", 0)
    img = Image.new("RGB", (8, 8))
    two = plugin._visual([img, img], "t", 0)  # a document of two images: one prompt of two blocks
    assert isinstance(two, list) and len(two) == 2
    with pytest.raises(PluginError, match="video"):
        plugin._visual(["clip.mp4"], "t", 0)
    _, _, greedy = plugin._options({"temperature": 0})
    assert not greedy.do_sample
    _, _, sampled = plugin._options({"temperature": 0.7, "top_p": 0.9})
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9
    with pytest.raises(PluginError, match="top_p"):
        plugin._options({"temperature": 0.7, "top_p": 1.5})
    # lmms-eval's llava_hf reads `until` and never applies it (its answers run to the end token): nor does the plugin
    assert plugin.adapter.family == "llava" and plugin._options({"until": ["ASSISTANT:", ""], "max_new_tokens": 5})[:2] \
        == (5, [])
    with pytest.raises(PluginError, match="its variables: K, budget"):
        NuwaGraph(pipeline=str(PIPELINES / "fastv.yaml"), budgett="32", device="cpu", stats=str(tmp_path))
    with pytest.raises(PluginError, match="system_prompt"):
        NuwaGraph(pipeline=str(PIPELINES / "fastv.yaml"), system_prompt="Be brief.", device="cpu", stats=str(tmp_path))
    with pytest.raises(PluginError, match="does not exist"):
        NuwaGraph(pipeline=str(tmp_path / "none.yaml"), device="cpu", stats=str(tmp_path))


def test_question_agnostic_through_the_plugin(tmp_path):
    """`question_agnostic=true`: the image is pruned from the neutral prompt (lmms-eval's chat text
    around an empty question), and the task's prompt is answered over those tokens."""
    from nuwa_graph.adapters.base import GREEDY
    from nuwa_graph.apps.prompts import chat_text
    from nuwa_graph.integrations.lmms import NuwaGraph
    from nuwa_graph.world import make_scene

    qa = NuwaGraph(pipeline=str(PIPELINES / "fastv.yaml"), budget="32", device="cpu", stats=str(tmp_path),
                   question_agnostic="true")
    images = [make_scene(4242, i).image() for i in range(2)]
    prompts = [chat_text(qa.adapter, q, None, None) for q in ("what color is the circle ?", "how many squares ?")]
    rep = qa._generate(images, prompts, 3, GREEDY)
    neutral = qa.adapter.generate(qa.pipeline, images, [chat_text(qa.adapter, "", None, None)] * 2, max_new_tokens=1)
    assert qa.question_agnostic and rep.kept == neutral.kept and "replay" in rep.node_ms


def test_pipeline_variables_are_read_as_yaml(tmp_path):
    from nuwa_graph.integrations.lmms import _yaml_value

    assert _yaml_value("layers", "[2,6,15]") == [2, 6, 15]
    assert _yaml_value("budget", 64) == 64 and _yaml_value("name", "abc") == "abc"


def test_our_lmms_scoring_equals_lmms_evals():
    """prompts.parse_lmms_box / lmms_grounding_score against lmms-eval's own RefCOCO functions."""
    from lmms_eval.tasks.refcoco import utils_rec

    rng = random.Random(0)
    answers = ["[0.1, 0.2, 0.5, 0.6]", "x [ 0.3,0.3, 0.9 ,0.95] y", "[1, 0, 0.5, 2]", "no box", "[0.2 0.2 0.4 0.4]",
               "<x1> <y2> <x5> <y9>", "[-0.5, 0.1, 0.2, 0.3]", "[0.1, 0.1, 0.2]"]
    answers += [f"[{rng.random():.2f}, {rng.random():.2f}, {rng.random():.3f}, {rng.random():.1f}]" for _ in range(60)]
    for k, a in enumerate(answers):
        ours = parse_lmms_box(a)
        theirs = utils_rec.parse_float_sequence_within(a)
        assert (ours if ours is not None else [0, 0, 0, 0]) == theirs, a
        W, H = 200 + k, 150
        box_px = (10 + k, 20, 120 + k, 140)
        target = [box_px[0] / W, box_px[1] / H, box_px[2] / W, box_px[3] / H]
        s = lmms_grounding_score(a, box_px, W, H)
        try:
            expected = utils_rec.compute_iou(target, theirs)
        except ZeroDivisionError:
            expected = 0.0
        assert s["iou"] == pytest.approx(expected), a
        assert s["correct"] == (expected >= 0.5)


# --- lmms-eval's CLI against nuwa-graph eval ---------------------------------------------------------
def test_lmms_cli_matches_builtin_eval(local, single):
    out, paths = local
    args = [sys.executable, "-m", "nuwa_graph.apps.cli", "eval", str(PIPELINES / "fastv.yaml"), "--set", "budget=32",
            "--data", str(paths["refcoco"]), "--data", str(paths["vqa"]), "--prompt-style", "lmms-eval",
            "--grounding-prompt", "where is {expression} ?", "--vqa-prompt", "{question}", "--max-new-tokens", "6",
            "--batch", "2", "--device", "cpu", "--no-vanilla", "-o", str(out / "builtin")]
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=out, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = json.loads((out / "builtin" / "results.json").read_text())["results"][0]
    preds = [json.loads(line) for line in (out / "builtin" / "predictions.jsonl").read_text().splitlines()]
    assert single["answers"]["nuwa_local_vqa"] == [p["answer"] for p in preds if p["task"] == "vqa"]
    assert single["answers"]["nuwa_local_rec"] == [p["answer"] for p in preds if p["task"] == "grounding"]
    res = single["results"]
    assert res["nuwa_local_vqa"]["exact_match,none"] == pytest.approx(ours["tasks"]["vqa"]["accuracy"])
    assert res["nuwa_local_rec"]["refcoco_ACC@0.5,none"] == pytest.approx(ours["tasks"]["grounding"]["accuracy"])
    assert res["nuwa_local_rec"]["refcoco_IoU,none"] == pytest.approx(ours["tasks"]["grounding"]["mean_iou"])
    assert 0 < ours["tasks"]["vqa"]["accuracy"]     # the embedded model answers these questions
    # the side file: one line per sample, FastV's schedule at budget 32: all 144 tokens before layer
    # K = scale32(2) of the embedded model's depth, 8 from K on
    from nuwa_graph.embedded import WEIGHTS_DIR
    from nuwa_graph.expressions import scale_layers

    depth = json.loads((WEIGHTS_DIR / "config.json").read_text())["text_config"]["num_hidden_layers"]
    k = scale_layers(2, depth)
    assert len(single["stats"]) == 8
    assert {tuple(s["visual_tokens_per_layer"]) for s in single["stats"]} == {tuple([144] * k + [8] * (depth - k))}
    assert all(s["visual_tokens_full"] == 144 and s["prefill_ms_batch"] > 0 for s in single["stats"])
    # the cost columns of `nuwa-graph eval`, per sample, and their per-task summary with how each was measured
    for s in single["stats"]:
        assert s["ttft_ms_batch"] >= s["prefill_ms_batch"] and s["method_ms_batch"] > 0
        assert s["kv_cache_bytes_per_sample"] > 0 and s["peak_memory_bytes_batch"] > 0 and s["peak_memory_source"]
        assert s["flops"]["prefill"] < s["flops"]["vanilla_prefill"] and s["flops"]["vision"] > 0  # counted
        assert s["question_agnostic"] is False and "decode_ms_per_token_batch" in s
    summary = json.loads(next((out / "single" / "stats").glob("efficiency-rank0-of-1.json")).read_text())
    for task in ("nuwa_local_vqa", "nuwa_local_rec"):
        eff = summary["tasks"][task]
        assert eff["prefill_ms"]["median"] > 0 and "median of" in eff["prefill_ms"]["how"]
        assert eff["ttft_ms"]["median"] > 0 and eff["flops"]["prefill"] > 0 and eff["kv_cache_bytes"]["per_sample"] > 0


def test_lmms_torchrun_two_processes_equal_one(local, single):
    out, paths = local
    d = out / "two"
    d.mkdir()
    two = run_lmms(paths["tasks"], d, batch=2, nproc=2)
    assert two["answers"] == single["answers"]
    for task, metric in (("nuwa_local_vqa", "exact_match,none"), ("nuwa_local_rec", "refcoco_ACC@0.5,none")):
        assert two["results"][task][metric] == single["results"][task][metric]
    assert len(two["stats"]) == 8 and sorted(f.name for f in (d / "stats").iterdir()) == [
        "efficiency-rank0-of-2.json", "efficiency-rank1-of-2.json", "rank0-of-2.jsonl", "rank1-of-2.jsonl"]


def _qwen_vl_utils(monkeypatch):
    """qwen-vl-utils' vision_process; it imports torchvision for videos only, and a CPU-only
    environment has none (see .ci/run), so a stand-in module serves its imports."""
    import importlib
    import types

    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.__version__ = "0.28.0"
        tv.io = types.ModuleType("torchvision.io")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.InterpolationMode = type("InterpolationMode", (), {"BICUBIC": "bicubic"})
        for name, mod in (("torchvision", tv), ("torchvision.io", tv.io), ("torchvision.transforms", tv.transforms)):
            monkeypatch.setitem(sys.modules, name, mod)
        for name in [m for m in sys.modules if m.startswith("qwen_vl_utils")]:
            monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("qwen_vl_utils.vision_process")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_images_are_prepared_as_each_qwen_model_does(monkeypatch, family):
    """qwen_image_as_lmms with the family's settings (QWEN_LMMS) against what lmms-eval's model
    for it hands qwen-vl-utils' fetch_image: a JPEG data URL on qwen2_vl / qwen2_5_vl, the
    image itself on qwen3_vl (image_patch_size 16: sides in multiples of 32)."""
    import numpy as np
    from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
    from PIL import Image

    from nuwa_graph.integrations.lmms import QWEN_LMMS, qwen_image_as_lmms

    fetch_image = _qwen_vl_utils(monkeypatch).fetch_image
    cfg = QWEN_LMMS[family]
    patch = 16 if family == "qwen3_vl" else 14
    rng = np.random.default_rng(0)
    for h, w in [(100, 150), (480, 640), (1500, 1100), (333, 901)]:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        given = (encode_image_to_data_url(img, image_format="JPEG", mime_type="image/jpeg", convert_rgb=True, quality=85)
                 if cfg.jpeg else img)
        theirs = fetch_image({"image": given, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
                             image_patch_size=patch)
        ours = qwen_image_as_lmms(img, 2 * patch, cfg.min_pixels, cfg.max_pixels, jpeg=cfg.jpeg)
        assert ours.size == theirs.size and ours.size[0] % (2 * patch) == 0 and ours.size[1] % (2 * patch) == 0
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (h, w)


QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("preset", ["tiny-qwen", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_the_plugin_serves_each_qwen_generation(preset, tmp_path):
    """`--model nuwa_graph --model_args pretrained=<Qwen-VL>`: the family's pixel defaults, its
    lmms-eval stop rule, its chat text, and per-sample stats of a pruned run."""
    from types import SimpleNamespace

    from PIL import Image

    from nuwa_graph.integrations.lmms import QWEN_LMMS, NuwaGraph

    plugin = NuwaGraph(pretrained=preset, pipeline=str(PIPELINES / "fastv.yaml"), budget="16", device="cpu",
                       stats=str(tmp_path / "stats"))
    family = plugin.adapter.family
    cfg = QWEN_LMMS[family]
    assert (plugin.min_pixels, plugin.max_pixels) == (cfg.min_pixels, cfg.max_pixels)
    assert ("\n\n" in plugin._options({"until": ["\n\n", "x"]})[1]) == (not cfg.drop_blank_line_stop)
    plugin.adapter.processor.chat_template = QWEN_LIKE
    doc = {"image": Image.new("RGB", (300, 200), (200, 30, 30))}
    plugin.task_dict = {"t": {"val": {0: doc, 1: doc}}}
    visual = lambda d: [d["image"]]  # noqa: E731
    requests = [SimpleNamespace(args=(f"what colour is it ? {i}", {"max_new_tokens": 2, "until": ["\n\n"]}, visual, i,
                                      "t", "val")) for i in (0, 1)]
    answers = plugin.generate_until(requests)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    stats = [json.loads(line) for line in plugin.stats_path.read_text().splitlines()]
    assert [r["doc_id"] for r in stats] == [0, 1]
    assert all(r["visual_tokens_per_layer"][-1] == 16 < r["visual_tokens_full"] for r in stats)


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen"])
def test_the_plugin_passes_every_visual_of_a_document(preset, tmp_path):
    """A multi-image document (MMMU, BLINK, MuirBench style): every visual is passed, in order, as
    one prompt of several images; the chat text has one image per visual, as lmms-eval's own
    model builds it; the run prunes each image (fastv's top-k over the whole prompt)."""
    from types import SimpleNamespace

    from PIL import Image

    from nuwa_graph.apps.prompts import chat_text
    from nuwa_graph.integrations.lmms import NuwaGraph

    plugin = NuwaGraph(pretrained=preset, pipeline=str(PIPELINES / "fastv.yaml"), budget="16", device="cpu",
                       stats=str(tmp_path / "stats"))
    if plugin.adapter.family.startswith("qwen"):
        plugin.adapter.processor.chat_template = QWEN_LIKE
    doc = {"images": [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (160, 240), (30, 30, 200))]}
    plugin.task_dict = {"t": {"val": {0: doc}}}
    text = chat_text(plugin.adapter, "which is redder ?", images=2)
    assert text.count("<image>" if preset == "tiny-llava" else "<|image_pad|>") == 2
    requests = [SimpleNamespace(args=("which is redder ?", {"max_new_tokens": 2}, lambda d: d["images"], 0, "t",
                                      "val"))]
    answers = plugin.generate_until(requests)
    assert len(answers) == 1 and isinstance(answers[0], str)
    stats = [json.loads(line) for line in plugin.stats_path.read_text().splitlines()]
    assert stats[-1]["visual_tokens_per_layer"][-1] < stats[-1]["visual_tokens_full"]


@pytest.mark.parametrize("preset", ["tiny-internvl", "tiny-llava-onevision"])
def test_the_plugin_serves_internvl_and_onevision(preset, tmp_path):
    """`--model nuwa_graph --model_args pretrained=<InternVL | OneVision>`: the chat text lmms-eval's
    chat model builds (internvl_hf; llava_hf's chat class) from lmms-eval's own message builder,
    InternVL tiled with internvl_hf's min/max patches, `until` not applied (those models never read
    it), the arguments those models do not have refused, and per-sample stats of a pruned run."""
    from types import SimpleNamespace

    from _chat_templates import CHAT_HF_TEMPLATES
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.protocol import ChatMessages
    from PIL import Image

    from nuwa_graph.apps.prompts import chat_text
    from nuwa_graph.integrations.lmms import NuwaGraph, PluginError

    plugin = NuwaGraph(pretrained=preset, pipeline=str(PIPELINES / "fastv.yaml"), budget="16", device="cpu",
                       stats=str(tmp_path / "stats"))
    family, proc = plugin.adapter.family, plugin.adapter.processor
    proc.chat_template = CHAT_HF_TEMPLATES[family]
    image = Image.new("RGB", (600, 600), (200, 30, 30))
    text = "what colour is it ?\nAnswer the question using a single word or phrase."
    # what internvl_hf / llava_hf (chat) render: the task's auto messages, dumped, through the processor
    messages = ChatMessages(messages=ConfigurableMessagesTask._build_user_turn([image], text)).model_dump()["messages"]
    theirs = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_text(plugin.adapter, text) == theirs
    kwargs = {"min_patches": 1, "max_patches": 12} if family == "internvl" else {}  # internvl_hf's processor call
    enc = proc(images=[image], text=theirs, return_tensors="pt", **kwargs)
    lmms_tokens = int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    if family == "internvl":
        assert enc["pixel_values"].shape[0] == 10  # 3x3 tiles + thumbnail at max 12; the preset's own max 6 gives 5
    assert plugin._options({"until": ["\n\n", "x"]})[1] == []

    doc = {"image": image}
    plugin.task_dict = {"t": {"val": {0: doc, 1: doc}}}
    visual = lambda d: [d["image"]]  # noqa: E731

    def ask(until):
        reqs = [SimpleNamespace(args=(text, {"max_new_tokens": 3, "until": until}, visual, i, "t", "val"))
                for i in (0, 1)]
        return plugin.generate_until(reqs)

    answers = ask(["\n\n"])
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    first_word = answers[0].split()[0]
    assert ask([first_word]) == answers  # a stop string in the answer does not cut it
    stats = [json.loads(line) for line in plugin.stats_path.read_text().splitlines()]
    assert [r["doc_id"] for r in stats] == [0, 1, 0, 1]
    assert all(r["visual_tokens_full"] == lmms_tokens and r["visual_tokens_per_layer"][-1] == 16 < lmms_tokens
               for r in stats)

    for refused in ({"system_prompt": "Be brief."}, {"chat_template": "{{ 1 }}"},
                    {"min_patches": "3", "max_patches": "2"}):  # InternVL: min > max; OneVision: not its tiling
        with pytest.raises(PluginError, match=next(iter(refused))):
            NuwaGraph(pretrained=preset, device="cpu", stats=str(tmp_path / "s2"), **refused)
