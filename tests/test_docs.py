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
