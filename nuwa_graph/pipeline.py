"""Pipeline files: the YAML schema, loading with variables and overrides, dumping.

A pipeline file:

    name: fastv
    description: FastV (ECCV'24) ... how the budget is counted ...
    variables: {budget: 64}
    seed: 0
    nodes:
      - name: attn
        type: scorer.text-attention
        params: {layer: 1}
      - name: keep
        type: selector.top-k
        params: {k: "${budget}"}
        inputs: {scores: attn.scores}

Loading collects every problem (see validation.py) and raises one PipelineError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
)

from .errors import PipelineError, Problem
from .node import Node
from .safe_yaml import MAX_FILE_BYTES, YamlLimitError, load_yaml
from .sites import Site


class NodeSpec(BaseModel):
    """One node as written in the file (params still hold `${...}` expressions)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="unique node name, used in `inputs` as name.port")
    type: str = Field(description="registered node type, e.g. selector.top-k")
    params: dict[str, Any] = Field(default_factory=dict, description="node parameters")
    inputs: dict[str, str | list[str]] = Field(default_factory=dict, description="port -> 'node.port' (or a list)")
    _line: int | None = PrivateAttr(default=None)  # line of the entry in its file (not dumped)


class PipelineSpec(BaseModel):
    """The whole file as written."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    variables: dict[str, Any] = Field(default_factory=dict)
    seed: StrictInt = 0
    nodes: list[NodeSpec]


# Variables the MODEL provides: a file may use them in expressions (`${llm_layers // 2}`) so
# one file fits models of any depth. Without a model (validate, draw, docs) they take the
# LLaVA-1.5-7B values below; an adapter rebinds them to its model before running.
MODEL_VARIABLES: dict[str, int] = {
    "llm_layers": 32,  # decoder layers of the language model
    "vision_layers": 24,  # layers (blocks) of the vision encoder
    # visual tokens per image on a FIXED patch grid (576 = 24x24 on LLaVA-1.5). Budgets in the
    # shipped files are LLaVA-1.5 counts (64/128/192 of 576) scaled by grid_tokens / 576, so
    # `budget=64` keeps 1/9 of the tokens on any fixed grid (16 of 144 on the embedded model).
    # Models whose grid depends on the image (Qwen2.5-VL) do not bind it: there budget is a count.
    "grid_tokens": 576,
}


@dataclass
class Pipeline:
    """A loaded, validated pipeline: node instances, the graph, and each node's site."""

    spec: PipelineSpec
    source: str
    variables: dict[str, Any]
    nodes: dict[str, Node]
    graph: nx.DiGraph
    sites: dict[str, Site]  # effective site of every node
    edges: list[tuple[str, str, str, str]] = field(default_factory=list)  # (src, out_port, dst, in_port)
    model_vars: dict[str, Any] = field(default_factory=lambda: dict(MODEL_VARIABLES))
    model_vars_used: frozenset[str] = frozenset()

    def bind_model(self, model_vars: dict[str, Any]) -> "Pipeline":
        """This pipeline with the model's variables (re-validated), or itself if they don't matter."""
        if all(self.model_vars.get(k) == model_vars.get(k, self.model_vars.get(k)) for k in self.model_vars_used):
            return self
        from .validation import build_pipeline

        node_lines = {n.name: n._line for n in self.spec.nodes}
        merged = {**self.model_vars, **model_vars}
        return build_pipeline(self.spec, self.source, dict(self.variables), [], node_lines, merged)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def seed(self) -> int:
        return self.spec.seed

    def order(self) -> list[str]:
        """Topological order, ties broken by position in the file."""
        pos = {n.name: i for i, n in enumerate(self.spec.nodes)}
        return list(nx.lexicographical_topological_sort(self.graph, key=lambda n: pos[n]))

    def site_order(self) -> list[Site]:
        return sorted(set(self.sites.values()))

    def dump(self) -> dict[str, Any]:
        """The file's content with the current variable values (expressions kept)."""
        data = self.spec.model_dump(exclude_defaults=False)
        data["variables"] = dict(self.variables)
        for n in data["nodes"]:
            if not n["params"]:
                n.pop("params")
            if not n["inputs"]:
                n.pop("inputs")
        return data

    def dumps(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False, allow_unicode=True)


def parse_override(text: str) -> tuple[str, Any]:
    """`name=value` from `--set`; the value is read as YAML (numbers, lists, strings)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected NAME=VALUE, e.g. --set budget=128")
    name, _, raw = text.partition("=")
    name = name.strip()
    if not name.isidentifier():
        raise ValueError(f"--set {text!r}: {name!r} is not a valid variable name")
    try:
        value = load_yaml(raw, f"--set {name}") if raw.strip() else ""
    except YamlLimitError as exc:
        if len(raw) > 1000:  # too large to be a plain string either
            raise ValueError(f"--set {name}: {exc.message}") from None
        value = raw
    return name, value


def _pydantic_problems(file: str, exc: ValidationError, node: str | None, prefix: str, line: int | None):
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(Problem(file, msg, node=node, field=f"{prefix}{loc}" if loc else prefix.rstrip("."), line=line))
    return out


def load_text(text: str | bytes, source: str = "<string>", overrides: dict[str, Any] | None = None,
              model_vars: dict[str, Any] | None = None) -> Pipeline:
    """Parse and validate pipeline YAML (bounded: see safe_yaml.py); raise PipelineError listing every problem."""
    from .validation import build_pipeline

    try:
        raw = load_yaml(text, source)
    except YamlLimitError as exc:
        raise PipelineError([Problem(source, exc.message, line=exc.line)]) from None
    if not isinstance(raw, dict):
        raise PipelineError([Problem(source, "a pipeline file must be a mapping with 'name' and 'nodes'", line=1)])
    problems: list[Problem] = []
    # validate node entries one by one so that one bad node does not hide the others
    raw_nodes = raw.get("nodes")
    lines: dict[int, int] = {}
    good_nodes: list[NodeSpec] = []
    if isinstance(raw_nodes, list):
        for i, rn in enumerate(raw_nodes):
            line = getattr(rn, "line", None)
            label = rn.get("name") if isinstance(rn, dict) and isinstance(rn.get("name"), str) else f"#{i}"
            try:
                good_nodes.append(NodeSpec.model_validate(rn))
                lines[len(good_nodes) - 1] = line
            except ValidationError as exc:
                problems += _pydantic_problems(source, exc, label, "", line)
        top = {k: v for k, v in raw.items() if k != "nodes"} | {"nodes": []}
    else:
        top = dict(raw)
    try:
        spec = PipelineSpec.model_validate(top)
        spec.nodes = good_nodes
    except ValidationError as exc:
        problems += _pydantic_problems(source, exc, None, "", getattr(raw, "line", None))
        spec = None
    if spec is None:
        raise PipelineError(problems)
    if not isinstance(raw_nodes, list) or not raw_nodes:
        problems.append(Problem(source, "'nodes' must be a non-empty list of nodes", field="nodes"))
    node_lines: dict[str, int | None] = {}
    for i, s in enumerate(spec.nodes):
        s._line = lines.get(i)
        node_lines.setdefault(s.name, s._line)  # a duplicate name keeps its first entry's line
    return build_pipeline(spec, source, overrides or {}, problems, node_lines, model_vars)


def load(path: str | Path, overrides: dict[str, Any] | None = None, model_vars: dict[str, Any] | None = None) -> Pipeline:
    p = Path(path)
    if p.is_dir():
        raise PipelineError([Problem(str(path), "is a folder, not a pipeline file")])
    if p.exists() and not p.is_file():
        raise PipelineError([Problem(str(path), "not a regular file (a device, pipe or socket?); give a YAML file")])
    if not p.is_file():
        raise PipelineError([Problem(str(path), "no such file")])
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:  # refused before reading it
            raise PipelineError([Problem(str(path), f"file is {size} bytes; a pipeline file may have at most "
                                         f"{MAX_FILE_BYTES} bytes (limit MAX_FILE_BYTES)")])
        with p.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PipelineError([Problem(str(path), f"cannot be read ({exc.strerror or exc})")]) from None
    return load_text(data, str(path), overrides, model_vars)
