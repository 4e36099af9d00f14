"""The `nuwa-graph` command line, through typer's CliRunner."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from nuwa_graph import registry
from nuwa_graph.apps import cli

runner = CliRunner()

BAD = """
name: bad
nodes:
  - name: pick
    type: selector.topk
    params: {k: 3}
  - name: grid
    type: selector.uniform-grid
    params: {stride: 0}
"""


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def test_validate_ok(sample_path):
    r = invoke("validate", sample_path)
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "sample.yaml" in r.output


def test_validate_reports_all_problems_and_fails(sample_path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    r = invoke("validate", sample_path, bad)
    assert r.exit_code == 1
    assert "OK" in r.output  # the good file is still reported
    assert "did you mean 'selector.top-k'" in r.output
    assert "node 'grid'" in r.output and "params.stride" in r.output
    assert "Traceback" not in r.output


def test_validate_set(sample_path):
    assert invoke("validate", sample_path, "--set", "budget=8").exit_code == 0
    r = invoke("validate", sample_path, "--set", "budget=-2")
    assert r.exit_code == 1 and "params.k" in r.output
    r = invoke("validate", sample_path, "--set", "budgte=2")
    assert r.exit_code == 1 and "no such variable" in r.output
    r = invoke("validate", sample_path, "--set", "budget")
    assert r.exit_code == 2 and "NAME=VALUE" in r.output and "Traceback" not in r.output


def test_validate_missing_file(tmp_path):
    r = invoke("validate", tmp_path / "nope.yaml")
    assert r.exit_code == 1 and "no such file" in r.output


def test_nodes_table():
    r = invoke("nodes")
    assert r.exit_code == 0, r.output
    for name in registry.all_types():
        assert name in r.output
    assert "selections: list[Selection]" in r.output and "regions: Regions" in r.output


def test_nodes_type_details():
    r = invoke("nodes", "selector.top-k-per-region")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "Keep the n best tokens of every region" in out  # the docstring
    assert "https://arxiv.org/abs/2602.02951" in out  # the paper
    assert "regions" in out and "Regions" in out and "Scores" in out and "Selection" in out
    assert "candidates kept per region" in out  # a param's doc
    assert '"additionalProperties": false' in out  # the JSON schema
    assert '"title": "TopKPerRegionParams"' in out


def test_nodes_unknown_type():
    r = invoke("nodes", "selector.top-kk")
    assert r.exit_code == 1
    assert "unknown node type 'selector.top-kk'" in r.output and "did you mean 'selector.top-k'" in r.output


@pytest.mark.parametrize("fmt,head", [("mermaid", "flowchart LR"), ("dot", 'digraph "sample"')])
def test_draw(sample_path, tmp_path, fmt, head):
    r = invoke("draw", sample_path, "--format", fmt)
    assert r.exit_code == 0, r.output
    assert head in r.output and "prune_late" in r.output and "selector.top-k-per-region" in r.output
    out = tmp_path / f"d.{fmt}"
    r = invoke("draw", sample_path, "-f", fmt, "-o", out, "--set", "budget=5")
    assert r.exit_code == 0, r.output
    assert head in out.read_text() and "k=5" in out.read_text()


def test_draw_svg_without_graphviz(sample_path, monkeypatch):
    from nuwa_graph import draw

    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    r = invoke("draw", sample_path, "--format", "svg")
    assert r.exit_code == 1
    assert "apt-get install graphviz" in r.output and "Traceback" not in r.output


def test_draw_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    r = invoke("draw", bad)
    assert r.exit_code == 1 and "did you mean" in r.output


def test_run_validates_first(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    r = invoke("run", bad)
    assert r.exit_code == 1 and "did you mean" in r.output


def test_run_passes_options(sample_path, monkeypatch):
    import nuwa_graph.apps.runner as runner_mod

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(runner_mod, "run_command", fake)
    r = invoke("run", sample_path, "--set", "budget=4", "--prompt", "hi", "--max-new-tokens", "3", "--seed", "7",
               "--json")
    assert r.exit_code == 0, r.output
    assert seen["pipeline"].nodes["best"].params.k == 4
    assert seen["prompt"] == "hi" and seen["max_new_tokens"] == 3 and seen["seed"] == 7 and seen["as_json"] is True
    assert seen["model"] is None and seen["image"] is None
    assert set(seen) == {"pipeline", "model", "image", "prompt", "max_new_tokens", "dtype", "device", "seed", "as_json",
                         "attn_implementation", "device_map", "batch"}
    assert seen["attn_implementation"] == "sdpa" and seen["device_map"] is None and seen["batch"] == 1


@pytest.mark.parametrize("command", ["validate", "nodes", "draw", "run"])
def test_help_has_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0
    assert "Example" in r.output and f"nuwa-graph {command}" in r.output


def test_top_level_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0 and "validate" in r.output and "draw" in r.output
    r = invoke("--version")
    assert r.exit_code == 0 and "nuwa-graph" in r.output


def test_train_command_passes_options_to_the_trainer(monkeypatch):
    import nuwa_graph.embedded.train as tr

    seen = {}
    monkeypatch.setattr(tr, "main", lambda argv: seen.setdefault("argv", argv))
    res = CliRunner().invoke(cli.app, ["train", "--seed", "3", "--minutes", "1"])
    assert res.exit_code == 0, res.output
    assert seen["argv"] == ["--seed", "3", "--minutes", "1"]
