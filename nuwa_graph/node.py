"""The node API: typed ports, a pydantic params model, and a per-sample `run`.

A node type is a subclass of `Node` that declares

- `type_name`: the name used in YAML, `family.kind` (e.g. `selector.top-k`);
- `family`: one of FAMILIES;
- `inputs` / `outputs`: port name -> `Port` (semantic type, doc, optional/many);
- `Params`: a `NodeParams` subclass (extra keys forbidden, every field documented);
- `run(ctx, **inputs) -> dict[port, value]`: ONE sample; the executor loops over a batch.

Nodes that read the model also implement `requests()` and a fixed `site()`; appliers call
`ctx.apply(...)` to change the token stream at their site.
"""

from __future__ import annotations

import types as _types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from .sites import Site
from .types import PortType

if TYPE_CHECKING:  # pragma: no cover
    from .context import SampleContext
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

    def describe(self) -> str:
        t = self.type.type_name()
        if self.many:
            t = f"list[{t}]"
        return t + ("?" if self.optional else "")


class Node:
    """Base class of every node type. Instances are bound to a name and validated params."""

    type_name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # a link to the paper / code this node follows
    inputs: ClassVar[dict[str, Port]] = {}
    outputs: ClassVar[dict[str, Port]] = {}
    Params: ClassVar[type[NodeParams]] = NoParams

    def __init__(self, name: str, params: NodeParams | dict | None = None):
        self.name = name
        if params is None:
            params = {}
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params)

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

    # --- execution --------------------------------------------------------------------
    def run(self, ctx: SampleContext, **inputs: Any) -> dict[str, PortType]:
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
