"""Write shapes-world splits in the formats the real-data loaders read (nuwa_graph.apps.data).

A split folder holds
- `images/NNNNNN.png`: the scenes;
- `refcoco.json`: a JSON list of grounding records with the lmms-eval RefCOCO field names:
  `question_id`, `file_name` (relative to the folder), `answer` (list with the referring
  expression), `bbox` [x, y, w, h] in pixels, `image_width`, `image_height`, plus `kind`
  (attribute / superlative / side / region) and `target` (object index);
- `vqa.jsonl`: one question per line: `question_id`, `image`, `question`, `answer`,
  `answers`, `kind` (color / shape / size / count / exist / relation);
- `dialog.jsonl` (with `n_turns`): one multi-turn record per scene: `id`, `image`, `width`,
  `height`, `turns` (each `question`, `answers`, `kind`): several VQA questions about one
  image (nuwa_graph/apps/dialogs.py reads it);
- `world.json`: seed, image count, and every scene's objects (colours, shapes, boxes).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..apps.data import GroundingSample, VQASample, load_grounding, load_vqa
from .shapes import IMAGE_SIZE, dialog_items, samples


def write_split(out_dir: str | Path, n_images: int, seed: int, n_grounding: int = 1, n_vqa: int = 2,
                start: int = 0, size: int = IMAGE_SIZE, n_turns: int = 0) -> dict[str, Path]:
    """Write scenes start..start+n_images-1 of world `seed`; returns the written paths. With
    `n_turns`, also dialog.jsonl: up to n_turns questions about each scene."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    grounding, vqa, scenes, dialogs = [], [], [], []
    for i in range(start, start + n_images):
        scene, g_items, v_items = samples(seed, i, n_grounding, n_vqa, size)
        rel = f"images/{i:06d}.png"
        scene.image().save(out / rel, optimize=False, compress_level=1)
        scenes.append(scene.as_dict())
        for k, g in enumerate(g_items):
            x0, y0, x1, y1 = g.box
            grounding.append({"question_id": f"{seed}-{i}-g{k}", "file_name": rel, "answer": [g.expression],
                              "bbox": [x0, y0, x1 - x0, y1 - y0], "image_width": size, "image_height": size,
                              "kind": g.kind, "target": g.target})
        for k, v in enumerate(v_items):
            vqa.append({"question_id": f"{seed}-{i}-q{k}", "image": rel, "question": v.question,
                        "answer": v.answer, "answers": [v.answer], "kind": v.kind})
        if n_turns:
            _, turns = dialog_items(seed, i, n_turns, size)
            dialogs.append({"id": f"{seed}-{i}-d", "image": rel, "width": size, "height": size,
                            "turns": [{"question": t.question, "answers": [t.answer], "kind": t.kind} for t in turns]})
    paths = {"refcoco": out / "refcoco.json", "vqa": out / "vqa.jsonl", "world": out / "world.json",
             "images": out / "images"}
    paths["refcoco"].write_text(json.dumps(grounding, indent=0) + "\n")
    paths["vqa"].write_text("".join(json.dumps(r) + "\n" for r in vqa))
    if n_turns:
        paths["dialog"] = out / "dialog.jsonl"
        paths["dialog"].write_text("".join(json.dumps(r) + "\n" for r in dialogs))
    paths["world"].write_text(json.dumps({"world": "shapes", "seed": seed, "start": start, "n_images": n_images,
                                          "size": size, "n_turns": n_turns, "scenes": scenes}) + "\n")
    return paths


def load_split(split_dir: str | Path) -> tuple[list[GroundingSample], list[VQASample]]:
    """The grounding and VQA samples of a written split, read by the real-data loaders."""
    d = Path(split_dir)
    return load_grounding(d / "refcoco.json"), load_vqa(d / "vqa.jsonl")
