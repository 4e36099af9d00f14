"""Where the node library and the shipped pipelines live, installed or in a checkout.

The repository keeps them beside the package, in `nodes/` and `pipelines/`. An installed
package holds them under its own namespace, as `nuwa_graph/nodes` and `nuwa_graph/pipelines`
(pyproject's package-dir), so nothing named `nodes` lands at the top of site-packages.
Importing `nuwa_graph` from a checkout maps `nuwa_graph.nodes` to the `nodes/` folder, so
code and tests use one name in both cases; `resolve_pipeline` is the one place that knows
where the shipped pipeline files are.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent  # the repository root, when running from a checkout
NODES_MODULE = "nuwa_graph.nodes"


def mount_checkout_nodes() -> None:
    """From a checkout, make `nuwa_graph.nodes` the top-level `nodes/` folder; installed: nothing to do."""
    if NODES_MODULE in sys.modules or (PACKAGE / "nodes").is_dir():
        return
    init = CHECKOUT / "nodes" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(NODES_MODULE, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[NODES_MODULE] = module
    spec.loader.exec_module(module)
    vars(sys.modules["nuwa_graph"])["nodes"] = module


def pipelines_dir() -> Path:
    """The folder of the pipelines shipped with the package (the checkout's `pipelines/`)."""
    installed = PACKAGE / "pipelines"
    return installed if installed.is_dir() else CHECKOUT / "pipelines"


def shipped_pipeline(name: str) -> Path:
    """A shipped pipeline by name: `nuwa`, `nuwa.yaml`, `ablations/nuwa_rpme` (it may not exist)."""
    rel = Path(name)
    if rel.parts and rel.parts[0] == "pipelines":
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    if rel.suffix not in (".yaml", ".yml"):
        rel = rel.with_name(rel.name + ".yaml")
    return pipelines_dir() / rel


def resolve_pipeline(ref: str | Path) -> Path:
    """`ref` when it exists; otherwise, for a relative name, the shipped pipeline of that name.

    So `nuwa-graph run pipelines/nuwa.yaml` works from any folder, and `nuwa-graph run nuwa`
    too. An absolute path is never replaced. Returns `ref` unchanged when nothing matches.
    """
    path = Path(ref)
    if path.exists() or path.is_absolute() or not str(ref):
        return path
    shipped = shipped_pipeline(str(ref))
    return shipped if shipped.is_file() else path


def shipped_names() -> list[str]:
    """Names of the shipped pipelines (relative, without .yaml), for messages and listings."""
    root = pipelines_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
