"""The shapes world: determinism, expressions that refer to their target, consistent VQA answers, boxes."""

import numpy as np
import pytest

from nuwa_graph.world import shapes as W
from nuwa_graph.world.boxes import box_to_tokens, iou, parse_box, tokens_to_box


def test_scenes_are_deterministic_by_seed():
    a, b, c = W.make_scene(3, 17), W.make_scene(3, 17), W.make_scene(4, 17)
    assert a.as_dict() == b.as_dict()
    assert np.array_equal(a.render()[0], b.render()[0])
    assert a.as_dict() != c.as_dict()
    s1 = W.samples(5, 2, 2, 3)
    s2 = W.samples(5, 2, 2, 3)
    assert [g.expression for g in s1[1]] == [g.expression for g in s2[1]]
    assert [(v.question, v.answer) for v in s1[2]] == [(v.question, v.answer) for v in s2[2]]


def test_scene_geometry():
    for i in range(30):
        s = W.make_scene(0, i)
        img, omap = s.render()
        assert img.shape == (168, 168, 3) and img.dtype == np.uint8
        assert W.MIN_OBJECTS <= len(s.objects) <= W.MAX_OBJECTS
        for k, o in enumerate(s.objects):
            x0, y0, x1, y1 = o.box
            ys, xs = np.nonzero(omap == k + 1)
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
            assert xs.min() <= x0 + 1 and xs.max() >= x1 - 2          # the box is tight
        assert s.patch_labels().shape == (12, 12)
        assert np.allclose(s.patch_coverage().sum(axis=(1, 2)) * 196, [(omap == k + 1).sum() for k in range(len(s.objects))])


def _scene(objs):
    return W.Scene(0, 0, 168, [W.Obj(c, sh, sz, box) for c, sh, sz, box in objs])


def test_leftmost_red_circle_is_unique_and_matches_its_box():
    s = _scene([("red", "circle", "small", (100, 20, 124, 44)),
                ("red", "circle", "large", (10, 90, 50, 130)),
                ("blue", "circle", "small", (5, 10, 29, 34)),
                ("red", "square", "small", (60, 60, 84, 84))])
    assert W.resolve(s, "the leftmost red circle") == [1]
    assert W.resolve(s, "the red circle on the left") == [1]
    assert W.resolve(s, "the topmost red circle") == [0]
    assert W.resolve(s, "the leftmost circle") == [2]
    assert W.resolve(s, "the red square") == [3]
    assert W.resolve(s, "the red circle in the bottom left") == [1]
    exprs = {e: k for k, e, _ in W.referring_expressions(s, 1)}
    assert "the leftmost red circle" in exprs and exprs["the leftmost red circle"] == "superlative"
    assert "the red circle" not in exprs   # two red circles: not unique
    # a near tie is not 'leftmost'
    t = _scene([("red", "circle", "small", (10, 20, 34, 44)), ("red", "circle", "small", (14, 100, 38, 124))])
    assert W.resolve(t, "the leftmost red circle") == []


def test_every_generated_expression_refers_to_its_target_only():
    kinds = set()
    for i in range(150):
        scene, g_items, _ = W.samples(1, i, 3, 0)
        for g in g_items:
            assert W.resolve(scene, g.expression) == [g.target], g.expression
            assert tuple(g.box) == scene.objects[g.target].box
            assert g.question == f"where is {g.expression} ?"
            kinds.add(g.kind)
    assert kinds == {"attribute", "superlative", "side", "region"}


def _check_vqa(scene, v):
    words = v.question.split()
    objs = scene.objects
    if v.kind == "count":
        d = W.parse_desc(" ".join(w[:-1] if w.endswith("s") and w != "is" else w for w in words[2:-3]))
        assert v.answer == str(len(d.select(scene)))
    elif v.kind == "exist":
        d = W.parse_desc(" ".join(words[3:-1]))
        assert v.answer == ("yes" if d.select(scene) else "no")
    elif v.kind in ("color", "shape", "size"):
        ids = W.resolve(scene, " ".join(words[3:-1]))
        assert len(ids) == 1 and getattr(objs[ids[0]], v.kind) == v.answer
    elif v.kind == "relation":
        body = " ".join(words[1:-1])
        rel = next(r for r in W.RELATIONS if f" {r} the " in body)
        axis, sign = W.RELATIONS[rel]
        a_txt, b_txt = body.split(f" {rel} ", 1)
        (a,), (b,) = W.resolve(scene, a_txt), W.resolve(scene, b_txt)
        delta = objs[b].center[axis] - objs[a].center[axis]
        assert abs(delta) >= W.RELATION_MARGIN
        assert v.answer == ("yes" if delta * -sign > 0 else "no")
    else:
        raise AssertionError(v.kind)


def test_vqa_answers_are_consistent_with_the_scene():
    seen = {}
    for i in range(150):
        scene, _, v_items = W.samples(2, i, 0, 4)
        for v in v_items:
            _check_vqa(scene, v)
            seen.setdefault(v.kind, set()).add(v.answer)
    assert set(seen) == set(W.VQA_KINDS)
    assert seen["exist"] == {"yes", "no"} and seen["relation"] == {"yes", "no"}


def test_vocabulary_covers_every_sample():
    vocab = set(W.vocabulary())
    for i in range(100):
        _, g_items, v_items = W.samples(4, i, 2, 3)
        for text in [g.question for g in g_items] + [v.question + " " + v.answer for v in v_items]:
            assert set(text.split()) <= vocab, text


def test_box_tokens_and_parser():
    assert box_to_tokens((0, 0, 168, 168), 168, 168) == "<x0> <y0> <x15> <y15>"
    assert box_to_tokens((21, 42, 63, 84), 168, 168) == "<x2> <y4> <x6> <y8>"
    assert parse_box("<x2> <y4> <x6> <y8>", 168, 168) == pytest.approx((26.25, 47.25, 68.25, 89.25))
    assert parse_box("<x6> <y8> <x2> <y4></s>", 168, 168) == pytest.approx((26.25, 47.25, 68.25, 89.25))
    assert parse_box("box: [0.1, 0.2, 0.5, 0.6]", 100, 200) == pytest.approx((10, 40, 50, 120))
    assert parse_box("(10, 20, 30, 40)", 100, 100) == (10, 20, 30, 40)
    for bad in ["", "red", "<x3> <y5> <x9>", "<x16> <y0> <x1> <y1>", "<y1> <x1> <y2> <x2>", None]:
        assert parse_box(bad, 168, 168) is None
    assert tokens_to_box(0, 0, 15, 15, 160, 160) == (5, 5, 155, 155)
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou(None, (0, 0, 1, 1)) == 0.0
    # the 16-bin format itself loses little: almost every true box survives at IoU >= 0.5
    ious = [iou(parse_box(box_to_tokens(o.box, 168, 168), 168, 168), o.box)
            for i in range(200) for o in W.make_scene(9, i).objects]
    assert np.mean(np.array(ious) >= 0.5) > 0.97
