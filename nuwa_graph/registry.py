"""The registry of node types: built-ins from `nuwa_graph.nodes` (the `nodes/` folder), third parties by entry point.

A third-party package registers nodes by naming a module (or a Node class) under the
entry-point group `nuwa_graph.nodes` in its pyproject.toml:

    [project.entry-points."nuwa_graph.nodes"]
    my_nodes = "my_package.nodes"

Importing that module runs its `@register` decorators.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points

from .node import FAMILIES, Node

ENTRY_POINT_GROUP = "nuwa_graph.nodes"

_REGISTRY: dict[str, type[Node]] = {}
_loaded = False
_load_errors: list[str] = []


def register(cls: type[Node]) -> type[Node]:
    """Class decorator: add a node type to the registry (checks its declaration)."""
    if not cls.type_name:
        raise TypeError(f"{cls.__name__}: type_name is empty")
    if cls.family not in FAMILIES:
        raise TypeError(f"{cls.__name__}: family {cls.family!r} is not one of {', '.join(FAMILIES)}")
    if not cls.type_name.startswith(cls.family + "."):
        raise TypeError(f"{cls.__name__}: type_name {cls.type_name!r} must start with its family {cls.family!r} + '.'")
    prior = _REGISTRY.get(cls.type_name)
    if prior is not None and prior is not cls and prior.__qualname__ != cls.__qualname__:
        raise TypeError(f"node type {cls.type_name!r} registered twice ({prior.__module__} and {cls.__module__})")
    _REGISTRY[cls.type_name] = cls
    return cls


def _load_builtin() -> None:
    from . import resources

    resources.mount_checkout_nodes()  # from a checkout, nuwa_graph.nodes is the top-level nodes/ folder
    nodes = importlib.import_module(resources.NODES_MODULE)  # the node library shipped with the project

    for mod in pkgutil.iter_modules(nodes.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{resources.NODES_MODULE}.{mod.name}")


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the built-ins
            _load_errors.append(f"entry point {ep.name!r} ({ep.value}): {type(exc).__name__}: {exc}")
            continue
        if isinstance(obj, type) and issubclass(obj, Node):
            register(obj)


def ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        _load_builtin()
        _load_entry_points()


def load_errors() -> list[str]:
    ensure_loaded()
    return list(_load_errors)


def all_types() -> dict[str, type[Node]]:
    ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def suggest(name: str) -> str:
    """A ' did you mean ...?' suffix, or ''."""
    close = difflib.get_close_matches(name, list(all_types()), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def get(type_name: str) -> type[Node]:
    types = all_types()
    if type_name not in types:
        raise KeyError(f"unknown node type {type_name!r}{suggest(type_name)}")
    return types[type_name]
