"""What the adapter and signal tests share to check signals: a test-only scorer that records one
model signal, and the tiny LLaVA's eager reference maps (imported as `_probes`, as
`_chat_templates`: the lmms extra installs a top-level `tests`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from nuwa_graph import registry
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import Site
from nuwa_graph.types import Scores


class ProbeParams(NodeParams):
    kind: str
    site: str
    args: dict = {}


def signal_probe(type_name: str, record: Callable[[str, Any], None]) -> type[Node]:
    """A scorer node type named `type_name` that reads the signal its params name (`kind` at
    `site` with `args`), hands it to `record(node name, value)` and scores every present token 0."""

    class Probe(Node):
        """Reads one signal, records it, scores every present token 0."""

        family = "scorer"
        outputs = {"scores": Port(Scores)}
        Params = ProbeParams

        def site(self):
            return Site(self.params.site)

        def requests(self):
            return [SignalRequest.make(self.params.kind, self.params.site, **self.params.args)]

        def run(self, ctx):
            record(self.name, ctx.signal(self.requests()[0]))
            return {"scores": Scores(torch.zeros(ctx.present.numel(), device=ctx.device), ctx.present.clone())}

    Probe.type_name = type_name
    return Probe


def eager_llava_reference(image, prompt: str):
    """The tiny-llava preset's weights run eagerly with every attention map and hidden state:
    (model, encoding, vision tower output, model output, the image token positions)."""
    from nuwa_graph.adapters.tiny import build_tiny_llava

    model, proc = build_tiny_llava()  # same seed, same weights as the preset
    model.set_attn_implementation({"vision_config": "eager", "text_config": "eager"})
    enc = proc(images=[image], text=["USER: <image>\n" + prompt + " ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        vis = model.model.vision_tower(enc["pixel_values"], output_attentions=True, output_hidden_states=True)
        out = model(**enc, output_attentions=True, output_hidden_states=True)
    img = (enc["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    return model, enc, vis, out, img


@contextmanager
def registered(*node_types: type[Node]) -> Iterator[None]:
    """The node types registered while the block runs (a module fixture's body)."""
    registry.ensure_loaded()
    for t in node_types:
        registry.register(t)
    try:
        yield
    finally:
        for t in node_types:
            registry._REGISTRY.pop(t.type_name, None)
