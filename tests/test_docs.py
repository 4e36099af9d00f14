"""Generated docs stay in step with the code: the node list and docs/methods.md."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_methods_doc_is_up_to_date():
    res = subprocess.run([sys.executable, "scripts/gen_methods_doc.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_readme_node_list_is_up_to_date():
    res = subprocess.run([sys.executable, "scripts/gen_node_list.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_families_page_lists_what_each_model_refuses():
    """docs/families.md's table of refused files = what each preset refuses (the shipped files
    its `runnable_shipped` leaves out); every preset is in the table."""
    import re

    from nuwa_graph.adapters import PRESETS, load_adapter
    from nuwa_graph.resources import shipped_names

    text = (ROOT / "docs/families.md").read_text(encoding="utf-8")
    block = text.split("<!-- families:refused:start -->")[1].split("<!-- families:refused:end -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.strip().splitlines()[2:]]
    listed, previous = {}, set()
    for model, files, _ in rows:
        previous = previous if files == "the same" else (set() if files == "none" else set(re.split(r",\s*", files)))
        listed[model] = previous
    assert set(listed) == set(PRESETS)
    for model, refused in listed.items():
        adapter = load_adapter(model)
        runs = {name for name, _ in adapter.runnable_shipped()}
        assert refused == set(shipped_names()) - runs, model
