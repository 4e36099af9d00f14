"""The procedural shapes world (scenes, grounding and VQA samples) and its file formats.

An application of the engine (like nuwa_graph/apps and nuwa_graph/embedded): the embedded
model is trained on it and the built-in sample set of `run` and `eval` is drawn from it.
scene.py draws scenes, language.py describes them, shapes.py makes the samples.
"""

from .boxes import BINS, box_to_tokens, coord_tokens, iou, parse_box, tokens_to_box
from .shapes import (
                     GROUNDING_TEMPLATE,
                     GroundingItem,
                     Scene,
                     VQAItem,
                     make_scene,
                     referring_expressions,
                     resolve,
                     samples,
                     vocabulary,
)

__all__ = ["BINS", "coord_tokens", "load_split", "write_split", "GROUNDING_TEMPLATE", "GroundingItem", "Scene", "VQAItem",
           "box_to_tokens", "iou", "make_scene", "parse_box", "referring_expressions", "resolve", "samples", "tokens_to_box",
           "vocabulary"]
from .formats import load_split, write_split
