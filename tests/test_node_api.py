"""The node API: ports from run(), typed params, the shared site field, budget errors as data,
mergers fed by signal nodes."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated

import pytest
import torch
from pydantic import ValidationError

from nuwa_graph import Executor, load_text, registry
from nuwa_graph.apps.runner import _explain
from nuwa_graph.context import SampleContext
from nuwa_graph.errors import BudgetError, RunError
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.sites import LLMSiteName, SiteName
from nuwa_graph.types import Geometry, Scores, Selection, Tokens

BEFORE = json.loads((Path(__file__).parent / "data/node_ports_before.json").read_text())
"""Every built-in node type's ports as declared by `inputs = {...}` before ports were derived
from run() (recorded from the registry at d6d9f03): name -> family, params class, ports."""

# The one deliberate change: mergers receive the model tensors they merge on ports from signal
# nodes instead of reading them (issue 11); their other ports are as before.
NEW_MERGER_INPUTS = {
    "merger.visionzip": {"features": ["Tokens", False, False], "keys": ["Tokens", False, False],
                         "cls": ["Tokens", True, False]},
    "merger.prumerge": {"features": ["Tokens", False, False], "keys": ["Tokens", False, False]},
    "merger.sparsevlm-recycle": {"hidden": ["Tokens", False, False]},
}
NEW_SIGNAL_NODES = {"signal.vision-key-mean", "signal.vision-key-single-head", "signal.vision-cls-hidden",
                    "signal.llm-hidden",
                    "merger.stitch-crops"}  # issue 23: per-crop rows into one block


def _table(ports: dict[str, Port]) -> dict[str, list]:
    return {name: [p.type.__name__, p.doc, p.optional, p.many] for name, p in ports.items()}


# --- 1. ports from run() ------------------------------------------------------------------------
def _builtins() -> dict[str, type[Node]]:
    """The node library's types (tests and plug-ins may register others)."""
    return {n: c for n, c in registry.all_types().items() if c.__module__.startswith("nuwa_graph.nodes.")}


def test_derived_ports_equal_the_declared_ones_of_before():
    now = _builtins()
    assert set(now) == set(BEFORE) | NEW_SIGNAL_NODES
    for name, before in BEFORE.items():
        cls = now[name]
        inputs = _table(cls.inputs)
        for port, (t, optional, many) in NEW_MERGER_INPUTS.get(name, {}).items():
            got = inputs.pop(port)
            assert got[0] == t and got[2:] == [optional, many] and got[1], (name, port)
        assert inputs == before["inputs"], name  # type, doc, optional, many and order
        assert list(inputs) == list(before["inputs"]), name
        assert _table(cls.outputs) == before["outputs"], name
        assert cls.family == before["family"], name
        assert cls.Params.__name__ == before["params"], name


def test_no_builtin_node_declares_inputs_family_or_params():
    for name, cls in _builtins().items():
        src = Path(inspect.getfile(cls)).read_text()
        assert "    inputs = {" not in src and "    family = " not in src and "    Params = " not in src, name


def _node_class(run, **attrs):
    body = {"type_name": "selector.api-test", "outputs": {"selection": Port(Selection)}, "run": run, **attrs}
    return type("ApiTest", (Node,), body)


def test_run_signature_declares_the_ports():
    def run(self, ctx, scores: Annotated[Scores, "the scores"], extra: Annotated[Selection | None, "opt"] = None,
            many: list[Selection] | None = None):
        return {}

    cls = _node_class(run)
    assert cls.inputs == {"scores": Port(Scores, "the scores"), "extra": Port(Selection, "opt", optional=True),
                          "many": Port(Selection, "", optional=True, many=True)}
    assert cls.family == "selector"


def test_declared_inputs_must_agree_with_run():
    def run(self, ctx, scores: Scores):
        return {}

    _node_class(run, inputs={"scores": Port(Scores, "doc")})  # agrees: fine
    with pytest.raises(TypeError, match=r"input 'scores' is Selection in `inputs` but Scores in run\(\)"):
        _node_class(run, inputs={"scores": Port(Selection)})
    with pytest.raises(TypeError, match=r"`inputs` names \['other'\] but run\(\) takes \['scores'\]"):
        _node_class(run, inputs={"other": Port(Scores)})
    with pytest.raises(TypeError, match="in `inputs` but Scores\\? in run"):
        def run_opt(self, ctx, scores: Scores | None = None):
            return {}
        _node_class(run_opt, inputs={"scores": Port(Scores)})

    def untyped(self, ctx, scores):  # a plug-in of before: unannotated run, declared inputs
        return {}

    assert _node_class(untyped, inputs={"scores": Port(Scores)}).inputs == {"scores": Port(Scores)}

    def kwargs(self, ctx, **inputs):
        return {}

    assert _node_class(kwargs, inputs={"a": Port(Scores)}).inputs == {"a": Port(Scores)}


@pytest.mark.parametrize("sig, match", [
    ("def run(self, ctx, scores): return {}", "annotate every input with its port type"),
    ("def run(self, ctx, k: int): return {}", "input 'k' is annotated <class 'int'>, not a port type"),
    ("def run(self, ctx, s: Scores | Selection): return {}", "one port type per input"),
    ("def run(self, ctx, s: Scores | None): return {}", "optional only as `X | None = None`"),
    ("def run(self, ctx, s: Scores = None): return {}", "optional only as `X | None = None`"),
])
def test_bad_run_signatures_are_clear_type_errors(sig, match):
    space: dict = {"Scores": Scores, "Selection": Selection}
    exec(sig, space)
    with pytest.raises(TypeError, match=match):
        _node_class(space["run"])


# --- 2. typed params ------------------------------------------------------------------------------
def test_params_come_from_the_type_argument():
    class KParams(NodeParams):
        k: int

    class WithK(Node[KParams]):
        type_name = "selector.k-test"
        outputs = {"selection": Port(Selection)}

        def run(self, ctx):
            return {}

    assert WithK.Params is KParams and WithK.family == "selector"
    node = WithK("n", {"k": 3})
    assert isinstance(node.params, KParams) and node.params.k == 3
    with pytest.raises(ValidationError):
        WithK("n", {"k": 3, "extra": 1})
    top_k = registry.get("selector.top-k")
    assert top_k.Params.__name__ == "TopKParams" and top_k("t", {"k": 2}).params.k == 2


# --- 3. one shared site field --------------------------------------------------------------------
SITE_NODES = {  # node type -> (other params, field type)
    "applier.keep": ({}, SiteName),
    "scorer.external": ({"name": "x"}, SiteName),
    "scorer.llm-attention": ({"layer": 0}, LLMSiteName),
    "scorer.sparsevlm-raters": ({"layer": 0}, LLMSiteName),
    "merger.sparsevlm-recycle": ({}, LLMSiteName),
    "signal.llm-hidden": ({}, LLMSiteName),
}


@pytest.mark.parametrize("type_name", sorted(SITE_NODES))
def test_site_params_share_one_field(type_name):
    extra, kind = SITE_NODES[type_name]
    cls = registry.get(type_name)
    field = cls.Params.model_fields["site"]
    # the shared validator, no per-node copy (a required site, or an optional one)
    assert field.metadata == list(kind.__metadata__) or field.annotation == (kind | None)
    with pytest.raises(ValidationError, match=r"unknown site 'llm\.x'; valid: 'vision', 'pre_llm' or 'llm\.K'"):
        cls("n", {**extra, "site": "llm.x"})
    if kind is LLMSiteName:
        with pytest.raises(ValidationError, match=r"site must be an LLM site 'llm\.K', got 'vision'"):
            cls("n", {**extra, "site": "vision"})
    assert cls("n", {**extra, "site": "llm.3"}).params.site == "llm.3"


def test_every_site_param_uses_the_shared_field():
    for name, cls in _builtins().items():
        f = cls.Params.model_fields.get("site")
        if f is not None:
            assert name in SITE_NODES, f"{name} has a site param outside the shared field"


# --- 5. budget errors as data --------------------------------------------------------------------
def _ctx(n=36):
    return SampleContext(sample=0, geometry=Geometry((6, 6)), present=torch.arange(n))


@pytest.mark.parametrize("type_name, params, message", [
    ("selector.top-k", {"k": 40}, "k=40 is larger than the 36 tokens present; lower the budget (at most 36) or set "
                                  "clamp: true"),
    ("selector.top-k-int", {"k": 40}, "k=40 is larger than the 36 tokens present; lower the budget (at most 36)"),
    ("selector.uniform-count", {"k": 40}, "k=40 is larger than the 36 tokens of the grid; lower the budget"),
    ("random-dropper.uniform", {"keep": 40}, "keep=40 is larger than the 36 candidates"),
])
def test_budget_errors_carry_the_limit(type_name, params, message):
    node = registry.get(type_name)("n", params)
    inputs = {"scores": Scores(torch.rand(36), torch.arange(36))} if "scores" in node.inputs else {}
    with pytest.raises(BudgetError) as info:
        node.run(_ctx(), **inputs)
    err = info.value
    assert str(err) == message and isinstance(err, ValueError) and isinstance(err, RunError)
    assert (err.asked, err.limit, err.node) == (40, 36, None)


def test_the_executor_names_the_node_and_the_hint_reads_it():
    p = load_text("""
name: big
variables: {budget: 50}
nodes:
  - {name: s, type: scorer.external, params: {name: s}}
  - {name: greedy, type: selector.top-k, params: {k: "${budget}"}, inputs: {scores: s.scores}}
""")
    with pytest.raises(BudgetError) as info:
        Executor(p).run_all([Geometry((6, 6))], {"external(name=s)": torch.rand(36)})
    err = info.value
    assert (err.node, err.asked, err.limit) == ("greedy", 50, 36)
    assert str(err).startswith("node 'greedy' (selector.top-k) failed on sample 0 at site vision: BudgetError: "
                               "k=50 is larger than the 36 tokens present")
    hint = _explain(err, p).splitlines()[-1]
    assert hint == ("hint: the budget is larger than the visual tokens present; lower 'budget' (now budget=50) "
                    "(at most 36), e.g. --set budget=<smaller>")
    # an error that merely mentions the words gets no budget hint
    assert _explain(RunError("x is larger than the 3 things")) == "x is larger than the 3 things"


# --- 4. mergers receive model tensors on ports ----------------------------------------------------
def test_mergers_read_no_model_tensor():
    for name, cls in _builtins().items():
        if cls.family != "merger":
            continue
        for params in ({"contextual": 2}, {}, {"site": "llm.2"}):
            try:
                node = cls("m", params)
            except ValidationError:
                continue
            assert [r.kind for r in node.requests()] in ([], ["external"]), name


def test_visionzip_merges_plain_tensors():
    """No model, no signal reader: the merge runs on Tokens handed in on its ports."""
    n, d = 36, 5
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(n)
    feats, keys = Tokens(torch.randn(n, d, generator=g), grid), Tokens(torch.randn(n, 4, generator=g), grid)
    cls = Tokens(torch.randn(1, d, generator=g), torch.tensor([-1]))
    node = registry.get("merger.visionzip")("zip", {"contextual": 3})
    out = node.run(_ctx(), dominant=Selection(torch.tensor([7, 2, 30])), features=feats, keys=keys, cls=cls)
    assert out["selection"].ids[:4].tolist() == [-1, 2, 7, 30]
    assert torch.equal(out["tokens"].values[0], cls.values[0]) and torch.equal(out["tokens"].values[1], feats.values[2])
    no_cls = node.run(_ctx(), dominant=Selection(torch.tensor([7, 2, 30])), features=feats, keys=keys)
    assert torch.equal(no_cls["tokens"].values, out["tokens"].values[1:])
    with pytest.raises(ValueError, match="keys must cover the 36 tokens of the grid"):
        node.run(_ctx(), dominant=Selection(torch.tensor([1])), features=feats, keys=Tokens(keys.values[:5], grid[:5]))
