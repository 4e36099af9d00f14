"""The node API: typed ports, a pydantic params model, and a per-sample `run`.

A node type is a subclass of `Node[ItsParams]` that declares

- `type_name`: the name used in YAML, `family.kind` (e.g. `selector.top-k`); the family
  (one of FAMILIES) is the part before the dot and is not declared again;
- its params model as the type argument: `class TopK(Node[TopKParams])`, a `NodeParams`
  subclass (extra keys forbidden, every field documented); `self.params` is then a
  `TopKParams` for a type checker and at run time;
- `run(ctx, <inputs>) -> dict[port, value]`: ONE sample; the executor loops over a batch.
  The input ports are read from this signature, as Haystack derives a component's sockets:
  every parameter after `ctx` is a port, its annotation the port type with an optional doc
  (`scores: Annotated[Scores, "one score per token"]`); `X | None = None` is an optional
  port and `list[X]` a port that takes several upstream outputs;
- `outputs`: port name -> `Port` (semantic type, doc).

Nodes that read the model also implement `requests()` and a fixed `site()`; appliers call
`ctx.apply(...)` to change the token stream at their site.
"""

from __future__ import annotations

import inspect
import types as _types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from .sites import Site
from .types import PortType

if TYPE_CHECKING:  # pragma: no cover
    from .signals import SignalRequest

FAMILIES = (
    "scorer",
    "region",
    "selector",
    "pillar-selector",
    "region-cohesion",
    "merger",
    "random-dropper",
    "position-reencoder",
    "applier",
    "signal",
)


def _admits_bool(annotation: Any) -> bool:
    """True if a field of this type may hold True/False (bool, Any, a Literal of them, a union with one)."""
    if annotation is bool or annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _admits_bool(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin is typing.Union or origin is _types.UnionType:
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


def _bool_where_not_allowed(value: Any, annotation: Any) -> bool:
    """A True/False in `value` where `annotation` (or its list items) wants a number or text."""
    if isinstance(value, bool):
        return not _admits_bool(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _bool_where_not_allowed(value, typing.get_args(annotation)[0])
    if origin is typing.Union or origin is _types.UnionType:
        fits = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(fits) == 1 and _bool_where_not_allowed(value, fits[0])
    if isinstance(value, (list, tuple)) and origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return len(args) == 1 and any(_bool_where_not_allowed(v, args[0]) for v in value)
    return False


class NodeParams(BaseModel):
    """Base of every params model: unknown keys are errors, never ignored; a boolean is never
    read as a number (`k: true` would otherwise silently become 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        f = cls.model_fields.get(info.field_name or "")
        if f is not None and _bool_where_not_allowed(value, f.annotation):
            raise ValueError(f"got the boolean {str(value).lower()}; give {_type_text(f.annotation)}, not "
                             f"true/false")
        return value


def _type_text(annotation: Any) -> str:
    words = {int: "an integer", float: "a number", str: "text"}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, _types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation in words:
        return words[annotation]
    return "value of type " + str(annotation).replace("typing.", "")


class NoParams(NodeParams):
    pass


@dataclass(frozen=True)
class Port:
    """A typed socket. `many=True` inputs take a list of upstream outputs."""

    type: type[PortType]
    doc: str = ""
    optional: bool = False
    many: bool = False
    # on an image of several crops its ids may have no stream position (a crop's CLS row, a cell
    # the stock model cuts away): a node that places tokens by id refuses it before a run
    off_stream: bool = False

    def describe(self) -> str:
        t = self.type.type_name()
        if self.many:
            t = f"list[{t}]"
        return t + ("?" if self.optional else "")


P = TypeVar("P", bound=NodeParams)


def _resolve(annotation: Any, run: Any) -> Any:
    """A run() annotation as an object (modules with `from __future__ import annotations` give text)."""
    if not isinstance(annotation, str):
        return annotation
    names = {"Annotated": Annotated, **vars(typing), **getattr(run, "__globals__", {})}
    try:
        return eval(annotation, names)  # the module's own names, as typing.get_type_hints does
    except Exception as exc:
        raise TypeError(f"{run.__qualname__}: cannot read the annotation {annotation!r}: {exc}") from exc


def _port_of(where: str, name: str, hint: Any, has_default: bool) -> Port:
    """The Port a run() parameter declares: `Annotated[T, "doc"]`, `T | None = None`, `list[T]`."""
    doc = ""
    if typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
        doc = next((m for m in meta if isinstance(m, str)), "")
    optional = False
    if typing.get_origin(hint) in (typing.Union, _types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{where}: input {name!r} has the annotation {hint!r}; one port type per input "
                            f"(optional: `X | None = None`)")
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        if typing.get_origin(hint) is Annotated:  # `Annotated[X, "doc"] | None`
            hint, *meta = typing.get_args(hint)
            doc = doc or next((m for m in meta if isinstance(m, str)), "")
    if optional != has_default:
        raise TypeError(f"{where}: input {name!r} is optional only as `X | None = None` (both the None and the default)")
    many = typing.get_origin(hint) is list
    if many:
        (hint,) = typing.get_args(hint)
    if not (isinstance(hint, type) and issubclass(hint, PortType)):
        raise TypeError(f"{where}: input {name!r} is annotated {hint!r}, not a port type (Scores, Selection, "
                        f"Regions, Tokens, ...)")
    return Port(hint, doc, optional, many)


def ports_from_run(cls: type) -> dict[str, Port | None] | None:
    """The input ports `cls.run(self, ctx, ...)` declares, by name; None where a parameter has no
    annotation; None in all if run takes `**inputs` (then the class declares `inputs` itself)."""
    run = cls.__dict__["run"]
    params = list(inspect.signature(run).parameters.values())[2:]  # self, ctx
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    where = f"{cls.__name__}.run"
    return {p.name: None if p.annotation is inspect.Parameter.empty
            else _port_of(where, p.name, _resolve(p.annotation, run), p.default is not inspect.Parameter.empty)
            for p in params}


def _derive_inputs(cls: type[Node]) -> None:
    """Set `cls.inputs` from run(), or check a declared `inputs` against it (TypeError on a mismatch)."""
    derived = ports_from_run(cls)
    declared = cls.__dict__.get("inputs")
    if declared is None:
        if derived is None or any(p is None for p in derived.values()):
            raise TypeError(f"{cls.__name__}.run: annotate every input with its port type "
                            f"(`scores: Annotated[Scores, \"doc\"]`), or declare `inputs`")
        cls.inputs = {n: p for n, p in derived.items() if p is not None}
        return
    if derived is None:
        return
    if set(derived) != set(declared):
        raise TypeError(f"{cls.__name__}: `inputs` names {sorted(declared)} but run() takes {sorted(derived)}; "
                        f"declare the ports once, in run()")
    for name, port in derived.items():
        want = declared[name]
        if port is not None and (port.type, port.optional, port.many) != (want.type, want.optional, want.many):
            raise TypeError(f"{cls.__name__}: input {name!r} is {want.describe()} in `inputs` but "
                            f"{port.describe()} in run(); declare the ports once, in run()")


class Node(Generic[P]):
    """Base class of every node type. Instances are bound to a name and validated params.

    `class TopK(Node[TopKParams])` gives the node its params model: `self.params` is a
    `TopKParams` (`Params` is taken from the type argument; declaring `Params` still works).
    """

    type_name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # derived: the part of type_name before the dot
    paper: ClassVar[str] = ""  # a link to the paper / code this node follows
    inputs: ClassVar[dict[str, Port]] = {}
    outputs: ClassVar[dict[str, Port]] = {}
    Params: ClassVar[type[NodeParams]] = NoParams
    # reads the image's grid (regions, uniform grids, distances): on an image of several parts
    # it runs per spatial part by default and never over the flat sequence (part_views.py)
    spatial: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.type_name and "family" not in cls.__dict__:
            cls.family = cls.type_name.partition(".")[0]
        if "run" in cls.__dict__:
            _derive_inputs(cls)
        if "Params" not in cls.__dict__:
            for base in getattr(cls, "__orig_bases__", ()):
                args = typing.get_args(base)
                if args and isinstance(args[0], type) and issubclass(args[0], NodeParams):
                    cls.Params = args[0]

    def __init__(self, name: str, params: NodeParams | dict | None = None):
        self.name = name
        if params is None:
            params = {}
        validated = params if isinstance(params, self.Params) else self.Params.model_validate(params)
        self.params: P = cast(P, validated)
        self.per: str | None = None  # the file's `per:` (image | crop | part); None: the node's default

    # --- site and signals -------------------------------------------------------------
    def site(self) -> Site | None:
        """The site where this node must act, or None: runs where its inputs are ready."""
        return None

    def requests(self) -> list[SignalRequest]:
        """Signals read from the model (empty for pure nodes)."""
        return []

    def check(self) -> list[str]:
        """Extra consistency checks on params (messages name the field)."""
        return []

    def check_model(self, model_vars: dict[str, Any], sources: dict[str, list[Port]]) -> str | None:
        """What this node cannot do on a model (its variables), given the output ports its inputs
        come from; checked before any forward pass (None: it can)."""
        return None

    # --- execution --------------------------------------------------------------------
    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """`run(ctx, <inputs>) -> {output port: value}` for ONE sample; subclasses name their inputs."""
        raise NotImplementedError

    def summary(self) -> str:
        """Key params for drawings: short `k=v` text."""
        items = []
        for k, v in self.params.model_dump().items():
            if isinstance(v, (list, dict)) and len(str(v)) > 24:
                continue
            items.append(f"{k}={v}")
        return ", ".join(items[:4])

    def __repr__(self) -> str:
        return f"<{self.type_name} {self.name!r}>"
