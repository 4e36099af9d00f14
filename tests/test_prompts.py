"""Prompt handling of `nuwa-graph eval`: escapes, lmms-eval's RefCOCO prompt and box parsing,
the chat text lmms-eval's models build, the data options on the command line, and full
tokens counted per sample (each Qwen-VL generation)."""

import io
import json
import shutil

import pytest
from typer.testing import CliRunner

from nuwa_graph.apps.cli import app
from nuwa_graph.apps.data import VQASample
from nuwa_graph.apps.evaluate import EvalError, Task, evaluate, load_data, plan_runs, sample_data
from nuwa_graph.apps.prompts import (
    LMMS_REC_PROMPT,
    VICUNA_SYSTEM,
    chat_text,
    llava_chat_text,
    lmms_grounding_score,
    lmms_iou,
    parse_lmms_box,
    unescape,
)
from tests.test_evaluate import PIPELINES


def test_unescape():
    assert unescape(r"{question}\nAnswer briefly.") == "{question}\nAnswer briefly."
    assert unescape(r"a\tb\\n c:\path") == "a\tb\\n c:\\path"
    assert unescape("no escapes") == "no escapes"


@pytest.mark.parametrize("answer,box", [
    ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]),
    ("The box is [ 0, 0.25,1, 1 ] here [0.9, 0.9, 1, 1]", [0.0, 0.25, 1.0, 1.0]),
    ("[-0.1, 0.2, 0.5, 0.6]", [-0.1, 0.2, 0.5, 0.6]),
    ("[0.1 0.2 0.5 0.6]", None),          # no commas: lmms-eval's pattern needs them
    ("[0.1, 0.2, 0.5]", None),
    ("<x1> <y2> <x5> <y6>", None),        # coordinate tokens are not lmms-eval's format
    ("[1e-3, 0.2, 0.5, 0.6]", None),
])
def test_parse_lmms_box(answer, box):
    assert parse_lmms_box(answer) == box


def test_lmms_grounding_score_normalises_the_target():
    # target (20, 40, 60, 80) px in a 200 x 100 image = [0.1, 0.4, 0.3, 0.8]
    s = lmms_grounding_score("[0.1, 0.4, 0.3, 0.8]", (20, 40, 60, 80), 200, 100)
    assert s["parsed"] and s["correct"] and s["iou"] == pytest.approx(1.0)
    s = lmms_grounding_score("[20, 40, 60, 80]", (20, 40, 60, 80), 200, 100)   # pixels: far off
    assert s["parsed"] and not s["correct"]
    s = lmms_grounding_score("no idea", (20, 40, 60, 80), 200, 100)
    assert not s["parsed"] and not s["correct"] and s["iou"] == 0.0
    assert lmms_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert lmms_iou([0, 0, 1, 1], [0.5, 0, 1.5, 1]) == pytest.approx(1 / 3)


def test_llava_chat_text_as_llava_hf():
    from transformers import AutoProcessor

    from nuwa_graph.embedded import WEIGHTS_DIR

    proc = AutoProcessor.from_pretrained(WEIGHTS_DIR)
    # the checkpoint's template is written for list contents: the text must survive
    assert llava_chat_text(proc, "where is the red circle ?") == "USER: <image>\nwhere is the red circle ? ASSISTANT:"
    assert llava_chat_text(proc, "<image>\nwhat color ?") == "USER: <image>\nwhat color ? ASSISTANT:"
    # a string-content template is used as it is
    tmpl = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    assert llava_chat_text(proc, "q ?", chat_template=tmpl) == "<<<image>\nq ?>>A:"

    class NoTemplate:
        chat_template = None

    assert llava_chat_text(NoTemplate(), "q ?") == f"{VICUNA_SYSTEM} USER: <image>\nq ? ASSISTANT:"


QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


QWEN_PRESETS = ["tiny-qwen", "tiny-qwen2-vl", "tiny-qwen3-vl"]  # Qwen2.5-VL, Qwen2-VL, Qwen3-VL


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_qwen_chat_text_has_system_and_image_first(preset):
    """lmms-eval's qwen2_vl, qwen2_5_vl and qwen3_vl build the same messages (system prompt
    "You are a helpful assistant.", the image, then the text) through the checkpoint's template."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.apps.prompts import LMMS_MODELS, lmms_eval_style

    adapter = load_adapter(preset)
    with pytest.raises(ValueError, match=f"no chat template.*{LMMS_MODELS[adapter.family]}"):
        chat_text(adapter, "what is it ?")
    adapter.processor.chat_template = QWEN_LIKE
    text = chat_text(adapter, "<image>what is it ?")
    assert "You are a helpful assistant." in text and "<image>" not in text
    assert text.index("<|vision_start|><|image_pad|><|vision_end|>") < text.index("what is it ?")
    assert text.rstrip().endswith("assistant")
    prompt_fn, _ = lmms_eval_style(adapter)
    assert prompt_fn(None, "what is it ?") == chat_text(adapter, "what is it ?")


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_qwen_full_tokens_are_counted_per_sample(preset):
    """Two images of different sizes in one batch: `full` is the mean of both, not the first
    (`nuwa-graph eval` on each Qwen-VL generation)."""
    from nuwa_graph.adapters import load_adapter
    from nuwa_graph.adapters.tiny import TINY_GRID, tiny_qwen_image
    from nuwa_graph.adapters.tiny_qwen_vl import unit_pixels

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    adapter = load_adapter(preset)
    grids = [TINY_GRID, (4, 6)]
    samples = [VQASample(str(i), png(tiny_qwen_image(g, seed=i, unit=unit_pixels(adapter))), "what ?", ["red"])
               for i, g in enumerate(grids)]
    runs = plan_runs([PIPELINES / "vanilla.yaml"])
    result = evaluate(adapter, runs, [Task("vqa", "mem", samples)], batch=2, max_new_tokens=1, warmup=False)
    full = [g[0] * g[1] for g in grids]
    assert result["results"][0]["visual_tokens_full"] == pytest.approx(sum(full) / 2)
    assert result["results"][0]["visual_tokens_per_layer"][0] == pytest.approx(sum(full) / 2)


def test_load_data_image_root_template_and_bbox_format(tmp_path):
    g, v = sample_data(tmp_path / "d", n_images=2, seed=3)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(g, moved / "refcoco.json")
    with pytest.raises(EvalError, match="image-root"):
        load_data([moved / "refcoco.json"])
    tasks = load_data([moved / "refcoco.json"], image_root=tmp_path / "d")
    assert tasks[0].samples[0].load_image().size[0] > 0
    # records without an image field, named by a template over their fields
    recs = [json.loads(line) for line in v.read_text().splitlines()]
    for r in recs:
        r["scene"] = int(r.pop("image").split("/")[-1].split(".")[0])
    (moved / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tasks = load_data([moved / "vqa.jsonl"], image_root=tmp_path / "d", image_template="images/{scene:06d}.png")
    assert len(tasks[0].samples) == len(recs) and tasks[0].samples[0].load_image()
    # the same boxes stored as [x0, y0, x1, y1] read back equal with --bbox-format xyxy
    grec = json.loads(g.read_text())
    for r in grec:
        x, y, w, h = r["bbox"]
        r["bbox"] = [x, y, x + w, y + h]
    (tmp_path / "d" / "refcoco_xyxy.json").write_text(json.dumps(grec))
    xyxy = [s.box for s in load_data([tmp_path / "d" / "refcoco_xyxy.json"], bbox_format="xyxy")[0].samples]
    xywh = [s.box for s in load_data([g])[0].samples]
    assert xyxy == xywh
    with pytest.raises(EvalError, match="zero or negative size"):  # read the wrong way, the boxes are invalid
        load_data([g], bbox_format="xyxy")
    with pytest.raises(EvalError, match="bbox-format"):
        load_data([g], bbox_format="cxcywh")


def test_cli_eval_prompt_options_are_checked(tmp_path):
    r = CliRunner().invoke(app, ["eval", str(PIPELINES / "vanilla.yaml"), "--prompt-style", "llava", "-o",
                                 str(tmp_path)])
    assert r.exit_code != 0 and "--prompt-style" in r.output
    r = CliRunner().invoke(app, ["eval", str(PIPELINES / "vanilla.yaml"), "--bbox-format", "cxcywh", "-o",
                                 str(tmp_path)])
    assert r.exit_code == 1 and "bbox-format" in r.output
    assert "{expression}" in LMMS_REC_PROMPT


from _chat_templates import CHAT_HF_TEMPLATES  # noqa: E402  (shared with test_lmms.py)


def test_lmms_prompts_per_tiled_family():
    """LLaVA-NeXT checkpoints go through lmms-eval's llava_hf (the same text as LLaVA); InternVL
    (internvl_hf) and OneVision (llava_hf's chat class) get one user turn, image then text, through
    the processor's template, no system message; what that template does not allow is refused."""
    from nuwa_graph.adapters.tiny_tiled import internvl_processor, onevision_processor
    from nuwa_graph.apps.prompts import LMMS_MODELS, chat_messages_text, internvl_tiles_as_lmms, lmms_eval_style

    class NoTemplate:
        chat_template = None

    class Adapter:
        processor = NoTemplate()

    nxt = Adapter()
    nxt.family = "llava_next"  # type: ignore[attr-defined]
    assert chat_text(nxt, "q ?") == f"{VICUNA_SYSTEM} USER: <image>\nq ? ASSISTANT:"
    expected = {"internvl": "<|im_start|>user\n<IMG_CONTEXT>\nq ?\nAnswer.<|im_end|>\n<|im_start|>assistant\n",
                "llava_onevision": "<|im_start|>user\n<image>\nq ?\nAnswer.<|im_end|>\n<|im_start|>assistant\n"}
    for family, proc in (("internvl", internvl_processor()), ("llava_onevision", onevision_processor())):
        assert LMMS_MODELS[family] in ("internvl_hf", "llava_hf")
        other = Adapter()
        other.family = family  # type: ignore[attr-defined]
        other.processor = proc  # type: ignore[misc]
        with pytest.raises(ValueError, match="no chat template"):
            chat_text(other, "q ?")
        proc.chat_template = CHAT_HF_TEMPLATES[family]
        assert chat_text(other, "q ?\nAnswer.") == expected[family]
        assert chat_messages_text(proc, "q ?\nAnswer.") == expected[family]
        with pytest.raises(ValueError, match="system_prompt"):
            chat_text(other, "q ?", system_prompt="Be brief.")
        with pytest.raises(ValueError, match="chat_template"):
            chat_text(other, "q ?", chat_template="{{ 1 }}")
        with pytest.raises(ValueError, match="two image placeholders"):
            chat_text(other, f"{proc.image_token}\nq ?")
        prompt_fn, _ = lmms_eval_style(other)
        assert prompt_fn(None, "q ?\nAnswer.") == expected[family]
    ip = internvl_processor().image_processor
    holder = Adapter()
    holder.processor = type("P", (), {"image_processor": ip})()  # type: ignore[misc]
    ip.crop_to_patches, ip.max_patches = False, 6
    internvl_tiles_as_lmms(holder)
    assert (ip.crop_to_patches, ip.min_patches, ip.max_patches) == (True, 1, 12)
    with pytest.raises(ValueError, match="min_patches"):
        internvl_tiles_as_lmms(holder, 3, 2)


def test_checkpoint_chat_template_prefers_the_processors(tmp_path):
    """A processor built from its parts takes the template AutoProcessor would load
    (chat_template.jinja, legacy chat_template.json), else the tokenizer's."""
    from nuwa_graph.adapters.processors import checkpoint_chat_template
    from nuwa_graph.adapters.tiny_tiled import internvl_tokenizer

    tok = internvl_tokenizer()
    tok.chat_template = "{{ 'tokenizer' }}"
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    assert checkpoint_chat_template(str(tmp_path), tok) == "{{ 'tokenizer' }}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'legacy processor' }}"}))
    assert checkpoint_chat_template(str(tmp_path), tok) == "{{ 'legacy processor' }}"
    (tmp_path / "chat_template.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ 'processor' }}")
    assert checkpoint_chat_template(str(tmp_path), tok) == "{{ 'processor' }}"
