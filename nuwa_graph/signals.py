"""Signal requests: what a node asks the model for at a site, one typed class per kind.

A node that reads the model declares its requests before the forward pass (so the adapter
installs only the hooks a pipeline needs) and reads the values with `ctx.signal(request)`.
`SignalRequest.make(kind, site, **args)` parses and checks the arguments ONCE (when the
pipeline loads: validation.py turns a `SignalError` into a problem naming the node and the
field) and returns the kind's class, whose typed fields (`req.layer`, `req.queries`, ...)
adapters and the simulator read instead of re-parsing strings. Each class documents the
tensor the adapter returns for ONE sample (`SHAPE`) and makes a random one of that shape
for model-free runs (`synthetic`, used by simulate.py)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from .sites import Site

if TYPE_CHECKING:
    from .simulate import ModelGeometry

Rand = Callable[..., torch.Tensor]  # rand(*shape) -> uniform [0, 1) tensor (seeded by the caller)


class SignalError(ValueError):
    """A request that cannot be made; `arg` names the culprit ("site", None for the kind) so
    that the loader can point at the node's field."""

    def __init__(self, kind: str, arg: str | None, message: str):
        self.kind, self.arg, self.message = kind, arg, message
        super().__init__(message)


# --- argument values ----------------------------------------------------------------------
@dataclass(frozen=True)
class Queries:
    """Which prompt rows an `llm.attention` request reads: one rule for every reader.

    `last`: the last prompt token; `last:N`: the last N prompt tokens (N >= 1, at most the
    tokens after the image); `text`: every token after the image block."""

    which: Literal["last", "last_n", "text"]
    n: int = 1

    VALID: ClassVar[str] = "'last', 'last:N' (N >= 1) or 'text'"

    @classmethod
    def parse(cls, value: object) -> Queries:
        if isinstance(value, Queries):
            return value
        if value == "last" or value == "text":
            return cls(value)
        if isinstance(value, str) and value.startswith("last:"):
            digits = value.removeprefix("last:")
            if digits.isascii() and digits.isdigit() and digits[0] != "0" and len(digits) <= 9:
                return cls("last_n", int(digits))
        raise ValueError(f"queries must be {cls.VALID}, got {value!r}")

    def rows(self, text_after: int) -> int:
        """How many rows for a prompt with `text_after` tokens after the image."""
        if self.which == "last":
            return 1
        return text_after if self.which == "text" else min(self.n, text_after)

    def __str__(self) -> str:
        return f"last:{self.n}" if self.which == "last_n" else self.which


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)  # type: ignore[arg-type]


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _choice(*valid: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in valid:
            raise ValueError(f"must be {' or '.join(repr(v) for v in valid)}, got {value!r}")
        return str(value)

    return parse


_EXPECTS = {_int: "an integer", _opt_int: "an integer", _bool: "true or false", _str: "a string"}


def arg(default: Any, parse: Callable[[object], Any], doc: str, required: bool = False) -> Any:
    """A typed argument of a signal kind: its parser and what it means."""
    return field(default=default, metadata={"parse": parse, "doc": doc, "required": required})


# --- the base class -----------------------------------------------------------------------
KINDS: dict[str, type[SignalRequest]] = {}


@dataclass(frozen=True)
class SignalRequest:
    """One signal: its kind, the site where it is read, and its arguments as given (`args`,
    which make `key`); subclasses add the same arguments as typed fields."""

    kind: str
    site: str
    args: tuple[tuple[str, object], ...] = ()

    KIND: ClassVar[str] = ""
    SHAPE: ClassVar[str] = ""  # the per-sample tensor the adapter returns

    def arg(self, name: str, default=None):
        """An argument as given (prefer the typed field)."""
        return dict(self.args).get(name, default)

    @property
    def key(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.args)
        return f"{self.kind}({inner})"

    @classmethod
    def make(cls, kind: str, site: str, **args) -> SignalRequest:
        """The typed request for `kind`; SignalError for an unknown kind, argument or value."""
        sub = KINDS.get(kind)
        if sub is None:
            raise SignalError(kind, None, f"unknown signal kind {kind!r}; known: {', '.join(sorted(KINDS))}")
        return sub._parse(str(site), args)

    @classmethod
    def _parse(cls, site: str, args: dict[str, object]) -> SignalRequest:
        kind = cls.KIND
        known = {f.name: f for f in fields(cls) if "parse" in f.metadata}
        for name in args:
            if name not in known:
                raise SignalError(kind, name, f"signal {kind} has no argument {name!r}; its arguments: "
                                  f"{', '.join(known) or 'none'}")
        typed: dict[str, Any] = {}
        for name, f in known.items():
            if name not in args:
                if f.metadata["required"]:
                    raise SignalError(kind, name, f"signal {kind} needs argument {name!r} ({f.metadata['doc']})")
                continue
            parse = f.metadata["parse"]
            try:
                typed[name] = parse(args[name])
            except (TypeError, ValueError) as exc:
                expects = _EXPECTS.get(parse, "a valid value")
                detail = str(exc) if isinstance(exc, ValueError) and str(exc) else f"must be {expects}, got {args[name]!r}"
                raise SignalError(kind, name, f"signal {kind}: {name} {detail.removeprefix(name + ' ')}") from None
        try:
            where = Site(site)
        except ValueError as exc:
            raise SignalError(kind, "site", f"signal {kind}: {exc}") from None
        req = cls(kind=kind, site=site, args=tuple(sorted(args.items())), **typed)
        req._check_site(where)
        return req

    def _check_site(self, site: Site) -> None:
        """Rules tying the arguments to the site (model-independent)."""

    def synthetic(self, geom: ModelGeometry, present: int, rand: Rand) -> torch.Tensor:
        """A random tensor of SHAPE for a model of geometry `geom` with `present` image tokens."""
        raise NotImplementedError(f"no synthetic form for signal {self.key}")


# kind -> the per-sample tensor (docs, `nuwa-graph nodes`), filled by `signal_kind` (also signal_kinds.py)
SIGNAL_KINDS: dict[str, str] = {}


def signal_kind(cls: type[SignalRequest]) -> type[SignalRequest]:
    """Register a request class under its KIND."""
    KINDS[cls.KIND] = cls
    SIGNAL_KINDS[cls.KIND] = f"{' '.join((cls.__doc__ or '').split()).rstrip('.')}: {cls.SHAPE}"
    return cls


_ORDER_DOC = "Qwen2.5-VL: 'raster' (default) or the tower's 'window' order"
_MERGER_DOC = "Qwen2.5-VL: apply the patch merger (rows then have width d_llm)"


# --- vision ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _VisionLayer(SignalRequest):
    """A vision signal of one layer."""

    layer: int | None = arg(None, _opt_int, "hidden_states index (hidden kinds) or encoder layer (attention kinds), "
                            "negative from the end; omitted: the adapter's default")


@dataclass(frozen=True)
class _VisionRange(SignalRequest):
    """A vision signal averaged over a range of layers."""

    start: int | None = arg(None, _opt_int, "first index averaged")
    stop: int | None = arg(None, _opt_int, "one past the last index averaged")
    order: str = arg("raster", _choice("raster", "window"), _ORDER_DOC)


@signal_kind
@dataclass(frozen=True)
class VisionHidden(_VisionLayer):
    """Vision hidden_states[layer] without CLS."""

    KIND: ClassVar[str] = "vision.hidden"
    SHAPE: ClassVar[str] = "(n, d_vision) or (n, d_llm) with merger"
    order: str = arg("raster", _choice("raster", "window"), _ORDER_DOC)
    merger: bool = arg(False, _bool, _MERGER_DOC)

    def synthetic(self, geom, present, rand):
        return rand(geom.n_visual, geom.llm_width if self.merger else geom.vision_width)


@signal_kind
@dataclass(frozen=True)
class VisionHiddenMean(_VisionRange):
    """Mean of vision hidden_states[start:stop] without CLS."""

    KIND: ClassVar[str] = "vision.hidden_mean"
    SHAPE: ClassVar[str] = "(n, d_vision) or (n, d_llm) with merger"
    merger: bool = arg(False, _bool, _MERGER_DOC)

    def synthetic(self, geom, present, rand):
        return rand(geom.n_visual, geom.llm_width if self.merger else geom.vision_width)


@signal_kind
@dataclass(frozen=True)
class VisionMergedHiddenMean(_VisionRange):
    """Qwen2.5-VL: the patch merger applied to the mean of the outputs of vision blocks
    start..stop-1 (Nüwa's Qwen code: blocks 7..23), one row per merged token in raster order
    (window order undone)."""

    KIND: ClassVar[str] = "vision.merged_hidden_mean"
    SHAPE: ClassVar[str] = "(n, d_llm)"

    def synthetic(self, geom, present, rand):
        return rand(geom.n_visual, geom.llm_width)


@signal_kind
@dataclass(frozen=True)
class VisionClsHidden(_VisionLayer):
    """CLS row of vision hidden_states[layer]."""

    KIND: ClassVar[str] = "vision.cls_hidden"
    SHAPE: ClassVar[str] = "(d_vision,)"

    def synthetic(self, geom, present, rand):
        return rand(geom.vision_width)


@signal_kind
@dataclass(frozen=True)
class VisionClsAttention(_VisionLayer):
    """Post-softmax CLS->patch attention of vision layer `layer`."""

    KIND: ClassVar[str] = "vision.cls_attention"
    SHAPE: ClassVar[str] = "(heads, n)"

    def synthetic(self, geom, present, rand):
        return torch.softmax(rand(geom.vision_heads, geom.n_visual) * 8, dim=-1)


@signal_kind
@dataclass(frozen=True)
class VisionAttentionReceived(_VisionLayer):
    """Attention each patch receives at vision layer `layer` (mean over heads, then the sum or
    the mean over every query, CLS query included; CLS key dropped), per merged token."""

    KIND: ClassVar[str] = "vision.attention_received"
    SHAPE: ClassVar[str] = "(n,)"
    order: str = arg("raster", _choice("raster", "window"), _ORDER_DOC)
    queries: str = arg("sum", _choice("sum", "mean"), "'sum' over the queries (Nüwa) or 'mean' (HiPrune, LLaVA)")

    def synthetic(self, geom, present, rand):
        return rand(geom.n_visual)


@signal_kind
@dataclass(frozen=True)
class VisionKeys(_VisionLayer):
    """Key states of vision layer `layer`, CLS first where the model has one."""

    KIND: ClassVar[str] = "vision.keys"
    SHAPE: ClassVar[str] = "(heads, n + cls, head_dim)"

    def synthetic(self, geom, present, rand):
        return rand(geom.vision_heads, geom.n_visual + int(geom.has_cls), geom.vision_head_dim)


@signal_kind
@dataclass(frozen=True)
class VisionQKSingleHead(_VisionLayer):
    """q and k of vision layer `layer` as one head over the full width, after its LayerNorm
    (PruMerge+)."""

    KIND: ClassVar[str] = "vision.qk_single_head"
    SHAPE: ClassVar[str] = "(2, n + cls, d)"

    def synthetic(self, geom, present, rand):
        return rand(2, geom.n_visual + int(geom.has_cls), geom.vision_width)


# --- caller-given, before the LLM -------------------------------------------------------------
@signal_kind
@dataclass(frozen=True)
class External(SignalRequest):
    """A tensor given by the caller under `name` (model-free runs, tests, user scores)."""

    KIND: ClassVar[str] = "external"
    SHAPE: ClassVar[str] = "(n_present,) or (n_present, d)"
    name: str = arg("", _str, "the name the caller gives the tensor under", required=True)

    def synthetic(self, geom, present, rand):
        return rand(present)


@signal_kind
@dataclass(frozen=True)
class PreLLMVisual(SignalRequest):
    """Projected visual tokens (those present after any prune at the vision site)."""

    KIND: ClassVar[str] = "pre_llm.visual"
    SHAPE: ClassVar[str] = "(n_present, d_llm)"

    def synthetic(self, geom, present, rand):
        return rand(present, geom.llm_width)


@signal_kind
@dataclass(frozen=True)
class PreLLMText(SignalRequest):
    """Input embeddings of the tokens after the image."""

    KIND: ClassVar[str] = "pre_llm.text"
    SHAPE: ClassVar[str] = "(t, d_llm)"

    def synthetic(self, geom, present, rand):
        return rand(geom.text_after, geom.llm_width)


# --- inside the LLM -------------------------------------------------------------------------
@dataclass(frozen=True)
class _AtLLMLayer(SignalRequest):
    """Rules shared by the signals read inside the LLM: site llm.K, layer 0..K."""

    layer: int = arg(0, _int, "decoder layer (<= the site's K; K: rows of layer K's own q/k at its input)",
                     required=True)

    def _check_site(self, site: Site) -> None:
        if site.layer is None:
            raise SignalError(self.kind, "site", f"signal {self.kind} must be read at an llm.K site, not {site}")
        if not 0 <= self.layer <= site.layer:
            raise SignalError(self.kind, "layer", f"signal {self.kind} at {site}: layer must be in 0..{site.layer}, "
                              f"got {self.layer}")


@signal_kind
@dataclass(frozen=True)
class LLMAttention(_AtLLMLayer):
    """Post-softmax attention rows of LLM layer `layer` for the chosen queries over the image
    keys present. Read at llm.K with layer L <= K: L == K computes the rows at the input of
    layer K from its own norm/q/k (PDrop); L < K takes them from layer L's forward (FastV)."""

    KIND: ClassVar[str] = "llm.attention"
    SHAPE: ClassVar[str] = "(heads, q, n_present)"
    queries: Queries = arg(Queries("last"), Queries.parse, f"query rows: {Queries.VALID}")
    rope: bool = arg(True, _bool, "apply RoPE to q and k")
    softmax_over: str = arg("all", _choice("all", "image"), "normalise over all keys (causal) or the image keys only")

    def synthetic(self, geom, present, rand):
        return torch.softmax(rand(geom.llm_heads, self.queries.rows(geom.text_after), present) * 8, dim=-1)


@signal_kind
@dataclass(frozen=True)
class LLMHidden(_AtLLMLayer):
    """Hidden states of the image tokens present at the input of LLM layer `layer`."""

    KIND: ClassVar[str] = "llm.hidden"
    SHAPE: ClassVar[str] = "(n_present, d)"

    def synthetic(self, geom, present, rand):
        return rand(present, geom.llm_width)
