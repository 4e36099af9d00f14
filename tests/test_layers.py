"""The shape of the package, read from the source with `ast` (nothing is imported):

- no import cycles between nuwa_graph modules (imports under TYPE_CHECKING do not count;
  imports inside functions do: a cycle is a cycle);
- the engine (ENGINE) imports only the engine: no application, and the node library only
  through the registry;
- every `nuwa_graph.X` a module imports exists in THIS tree (the shared dev venv's editable
  install points at another checkout and would quietly import a module missing here);
- the applications live in nuwa_graph/apps (and world/, embedded/, integrations/), `run` does
  not reach the evaluation loop, results generation is a script, and no module is over ~400 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nuwa_graph"
NODE_LIBRARY = "nuwa_graph.nodes"
MAX_LINES = 400
# modules still over MAX_LINES, each with what splits it (the test fails once one is split: drop it)
NOT_YET_SPLIT: dict[str, str] = {}  # the repository's nodes/ folder, installed under the package

# The engine: types, sites, signals, node API, registry, loader, validation, executor, adapters,
# draw, and what they need. A module listed here may import only modules listed here (a name
# ending in "." covers a subpackage). Everything else in nuwa_graph/ is an application (the CLI,
# evaluation, the shapes world, the embedded model, reports...), free to import the engine.
ENGINE = [
    "nuwa_graph.adapters.",
    "nuwa_graph.context",
    "nuwa_graph.devices",
    "nuwa_graph.draw",
    "nuwa_graph.errors",
    "nuwa_graph.executor",
    "nuwa_graph.expressions",
    "nuwa_graph.flops",
    "nuwa_graph.geometry",
    "nuwa_graph.family_geometries",
    "nuwa_graph.loader",
    "nuwa_graph.node",
    "nuwa_graph.part_views",
    "nuwa_graph.pipeline",
    "nuwa_graph.positions",
    "nuwa_graph.prompt_geometry",
    "nuwa_graph.preflight",
    "nuwa_graph.registry",
    "nuwa_graph.replay",
    "nuwa_graph.resources",
    "nuwa_graph.safe_io",
    "nuwa_graph.safe_yaml",
    "nuwa_graph.signals",
    "nuwa_graph.signal_kinds",
    "nuwa_graph.simulate",
    "nuwa_graph.sites",
    "nuwa_graph.types",
    "nuwa_graph.validation",
]

# Engine modules that still import the node library directly, each with what removes it. A
# listed module must still do so (the test fails once the import is gone: then drop the entry).
NODE_LIBRARY_IMPORTS_TO_REMOVE: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_engine(name: str) -> bool:
    return any(name.startswith(e) if e.endswith(".") else name == e for e in ENGINE)


def _runtime(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
            assert isinstance(node, ast.If)
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def imports(path: Path, runtime_only: bool = True) -> set[str]:
    """Absolute names of what `path` imports from nuwa_graph: modules, and `module.name` for
    `from module import name` (which may itself be a module: `from . import registry`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in _runtime(tree) if runtime_only else list(ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "nuwa_graph"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "nuwa_graph":
                if node.module:  # `from . import registry` names the module registry, not the package
                    out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for name, path in MODULES.items():
        for target in imports(path):
            # a package's own __init__ runs before any of its modules: importing it is no cycle
            if target in MODULES and target != name and not name.startswith(target + "."):
                g.add_edge(name, target)
    return g


def test_no_import_cycles():
    cycles = sorted((c for c in nx.simple_cycles(import_graph()) if len(c) > 1), key=len)
    shown = "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])
    assert not cycles, f"{len(cycles)} import cycles, the shortest: {shown}"


def test_pipeline_and_validation_do_not_import_each_other():
    g = import_graph()
    assert not g.has_edge("nuwa_graph.validation", "nuwa_graph.pipeline")
    assert nx.has_path(g, "nuwa_graph.pipeline", "nuwa_graph.loader")
    assert nx.has_path(g, "nuwa_graph.validation", "nuwa_graph.loader")


def test_every_import_names_a_module_of_this_tree():
    problems = []
    for name, path in MODULES.items():
        for target in imports(path, runtime_only=False):
            if target.startswith(NODE_LIBRARY):
                continue  # nodes/ in the repository; mounted at run time
            parent = target.rpartition(".")[0]
            # `from x import y`: y is a module of the tree, or a name in module x
            if target not in MODULES and parent not in MODULES:
                problems.append(f"{name} imports {target}, which is not a module in {PACKAGE}")
    assert not problems, "\n".join(problems)


def test_the_engine_list_names_modules_of_this_tree():
    missing = [e for e in ENGINE if not any(is_engine(m) for m in MODULES if m == e or m.startswith(e))]
    assert not missing, f"ENGINE lists modules that are not in the tree: {missing}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if is_engine(m)))
def test_engine_imports_only_the_engine(name):
    apps = sorted(t for t in imports(MODULES[name]) if t in MODULES and not is_engine(t) and t != "nuwa_graph")
    assert not apps, f"{name} (engine) imports {apps}, which are not engine modules (see ENGINE in {__file__})"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if is_engine(m) and m != "nuwa_graph.registry"))
def test_engine_imports_the_node_library_only_through_the_registry(name):
    hits = sorted(t for t in imports(MODULES[name]) if t == NODE_LIBRARY or t.startswith(NODE_LIBRARY + "."))
    if name in NODE_LIBRARY_IMPORTS_TO_REMOVE:
        assert hits, f"{name} no longer imports the node library: drop it from NODE_LIBRARY_IMPORTS_TO_REMOVE"
    else:
        assert not hits, f"{name} (engine) imports the node library directly: {hits}; go through the registry"


def test_the_checks_see_imports():
    """The parser itself: relative imports, `from . import x`, TYPE_CHECKING and function bodies."""
    g = import_graph()
    assert g.has_edge("nuwa_graph.pipeline", "nuwa_graph.loader")  # `from .loader import ...`
    assert g.has_edge("nuwa_graph.validation", "nuwa_graph.registry")  # `from . import registry`
    assert "nuwa_graph.simulate" not in imports(MODULES["nuwa_graph.signals"])  # under TYPE_CHECKING
    assert "nuwa_graph.simulate" in imports(MODULES["nuwa_graph.signals"], runtime_only=False)


def test_the_layers_are_where_the_test_expects_them():
    assert {"nuwa_graph.apps.cli", "nuwa_graph.apps.runner", "nuwa_graph.apps.evaluate", "nuwa_graph.apps.models",
            "nuwa_graph.world.shapes", "nuwa_graph.embedded.train"} <= set(MODULES)
    assert all(not is_engine(m) for m in MODULES if m.startswith(("nuwa_graph.apps", "nuwa_graph.world",
                                                                  "nuwa_graph.embedded", "nuwa_graph.integrations")))
    for gone in ("cli", "demo", "runner", "sweep", "evaluate", "data", "viz", "shards", "prompts", "results"):
        assert not (PACKAGE / f"{gone}.py").exists(), f"nuwa_graph/{gone}.py belongs in nuwa_graph/apps/ (or scripts/)"


def test_runner_does_not_reach_the_evaluation():
    """`run` needs the default model (apps/models.py), not the eval loop: follow runner's imports
    (lazy ones too) within nuwa_graph and check evaluate.py is never among them."""
    seen, todo = set(), ["nuwa_graph.apps.runner"]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        todo += [m for m in imports(MODULES[name], runtime_only=False) if m in MODULES]
    assert "nuwa_graph.apps.models" in seen
    assert "nuwa_graph.apps.evaluate" not in seen


def test_importing_the_runner_loads_no_evaluation():
    code = ("import sys, nuwa_graph.apps.runner, nuwa_graph.apps.models; "
            "print(sorted(m for m in sys.modules if m.startswith('nuwa_graph.apps')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "nuwa_graph.apps.runner" in out and "nuwa_graph.apps.evaluate" not in out


def test_results_generation_is_a_script_not_the_package():
    assert (ROOT / "scripts" / "results_report.py").is_file()
    assert not any("results_report" in m for m in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_under_the_size_limit(name):
    path = MODULES[name]
    rel = str(path.relative_to(PACKAGE))
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if rel in NOT_YET_SPLIT:
        assert lines > MAX_LINES, f"{rel} is split now ({lines} lines): remove it from NOT_YET_SPLIT"
        return
    assert lines <= MAX_LINES, f"nuwa_graph/{rel} has {lines} lines (limit about {MAX_LINES}): split it by concern"
