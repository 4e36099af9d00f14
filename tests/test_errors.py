"""Errors as data: a budget error carries the node, what was asked and the limit."""

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


class Greedy(Node[GreedyParams]):
    """Takes the first k tokens present, or raises a BudgetError when there are fewer."""

    type_name = "selector.test-greedy-budget"
    outputs = {"selection": Port(Selection)}

    def run(self, ctx):
        n = ctx.present.numel()
        if self.params.k > n:
            raise BudgetError(self.params.k, n)
        return {"selection": Selection(ctx.present[: self.params.k].clone())}


@pytest.fixture(autouse=True, scope="module")
def _greedy():
    registry.register(Greedy)
    yield
    registry._REGISTRY.pop(Greedy.type_name, None)


def test_budget_error_is_data_and_a_value_and_run_error():
    e = BudgetError(9, 4)
    assert isinstance(e, RunError) and isinstance(e, ValueError)
    assert (e.asked, e.limit, e.param, e.node) == (9, 4, "k", None)
    assert str(e) == "k=9 is larger than the 4 tokens present"
    located = e.at("pick", "node 'pick'")
    assert (located.asked, located.limit, located.node) == (9, 4, "pick")
    assert str(located) == "node 'pick': BudgetError: k=9 is larger than the 4 tokens present"


def test_the_executor_locates_a_budget_error():
    pipe = load_text("""
name: greedy
nodes:
  - {name: pick, type: selector.test-greedy-budget, params: {k: 50}}
""")
    with pytest.raises(BudgetError) as info:
        Executor(pipe).run_all([Geometry((6, 6))])
    e = info.value
    assert (e.node, e.asked, e.limit, e.param) == ("pick", 50, 36, "k")
    assert str(e).startswith("node 'pick' (selector.test-greedy-budget) failed on sample 0 at site vision: BudgetError: ")
    assert str(e).endswith("k=50 is larger than the 36 tokens present")
    ok = Executor(load_text(pipe.dumps().replace("k: 50", "k: 36"))).run_all([Geometry((6, 6))])
    assert ok.values[("pick", "selection")][0].ids.tolist() == torch.arange(36).tolist()
