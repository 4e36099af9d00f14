"""Typed signal requests (nuwa_graph/signals.py): parsed once, one rule for `queries`, their
documented shapes, and load-time problems that name the node and the field."""

from __future__ import annotations

import re

import pytest
import torch

from nuwa_graph import PipelineError, load_text, registry
from nuwa_graph.executor import Executor
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.signals import (
    KINDS,
    SIGNAL_KINDS,
    LLMAttention,
    Queries,
    SignalError,
    SignalRequest,
)
from nuwa_graph.simulate import LLAVA_15, QWEN25_VL, ModelGeometry, SyntheticSignals
from nuwa_graph.sites import Site
from nuwa_graph.types import Geometry, Scores

# a valid request of every kind, with the site it is read at
EXAMPLES = {
    "vision.hidden": ("vision", {"layer": -2}),
    "vision.hidden_mean": ("vision", {"start": 1, "stop": 4}),
    "vision.merged_hidden_mean": ("vision", {"start": 7, "stop": 24, "order": "window"}),
    "vision.cls_hidden": ("vision", {"layer": -2}),
    "vision.cls_attention": ("vision", {"layer": -2}),
    "vision.attention_received": ("vision", {"layer": 9}),
    "vision.keys": ("vision", {"layer": -1}),
    "vision.qk_single_head": ("vision", {"layer": -1}),
    "external": ("vision", {"name": "user"}),
    "pre_llm.visual": ("pre_llm", {}),
    "pre_llm.text": ("pre_llm", {}),
    "llm.attention": ("llm.3", {"layer": 2, "queries": "last:3", "rope": False, "softmax_over": "image"}),
    "llm.hidden": ("llm.2", {"layer": 2}),
    "llm.keys": ("llm.2", {"layer": 1, "rope": True, "tokens": "image"}),
    "llm.token_hidden": ("llm.2", {"layer": 2, "tokens": "image", "norm": "final"}),
    "vision.clip_embeds": ("vision", {"layer": -2}),
    "vision.clip_text_embeds": ("vision", {}),
}


def test_every_kind_has_an_example_a_shape_and_a_description():
    assert set(EXAMPLES) == set(KINDS) == set(SIGNAL_KINDS)
    for kind, cls in KINDS.items():
        assert cls.KIND == kind and cls.SHAPE.startswith("(") and SIGNAL_KINDS[kind].endswith(cls.SHAPE)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_make_returns_the_typed_class_with_typed_fields(kind):
    site, args = EXAMPLES[kind]
    req = SignalRequest.make(kind, site, **args)
    assert type(req) is KINDS[kind] and req.kind == kind and req.site == site
    for name, value in args.items():
        typed = getattr(req, name)
        assert (str(typed) if isinstance(typed, Queries) else typed) == value
        assert req.arg(name) == value  # the arguments as given are kept
    # the key (what model-free runs give tensors under) is the same as before typing
    assert req.key == f"{kind}(" + ",".join(f"{k}={v}" for k, v in sorted(args.items())) + ")"
    assert req == SignalRequest.make(kind, site, **dict(reversed(list(args.items()))))
    assert hash(req) == hash(SignalRequest.make(kind, site, **args))


def test_defaults_of_llm_attention():
    req = SignalRequest.make("llm.attention", "llm.2", layer=1)
    assert isinstance(req, LLMAttention)
    assert (req.queries, req.rope, req.softmax_over) == (Queries("last"), True, "all")
    assert req.key == "llm.attention(layer=1)"


@pytest.mark.parametrize("text, which, n", [("last", "last", 1), ("text", "text", 1), ("last:1", "last_n", 1),
                                            ("last:12", "last_n", 12)])
def test_queries_parse(text, which, n):
    q = Queries.parse(text)
    assert (q.which, q.n, str(q)) == (which, n, text)


@pytest.mark.parametrize("text", ["last:0", "last:", "last:-1", "last:01", "last:x", "Last", " last", "first",
                                  "last:3 ", "last:٣", "", None, 3, True])
def test_queries_refused(text):
    with pytest.raises(ValueError, match=re.escape(Queries.VALID)):
        Queries.parse(text)


@pytest.mark.parametrize("text", ["last", "text", "last:1", "last:7", "last:0", "last:01", "last:", "first", "Last"])
def test_one_rule_for_queries_node_param_and_signal(text):
    """scorer.llm-attention's param check and the signal agree on every value."""
    cls = registry.get("scorer.llm-attention")
    try:
        cls("s", {"layer": 1, "queries": text})
        node_ok = True
    except Exception:
        node_ok = False
    try:
        SignalRequest.make("llm.attention", "llm.2", layer=1, queries=text)
        signal_ok = True
    except SignalError:
        signal_ok = False
    assert node_ok == signal_ok


@pytest.mark.parametrize("kind, site, args, arg, words", [
    ("llm.attention", "llm.2", {"layer": 1, "queries": "last:0"}, "queries", ["'last', 'last:N' (N >= 1) or 'text'"]),
    ("llm.attention", "llm.2", {"layer": 1, "softmax_over": "keys"}, "softmax_over", ["'all' or 'image'", "'keys'"]),
    ("llm.attention", "llm.2", {"layer": 1, "rope": "yes"}, "rope", ["true or false"]),
    ("llm.attention", "llm.2", {"layer": 3}, "layer", ["0..2"]),
    ("llm.attention", "llm.2", {}, "layer", ["needs argument 'layer'"]),
    ("llm.attention", "vision", {"layer": 0}, "site", ["llm.K site"]),
    ("llm.hidden", "llm.2", {"layer": True}, "layer", ["an integer"]),
    ("llm.hidden", "llm.2", {"layer": 1, "queries": "last"}, "queries", ["no argument 'queries'", "its arguments: layer"]),
    ("vision.hidden", "vision", {"layer": "-2"}, "layer", ["an integer"]),
    ("vision.attention_received", "vision", {"layer": 1, "order": "column"}, "order", ["'raster' or 'window'"]),
    ("vision.hidden", "llm.x", {"layer": 1}, "site", ["unknown site", "'llm.K'"]),
    ("external", "vision", {}, "name", ["needs argument 'name'"]),
    ("vision.nope", "vision", {}, None, ["unknown signal kind", "vision.hidden"]),
])
def test_bad_requests_name_the_argument_and_the_valid_values(kind, site, args, arg, words):
    with pytest.raises(SignalError) as info:
        SignalRequest.make(kind, site, **args)
    assert info.value.arg == arg
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("geom", [LLAVA_15, QWEN25_VL, ModelGeometry("small", (3, 4), 4, llm_heads=2, vision_heads=3,
                                                                       has_cls=False, text_after=5)],
                         ids=lambda g: g.name)
@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_synthetic_signals_have_the_documented_shape(kind, geom):
    site, args = EXAMPLES[kind]
    req = SignalRequest.make(kind, site, **args)
    present = 7
    gen = torch.Generator().manual_seed(0)
    x = req.synthetic(geom, present, lambda *s: torch.rand(*s, generator=gen))
    sizes = {"n": geom.n_visual, "d_vision": geom.vision_width, "d_llm": geom.llm_width, "d": None,
             "heads": None, "head_dim": geom.vision_head_dim, "cls": int(geom.has_cls), "n_present": present,
             "t": geom.text_after, "q": 3, "2": 2, "chunks": 1}
    dims = [d.strip() for d in KINDS[kind].SHAPE.split(" or ")[0].split(")")[0].strip("()").split(",") if d.strip()]
    assert x.dim() == len(dims), (kind, x.shape, dims)
    for size, dim in zip(x.shape, dims, strict=True):
        want = eval(dim, {}, {k: v for k, v in sizes.items() if v is not None}) if not any(
            sizes.get(w, 0) is None for w in re.findall(r"[a-z_]+", dim)) else None
        if want is not None:
            assert size == want, (kind, dim, x.shape)


def test_synthetic_queries_rows_follow_the_prompt():
    geom = ModelGeometry("g", (2, 2), 4, text_after=2)
    rows = {q: SignalRequest.make("llm.attention", "llm.1", layer=0, queries=q).synthetic(geom, 4, torch.rand).shape[1]
            for q in ("last", "last:5", "text")}
    assert rows == {"last": 1, "last:5": 2, "text": 2}  # last:N is at most the tokens after the image


def test_synthetic_reader_uses_the_request():
    pipe = load_text("""
name: s
nodes:
  - {name: a, type: scorer.llm-attention, params: {layer: 1, queries: "last:4"}}
  - {name: k, type: selector.top-k, params: {k: 8}, inputs: {scores: a.scores}}
  - {name: apply, type: applier.keep, params: {site: llm.2}, inputs: {selection: k.selection}}
""")
    ex = Executor(pipe)
    state = ex.start([Geometry(LLAVA_15.grid, image_start=LLAVA_15.image_start)])
    reader = SyntheticSignals(LLAVA_15, state)
    (req,) = ex.requests()
    assert reader(req, 0).shape == (LLAVA_15.llm_heads, 4, LLAVA_15.n_visual)


# --- at load time --------------------------------------------------------------------------------
class AskParams(NodeParams):
    kind: str
    site: str = "vision"
    layer: int | None = None
    args: dict = {}


class Ask(Node):
    """Requests one signal made from its params (a plug-in node may ask for anything)."""

    type_name = "scorer.test-signal-ask"
    family = "scorer"
    outputs = {"scores": Port(Scores)}
    Params = AskParams

    def site(self):
        return Site(self.params.site)

    def requests(self):
        p = self.params
        extra = {"layer": p.layer} if p.layer is not None else {}
        return [SignalRequest.make(p.kind, p.site, **extra, **p.args)]

    def run(self, ctx):  # never reached: these pipelines do not load
        raise AssertionError


@pytest.fixture(autouse=True, scope="module")
def _ask_node():
    registry.register(Ask)
    yield
    registry._REGISTRY.pop(Ask.type_name, None)


def _load_problems(params: str):
    text = f"""
name: asks
nodes:
  - name: a
    type: scorer.test-signal-ask
    params: {params}
  - {{name: k, type: selector.top-k, params: {{k: 8}}, inputs: {{scores: a.scores}}}}
"""
    with pytest.raises(PipelineError) as info:
        load_text(text, "asks.yaml")
    return info.value.problems


def test_a_bad_argument_is_one_problem_at_load_naming_node_and_field():
    (p,) = _load_problems("{kind: llm.attention, site: llm.2, layer: 1, args: {queries: 'last:0'}}")
    assert (p.file, p.node, p.field, p.line) == ("asks.yaml", "a", "params", 4)
    assert "queries must be 'last', 'last:N' (N >= 1) or 'text', got 'last:0'" in p.message


def test_a_layer_past_the_site_points_at_the_layer_param_with_a_hint():
    (p,) = _load_problems("{kind: llm.hidden, site: llm.2, layer: 5}")
    assert (p.node, p.field) == ("a", "params.layer")
    assert "layer must be in 0..2, got 5" in p.message and "lower the layer" in p.message


def test_an_unknown_kind_is_a_problem_not_a_traceback():
    (p,) = _load_problems("{kind: vision.everything}")
    assert p.node == "a" and "unknown signal kind 'vision.everything'" in p.message


def test_a_good_request_loads():
    pipe = load_text("""
name: ok
nodes:
  - {name: a, type: scorer.test-signal-ask, params: {kind: llm.attention, site: llm.2, layer: 1, args: {queries: text}}}
  - {name: k, type: selector.top-k, params: {k: 8}, inputs: {scores: a.scores}}
""")
    (req,) = Executor(pipe).requests()
    assert isinstance(req, LLMAttention) and req.queries == Queries("text")
