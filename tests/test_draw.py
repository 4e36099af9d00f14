"""Drawings: mermaid and dot text contain every node, every edge and every site."""

from __future__ import annotations

import re

import pytest

from nuwa_graph import draw, load


@pytest.fixture
def sample(sample_path):
    return load(sample_path)


def _edge_labels(p):
    return [f"{out} -> {port} : {p.nodes[src].outputs[out].type.type_name()}" for src, out, dst, port in p.edges]


def test_mermaid_has_every_node_edge_and_site(sample):
    text = draw.to_mermaid(sample)
    assert text.splitlines()[3] == "flowchart LR"
    ids = {}
    for name, node in sample.nodes.items():
        m = re.search(r"^\s*(n\d+)\[\"<b>" + re.escape(name) + r"</b><br/>" + re.escape(node.type_name), text, re.M)
        assert m, f"node {name} missing"
        ids[name] = m.group(1)
        if node.summary():
            assert node.summary() in text
    assert len(set(ids.values())) == len(ids)
    for (src, _out, dst, _port), label in zip(sample.edges, _edge_labels(sample)):
        assert f'{ids[src]} -->|"{label}"| {ids[dst]}' in text
    assert text.count("-->") == len(sample.edges) == 9
    # one subgraph per site, in stream order
    sites = re.findall(r'subgraph site\d+\["site ([^"]+)"\]', text)
    assert sites == ["vision", "pre_llm", "llm.2"]
    assert text.count("\n    end") == 3


def test_dot_has_every_node_edge_and_cluster(sample):
    text = draw.to_dot(sample)
    assert text.startswith('digraph "sample" {') and text.rstrip().endswith("}")
    ids = {}
    for name, node in sample.nodes.items():
        m = re.search(r"^\s*(n\d+) \[label=\"" + re.escape(f"{name}\\n{node.type_name}"), text, re.M)
        assert m, f"node {name} missing"
        ids[name] = m.group(1)
    for (src, _out, dst, _port), label in zip(sample.edges, _edge_labels(sample)):
        assert f'{ids[src]} -> {ids[dst]} [label="{label}"];' in text
    assert len(re.findall(r"^\s*n\d+ -> n\d+", text, re.M)) == len(sample.edges)
    assert re.findall(r'label="site ([^"]+)"', text) == ["vision", "pre_llm", "llm.2"]
    # each node sits in the cluster of its site
    for block in re.findall(r"subgraph cluster_\d+ \{(.*?)\n    \}", text, re.S):
        site = re.search(r'label="site ([^"]+)"', block).group(1)
        for name, nid in ids.items():
            if f"    {nid} [" in block:
                assert sample.sites[name].name == site


def test_quotes_are_escaped(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text('name: say "hi"\nnodes:\n  - {name: s, type: scorer.external, params: {name: "a\\"b"}}\n')
    p = load(path)
    assert 'digraph "say \\"hi\\"" {' in draw.to_dot(p)
    assert 'name=a#quot;b' in draw.to_mermaid(p)


def test_images_need_graphviz(sample, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    for fmt in ("svg", "png"):
        with pytest.raises(draw.DrawError) as info:
            draw.draw(sample, fmt)
        msg = str(info.value)
        assert "apt-get install graphviz" in msg and "mermaid" in msg
    assert draw.draw(sample, "mermaid") == draw.to_mermaid(sample)
    assert draw.draw(sample, "dot") == draw.to_dot(sample)
    with pytest.raises(draw.DrawError, match="unknown drawing format"):
        draw.draw(sample, "gif")


@pytest.mark.skipif(not draw.graphviz_available(), reason="Graphviz 'dot' is not installed")
def test_svg_with_graphviz(sample):
    svg = draw.draw(sample, "svg")
    assert "<svg" in svg and "prune_late" in svg
    assert draw.draw(sample, "png")[:4] == b"\x89PNG"


def test_boxes_say_how_a_node_runs_when_not_once_per_image(tmp_path):
    """Nüwa's vision scorer runs per crop and its spatial nodes per part; a plain top-k per image
    says nothing; a file's `per:` is shown even where it is the default; appliers say nothing."""
    from nuwa_graph.resources import shipped_pipeline

    lines = {name: draw.box_lines(p, name)[1] for p in [load(shipped_pipeline("nuwa"))] for name in p.nodes}
    assert lines["salience"] == "scorer.cls-attention · per crop"
    assert lines["cells"] == "region.grid-cells · per part"
    assert lines["align"] == "selector.top-k"
    assert lines["stage1"] == "applier.keep"
    fastv = load(shipped_pipeline("fastv"))
    per_prompt = [n for n in fastv.nodes if draw.box_lines(fastv, n)[1].endswith("· per prompt")]
    assert per_prompt, "FastV's top-k over every image of a prompt (per: prompt) is not shown"
