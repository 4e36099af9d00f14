"""Loaders for RefCOCO-style and VQA files, on small files made here; the world's writer round trip."""

import base64
import io
import json

import pytest
from PIL import Image

from nuwa_graph.apps.data import DataFormatError, exact_match, load_grounding, load_vqa, normalize_answer, vqa_accuracy
from nuwa_graph.world import load_split, make_scene, resolve, write_split


def _png(path, color=(255, 0, 0), size=(20, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_world_split_round_trip(tmp_path):
    paths = write_split(tmp_path / "split", n_images=6, seed=11, n_grounding=2, n_vqa=2)
    g, v = load_split(tmp_path / "split")
    world = json.loads(paths["world"].read_text())
    assert world["seed"] == 11 and len(world["scenes"]) == 6
    assert len(g) >= 6 and len(v) == 12
    for s in g:
        i = int(s.id.split("-")[1])
        scene = make_scene(11, i)
        assert s.load_image().size == (168, 168)
        assert tuple(s.box) == scene.objects[s.meta["target"]].box   # xywh in the file -> xyxy back
        assert resolve(scene, s.expression) == [s.meta["target"]]
        assert s.width == s.height == 168
    assert {x.meta["kind"] for x in v} <= {"color", "shape", "size", "count", "exist", "relation"}
    assert all(len(x.answers) == 1 for x in v)
    assert v[0].load_image().size == (168, 168)


def test_lmms_eval_refcoco_export(tmp_path):
    _png(tmp_path / "coco" / "a.jpg")
    recs = [{"question_id": "q1", "file_name": "coco/a.jpg", "answer": ["man on the left", "left guy"],
             "bbox": [10.0, 20.0, 30.0, 40.0], "segmentation": [], "iscrowd": 0, "question": "caption it"}]
    p = tmp_path / "refcoco_val.json"
    p.write_text(json.dumps(recs))
    out = load_grounding(p)
    assert [s.expression for s in out] == ["man on the left", "left guy"]
    assert out[0].box == (10.0, 20.0, 40.0, 60.0)
    assert out[0].id == "q1-0" and out[0].load_image().size == (20, 10)


def test_refer_style_sentences_jsonl_and_image_root(tmp_path):
    _png(tmp_path / "imgs" / "b.jpg")
    lines = [{"ref_id": 7, "image": "b.jpg", "sentences": [{"sent": "red car", "raw": "Red car!"}],
              "bbox": [1, 2, 3, 4]},
             {"id": 8, "img_path": "b.jpg", "expression": "the dog", "box_xyxy": [5, 6, 7, 8], "width": 20, "height": 10}]
    p = tmp_path / "refcocog.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = load_grounding(p, image_root=tmp_path / "imgs")
    assert [(s.id, s.expression, s.box) for s in out] == [("7", "red car", (1, 2, 4, 6)), ("8", "the dog", (5, 6, 7, 8))]
    assert out[1].width == 20 and out[1].image.endswith("imgs/b.jpg")


def test_qwen_style_xyxy_and_embedded_bytes(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    recs = {"data": [{"image": {"bytes": base64.b64encode(buf.getvalue()).decode()}, "sent": "it",
                      "bbox": [1, 2, 5, 6]}]}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(recs))
    (s,) = load_grounding(p, bbox_format="xyxy")
    assert s.box == (1, 2, 5, 6) and s.load_image().size == (8, 8)


def test_grounding_errors_name_the_record(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"file_name": "x.jpg", "answer": ["a"], "bbox": [0, 0, 1, 1]}, {"file_name": "x.jpg"}]))
    with pytest.raises(DataFormatError, match="record 1"):
        load_grounding(p)


def test_gqa_and_vqav2_jsonl(tmp_path):
    gqa = tmp_path / "gqa.jsonl"
    gqa.write_text(json.dumps({"questionId": "201", "imageId": "n123", "question": "Is the sky blue?",
                               "answer": "yes", "fullAnswer": "Yes, it is."}) + "\n")
    (s,) = load_vqa(gqa, image_root="/data/gqa/images", image_template="{imageId}.jpg")
    assert (s.id, s.question, s.answers, s.image) == ("201", "Is the sky blue?", ["yes"], "/data/gqa/images/n123.jpg")
    v2 = tmp_path / "vqav2.jsonl"
    v2.write_text(json.dumps({"question_id": 5, "image_id": 42, "question": "How many?",
                              "answers": [{"answer": "2", "answer_id": i} for i in range(3)] + [{"answer": "two"}],
                              "multiple_choice_answer": "2"}) + "\n")
    (t,) = load_vqa(v2, image_template="COCO_val2014_{image_id:012d}.jpg")
    assert t.image.endswith("COCO_val2014_000000000042.jpg") and t.answers == ["2", "2", "2", "two"]
    llava = tmp_path / "llava_questions.jsonl"
    llava.write_text(json.dumps({"question_id": 1, "image": "/abs/x.jpg", "text": "What?"}) + "\n")
    (u,) = load_vqa(llava)
    assert u.image == "/abs/x.jpg" and u.answers == [] and u.question == "What?"
    with pytest.raises(DataFormatError, match="image"):
        load_vqa(gqa)   # imageId without a template


def test_answer_metrics():
    assert normalize_answer("The Red, circle.") == "red circle"
    assert exact_match("Yes", ["yes"]) == 1.0 and exact_match("no", ["yes"]) == 0.0
    assert vqa_accuracy("2", ["2", "2", "two"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("2", ["2"] * 4) == 1.0
