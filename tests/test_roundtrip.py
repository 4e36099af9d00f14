"""load -> dumps -> load_text gives the same pipeline; --set overrides apply and are validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nuwa_graph import PipelineError, load, load_text

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "pipelines").rglob("*.yaml")) + [Path(__file__).parent / "data" / "sample.yaml"]


def _same(a, b) -> None:
    assert a.dump() == b.dump()
    assert a.order() == b.order()
    assert a.edges == b.edges
    assert {n: s.name for n, s in a.sites.items()} == {n: s.name for n, s in b.sites.items()}
    assert {n: node.params for n, node in a.nodes.items()} == {n: node.params for n, node in b.nodes.items()}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_load_dump_load(path):
    first = load(path)
    text = first.dumps()
    second = load_text(text, source=f"{path.name} (dumped)")
    _same(first, second)
    assert second.dumps() == text  # dumping is stable
    assert yaml.safe_load(text)["name"] == first.name


def test_dump_keeps_expressions_and_variables(sample_path):
    p = load(sample_path)
    data = p.dump()
    assert data["variables"] == {"budget": 16, "cell": 2}
    best = next(n for n in data["nodes"] if n["name"] == "best")
    assert best["params"]["k"] == "${budget}"  # the expression, not its value
    assert p.nodes["best"].params.k == 16


def test_overrides_apply_and_survive_a_round_trip(sample_path):
    p = load(sample_path, {"budget": 24, "cell": 3})
    assert p.nodes["best"].params.k == 24
    assert p.nodes["cells"].params.cell == 3
    again = load_text(p.dumps())
    assert again.nodes["best"].params.k == 24 and again.variables["cell"] == 3
    _same(p, again)


def test_override_string_parsed_like_the_cli(sample_path):
    from nuwa_graph.pipeline import parse_override

    name, value = parse_override("budget=20")
    assert load(sample_path, {name: value}).nodes["best"].params.k == 20


def test_overrides_are_validated(sample_path):
    with pytest.raises(PipelineError) as info:
        load(sample_path, {"budget": -1, "nope": 2})
    fields = {(p.node, p.field) for p in info.value.problems}
    assert ("best", "params.k") in fields and (None, "variables.nope") in fields


def test_expression_language():
    text = """
name: expr
variables: {budget: 64, table: {64: 3, 128: 5}}
nodes:
  - {name: s, type: scorer.external, params: {name: "s_${budget}"}}
  - {name: k, type: selector.top-k, params: {k: "${max(1, budget // 4) + table[budget]}"}, inputs: {scores: s.scores}}
  - {name: g, type: selector.uniform-grid, params: {stride: "${2 if budget < 100 else 1}"}}
"""
    p = load_text(text)
    assert p.nodes["s"].params.name == "s_64"
    assert p.nodes["k"].params.k == 16 + 3
    assert p.nodes["g"].params.stride == 2
    assert load_text(text, overrides={"budget": 128}).nodes["k"].params.k == 32 + 5
    with pytest.raises(PipelineError, match="not in the table"):
        load_text(text, overrides={"budget": 96})


def test_readme_tour_is_a_valid_pipeline():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", readme, re.S)
    assert block, "README.md has no yaml tour"
    p = load_text(block.group(1), "README.md tour")
    assert load_text(p.dumps()).dump() == p.dump()
