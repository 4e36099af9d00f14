"""`nuwa-graph sweep`: value parsing, validation of every combination, one results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nuwa_graph import PipelineError
from nuwa_graph.apps.cli import app
from nuwa_graph.apps.sweep import combinations, load_all, parse_sweep, split_values

ROOT = Path(__file__).resolve().parent.parent


def test_split_and_parse_values():
    assert split_values("18,148, 280") == ["18", "148", "280"]
    assert split_values("[2,10,20],[8,16,24]") == ["[2,10,20]", "[8,16,24]"]
    grid = parse_sweep(["budget=64,128", "layers=[1,2],[2,3]"])
    assert grid == {"budget": [64, 128], "layers": [[1, 2], [2, 3]]}
    assert len(combinations(grid)) == 4
    with pytest.raises(ValueError, match="NAME=V1,V2"):
        parse_sweep(["budget"])


def test_every_combination_is_validated_before_running():
    with pytest.raises(PipelineError) as info:
        load_all(ROOT / "pipelines/nuwa.yaml", {"budget": [64, 100], "distance": [18]})
    text = str(info.value)
    assert "budget=100" in text and "100" in text  # the bad combination is named
    with pytest.raises(PipelineError, match="no such variable"):
        load_all(ROOT / "pipelines/nuwa.yaml", {"nope": [1]})


def test_sweep_cli_writes_one_table(tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(app, ["sweep", str(ROOT / "pipelines/random.yaml"), "--set", "budget=72,144",
                                      "--model", "tiny-llava", "--max-new-tokens", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "res.json").read_text())
    assert [r["budget"] for r in rows] == [72, 144]  # of 576 -> 8, 16 of 64
    assert [r["avg_visual_tokens"] for r in rows] == [8.0, 16.0]
    assert (tmp_path / "res.csv").read_text().splitlines()[0].startswith("budget,")
