"""Layer schedules written for 32 layers, on any depth: the `scale32` rule (docs/pipelines.md).

k -> floor(k * llm_layers / 32 + 0.5), clamped to [lo, hi] (default 1 .. llm_layers - 1),
then a schedule is made strictly increasing inside the bounds; exact on 32 layers.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from nuwa_graph import load
from nuwa_graph.errors import PipelineError
from nuwa_graph.expressions import ExpressionError, evaluate, scale_layers

DEPTHS = (4, 12, 16, 28, 32, 40)

# the shipped 32-layer schedules at each depth: FastV K, PDrop layers, SparseVLM layers (bounds
# 0 .. L-2), FEATHER K
EXPECTED = {
    4: (1, [1, 2, 3], [0, 1, 2], [1, 2]),
    12: (1, [1, 4, 8], [1, 2, 6], [3, 6]),
    16: (1, [1, 5, 10], [1, 3, 8], [4, 8]),
    28: (2, [2, 9, 18], [2, 5, 13], [7, 14]),
    32: (2, [2, 10, 20], [2, 6, 15], [8, 16]),
    40: (3, [3, 13, 25], [3, 8, 19], [10, 20]),
}


@pytest.mark.parametrize("depth", DEPTHS)
def test_shipped_schedules_at_each_depth(depth):
    fastv, pdrop, sparse, feather = EXPECTED[depth]
    assert scale_layers(2, depth) == fastv
    assert scale_layers([2, 10, 20], depth) == pdrop
    assert scale_layers([2, 6, 15], depth, 0, depth - 2) == sparse
    assert scale_layers([8, 16], depth) == feather


@pytest.mark.parametrize("depth", DEPTHS)
def test_rule_properties(depth):
    for sched in ([1], [2], [31], [2, 10, 20], [8, 16, 24], [1, 2, 3], [29, 30, 31], [0, 1], [15, 16]):
        out = scale_layers(sched, depth)
        assert all(1 <= k <= depth - 1 for k in out), (sched, out)  # never an illegal layer
        assert all(a < b for a, b in pairwise(out)), (sched, out)  # stages stay distinct and ordered
        # each entry is the half-up proportional layer unless a bound or an earlier stage moved it
        for k, o in zip(sched, out):
            assert abs(o - k * depth / 32) <= len(sched) + 0.5


def test_exact_on_32_layers():
    for k in range(1, 32):
        assert scale_layers(k, 32) == k
    assert scale_layers([8, 16, 24], 32) == [8, 16, 24]


def test_half_rounds_up_not_to_even():
    assert scale_layers(20, 4) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert scale_layers(4, 40) == 5  # 5.0
    assert scale_layers(12, 12) == 5  # 4.5 -> 5


def test_too_many_stages_is_an_error():
    with pytest.raises(ExpressionError, match="3-stage schedule needs 3 distinct layers"):
        scale_layers([2, 10, 20], 3)


def test_expression_reads_llm_layers():
    used: set[str] = set()
    assert evaluate("scale32([2, 10, 20])", {"llm_layers": 16}, used) == [1, 5, 10]
    assert "llm_layers" in used
    assert evaluate("scale32([2, 6, 15], 0, llm_layers - 2)", {"llm_layers": 4}, set()) == [0, 1, 2]


@pytest.mark.parametrize("depth", DEPTHS)
def test_shipped_files_bind_to_each_depth(depth):
    """The files' defaults follow the rule; a --set value is taken as is."""
    mv = {"llm_layers": depth}
    fastv, pdrop, sparse, feather = EXPECTED[depth]
    assert load("pipelines/fastv.yaml", model_vars=mv).variables["K"] == fastv
    assert load("pipelines/fastv_fix.yaml", model_vars=mv).variables["K"] == fastv
    assert load("pipelines/pdrop.yaml", model_vars=mv).variables["layers"] == pdrop
    assert load("pipelines/sparsevlm.yaml", model_vars=mv).variables["layers"] == sparse
    assert load("pipelines/sparsevlm_v2.yaml", model_vars=mv).variables["layers"] == sparse
    assert load("pipelines/feather.yaml", model_vars=mv).variables["K"] == feather
    pipe = load("pipelines/pdrop.yaml", {"layers": [1, 2, 3]}, mv)
    assert pipe.variables["layers"] == [1, 2, 3] and pipe.schedule()["variables"]["layers"]["from"] == "set, exact"


def test_official_schedule_without_a_model():
    pipe = load("pipelines/pdrop.yaml")  # validate/draw/docs: the LLaVA-1.5 values
    assert pipe.variables["layers"] == [2, 10, 20]
    assert pipe.dump()["variables"]["layers"] == "${scale32([2, 10, 20])}"  # the file, not the value


def test_a_schedule_that_cannot_fit_names_the_variable():
    with pytest.raises(PipelineError, match=r"variables.layers.*--set layers="):
        load("pipelines/pdrop.yaml", model_vars={"llm_layers": 3})
