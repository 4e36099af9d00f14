"""A node type defined outside the package registers through the `nuwa_graph.nodes` entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from nuwa_graph import load_text, registry

PLUGIN = '''
"""A third-party node package (written by the test)."""
import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.types import Scores, Selection


class EveryNthParams(NodeParams):
    n: int = Field(2, ge=1, description="keep every n-th scored token")


@register
class EveryNth(Node):
    """Keep every n-th token of the scored ones (a toy plug-in)."""

    type_name = "selector.every-nth-plugin"
    family = "selector"
    inputs = {"scores": Port(Scores)}
    outputs = {"selection": Port(Selection)}
    Params = EveryNthParams

    def run(self, ctx, scores):
        return {"selection": Selection(scores.ids[:: self.params.n].clone())}


class Flat(Node):
    """Registered by the entry point naming the class itself (no decorator)."""

    type_name = "scorer.flat-plugin"
    family = "scorer"
    outputs = {"scores": Port(Scores)}

    def run(self, ctx):
        return {"scores": Scores(torch.ones(ctx.present.numel()), ctx.present.clone())}
'''


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """An installed-looking distribution on sys.path: a package and its .dist-info."""
    registry.ensure_loaded()  # the real registry loads before the plug-in is on sys.path
    pkg = tmp_path / "nuwa_toy_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN)
    info = tmp_path / "nuwa_toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nuwa-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [nuwa_graph.nodes]
        toy = nuwa_toy_plugin
        flat = nuwa_toy_plugin:Flat
        broken = nuwa_toy_plugin_missing.nodes
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    # a registry copy for this test only, marked "not loaded" so that the entry points are read again
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_load_errors", [])
    monkeypatch.setattr(registry, "_loaded", False)
    yield
    sys.modules.pop("nuwa_toy_plugin", None)


def test_entry_point_node_types_register(plugin_dist):
    types = registry.all_types()
    assert "selector.every-nth-plugin" in types and "scorer.flat-plugin" in types
    assert types["selector.every-nth-plugin"].__module__ == "nuwa_toy_plugin"
    assert "selector.top-k" in types  # built-ins are still there
    # a broken plug-in is reported, and hides nothing
    (err,) = registry.load_errors()
    assert "broken" in err and "nuwa_toy_plugin_missing" in err


def test_pipeline_with_plugin_nodes_validates_and_runs(plugin_dist):
    import torch

    from nuwa_graph import Executor
    from nuwa_graph.types import Geometry

    p = load_text("""
name: plugin
nodes:
  - {name: flat, type: scorer.flat-plugin}
  - {name: nth, type: selector.every-nth-plugin, params: {n: 3}, inputs: {scores: flat.scores}}
""")
    state = Executor(p).run_all([Geometry((3, 3))])
    assert state.values[("nth", "selection")][0].ids.tolist() == [0, 3, 6]
    with pytest.raises(Exception, match="greater than or equal to 1"):
        load_text("name: x\nnodes:\n  - {name: nth, type: selector.every-nth-plugin, params: {n: 0}, "
                  "inputs: {scores: f.scores}}\n  - {name: f, type: scorer.flat-plugin}\n")
    assert torch.equal(state.present[0], torch.arange(9))


def test_without_the_plugin_the_type_is_unknown():
    assert "selector.every-nth-plugin" not in registry.all_types()
