"""`nuwa-graph report`: the self-contained HTML page of an eval, checked as text and rendered in a
real headless Chromium (Debian's `chromium`; .ci/run installs it). The browser test skips only
where Chromium is missing AND the CI variable is unset; in CI a missing browser fails it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nuwa_graph.apps.cli import app
from nuwa_graph.apps.evaluate import (
    evaluate,
    load_data,
    plan_runs,
    sample_data,
    with_difficulty_filter,
    with_question_agnostic,
    with_vanilla,
    write_results,
)
from nuwa_graph.apps.report_html import render
from nuwa_graph.apps.report_svg import pareto

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
# what Debian's chromium needs to start headless here without network noise (docs/evaluation.md)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_llava):
    """A small real eval on the tiny model: two budgets, the downsample filter, a question-agnostic
    twin and a dialog file, so every section of the page has content."""
    out = tmp_path_factory.mktemp("report")
    paths = sample_data(out / "data", n_images=3, seed=5, n_turns=2)
    tasks = load_data([str(p) for p in paths])
    runs, _ = with_vanilla(plan_runs([PIPELINES / "fastv.yaml"], {"budget": [128, 192]}))
    runs = with_question_agnostic(with_difficulty_filter(runs, "downsample"))
    dialog = [t for t in tasks if t.kind == "dialog"]
    single = [t for t in tasks if t.kind != "dialog"]
    res = evaluate(tiny_llava, runs, single, batch=3, max_new_tokens=3, warmup=False, difficulty="downsample")
    write_results(res, out / "ev")
    res_d = evaluate(tiny_llava, plan_runs([PIPELINES / "vanilla.yaml", PIPELINES / "fastv.yaml"],
                                           {"budget": [128]}), dialog, batch=3, max_new_tokens=3, warmup=False)
    write_results(res_d, out / "dialog")
    return out, res, res_d


def test_pareto_frontier():
    assert pareto([(1, 10), (2, 5), (2, 30), (3, 20), (4, 40), (0.5, 1)]) == [(0.5, 1), (1, 10), (2, 30), (4, 40)]


def test_the_page_holds_every_section_and_fetches_nothing(evaluated):
    out, res, res_d = evaluated
    html = render(res, "results.json")
    assert html.count('<svg class="plot"') == 4  # grounding and VQA: vs budget and vs FLOPs
    assert html.count('class="frontier"') == 4 and 'class="frontier-point"' in html  # one per plot
    for section in ("Accuracy, % of vanilla and loyalty", "Hard samples", "Costs", "Kept tokens"):
        assert f"<h2>{section}</h2>" in html
    assert "question-agnostic" in html and "by construction" in html and "fastv budget=128 (question-agnostic)" in html
    assert html.count("data:image/png;base64,") == sum(max(1, len(r.get("sample_kept") or {})) for r in res["results"])
    # nothing is fetched: no URL in any src/href, no CSS import or url()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "@import" not in html and "url(" not in html and "<link" not in html
    dialog = render(res_d)
    assert "<h2>Multi-turn</h2>" in dialog and "dialog:reuse" in dialog and "turn 2 %" in dialog


def test_cli_report_writes_the_page_and_refuses_other_files(evaluated, tmp_path):
    out, res, _ = evaluated
    r = CliRunner().invoke(app, ["report", str(out / "ev"), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 1 and "not an eval results file" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 1 and "cannot be read" in r.output
    r = CliRunner().invoke(app, ["report", str(out / "ev" / "results.json"), "-o", str(out / "ev" / "results.json")])
    assert r.exit_code == 2  # the output may not be the input


@pytest.fixture
def chromium() -> str:
    """Debian's chromium (checked before the eval fixture runs)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: .ci/run installs Debian's chromium "
                        "(apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test")
    return found


def test_the_page_renders_in_a_real_browser(chromium, evaluated, tmp_path):
    """Chromium lays out the plots, decodes every picture and builds the tables (the page's own
    check script writes what it found into #render-check, read from the DOM after load), and a
    screenshot of the page is not blank."""
    out, res, _ = evaluated
    page = tmp_path / "report.html"
    r = CliRunner().invoke(app, ["report", str(out / "ev"), "-o", str(page)])
    assert r.exit_code == 0, r.output
    profile = tmp_path / "profile"
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(base + ["--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<pre id="render-check"[^>]*>([^<]+)</pre>', dom.stdout)
    assert m, "the check script did not run: " + dom.stdout[:500]
    seen = json.loads(m.group(1))
    runs = len(res["results"])
    assert seen["plots"] == 4 and seen["points"] >= 2 * runs
    assert seen["images_total"] > 0 and seen["images"] == seen["images_total"]  # every base64 picture decoded
    assert seen["tables"] >= 3 and seen["table_rows"] >= 2 * runs
    shot = tmp_path / "shot.png"
    s = subprocess.run(base + ["--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and shot.is_file(), s.stderr[-2000:]
    from PIL import Image, ImageStat

    with Image.open(shot) as im:
        top = im.convert("L").crop((0, 0, 1280, 1000))
        assert ImageStat.Stat(top).stddev[0] > 10  # plots and text drawn, not an empty page
