"""Errors as data: a budget error carries the node, the site, what was asked and the limit."""

from __future__ import annotations

import pytest
import torch

from nuwa_graph import load_text, registry
from nuwa_graph.errors import BudgetError, RunError
from nuwa_graph.executor import Executor
from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.types import Geometry, Selection


class GreedyParams(NodeParams):
    k: int


class Greedy(Node):
    """Takes the first k tokens present, or raises a BudgetError when there are fewer."""

    type_name = "selector.test-greedy-budget"
    family = "selector"
    inputs: dict[str, Port] = {}
    outputs = {"selection": Port(Selection)}
    Params = GreedyParams

    def run(self, ctx):
        n = ctx.present.numel()
        if self.params.k > n:
            raise BudgetError(f"k={self.params.k} is larger than the {n} tokens present", self.params.k, n)
        return {"selection": Selection(ctx.present[: self.params.k].clone())}


@pytest.fixture(autouse=True, scope="module")
def _greedy():
    registry.register(Greedy)
    yield
    registry._REGISTRY.pop(Greedy.type_name, None)


def test_budget_error_is_data_and_a_value_and_run_error():
    e = BudgetError("k=9 is larger than the 4 tokens present", 9, 4)
    assert isinstance(e, RunError) and isinstance(e, ValueError)
    assert (e.asked, e.limit, e.param, e.node, e.site) == (9, 4, "k", None, None)
    located = e.at("pick", "vision", "node 'pick': ")
    assert (located.asked, located.limit, located.node, located.site) == (9, 4, "pick", "vision")
    assert str(located) == "node 'pick': k=9 is larger than the 4 tokens present"


def test_the_executor_locates_a_budget_error():
    pipe = load_text("""
name: greedy
nodes:
  - {name: pick, type: selector.test-greedy-budget, params: {k: 50}}
""")
    with pytest.raises(BudgetError) as info:
        Executor(pipe).run_all([Geometry((6, 6))])
    e = info.value
    assert (e.node, e.site, e.asked, e.limit, e.param) == ("pick", "vision", 50, 36, "k")
    assert str(e).startswith("node 'pick' (selector.test-greedy-budget) failed on sample 0 at site vision: BudgetError: ")
    assert str(e).endswith("k=50 is larger than the 36 tokens present")
    ok = Executor(load_text(pipe.dumps().replace("k: 50", "k: 36"))).run_all([Geometry((6, 6))])
    assert ok.values[("pick", "selection")][0].ids.tolist() == torch.arange(36).tolist()
