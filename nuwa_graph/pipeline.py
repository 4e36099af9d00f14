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
from .resources import resolve_pipeline, shipped_names
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
    # model family (adapter `family`, e.g. qwen2_5_vl) -> file run INSTEAD of this one on such a
    # model (path relative to this file): one method, one file name, the authors' per-family code
    family_files: dict[str, str] = Field(default_factory=dict)
    nodes: list[NodeSpec]


# Variables the MODEL provides: a file may use them in expressions (`${llm_layers // 2}`) so
# one file fits models of any depth. Without a model (validate, draw, docs) they take the
# LLaVA-1.5-7B values below; an adapter rebinds them to its model before running.
# A variable's default may itself be an expression over them (`K: "${scale32(2)}"`): it is
# evaluated for each model; `--set K=3` replaces it by the exact value.
MODEL_VARIABLES: dict[str, Any] = {
    "family": "llava",  # adapter family: llava | qwen2_5_vl (see family_files)
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
    overrides: dict[str, Any] = field(default_factory=dict)  # what the user set (--set), exact
    derived: dict[str, str] = field(default_factory=dict)  # variable -> default expression it was computed from
    chosen_from: str | None = None  # the file whose family_files picked this one for the model

    def bind_model(self, model_vars: dict[str, Any]) -> Pipeline:
        """This pipeline for a model (re-validated with its variables), or itself if they don't matter.

        If `model_vars` name a `family` listed in the file's `family_files`, that file is
        loaded instead, with the same overrides (each must be one of its variables)."""
        merged = {**self.model_vars, **model_vars}
        other = self.spec.family_files.get(str(model_vars["family"])) if "family" in model_vars else None
        if other is not None:
            return self._family_file(other, merged)
        if all(self.model_vars.get(k) == merged.get(k) for k in self.model_vars_used):
            return self
        from .validation import build_pipeline

        node_lines = {n.name: n._line for n in self.spec.nodes}
        return build_pipeline(self.spec, self.source, dict(self.overrides), [], node_lines, merged)

    def _family_file(self, other: str, model_vars: dict[str, Any]) -> Pipeline:
        path = Path(self.source).parent / other
        family = model_vars.get("family")
        try:
            with path.open("rb") as fh:  # bounded like any pipeline file (safe_yaml.py)
                raw = load_yaml(fh.read(MAX_FILE_BYTES + 1), str(path))
            target = PipelineSpec.model_validate({**raw, "nodes": []})
        except (OSError, TypeError, YamlLimitError, ValidationError):
            raise PipelineError([Problem(self.source, f"family_files: {other} (for {family} models) is missing or "
                                         f"not a pipeline file", field="family_files")]) from None
        if str(family) in target.family_files:
            raise PipelineError([Problem(self.source, f"family_files: {other} sends {family} models on to "
                                         f"{target.family_files[str(family)]}; name the final file", field="family_files")])
        stray = [k for k in self.overrides if k not in target.variables]
        if stray:
            raise PipelineError([Problem(self.source, f"on a {family} model this file runs {other} (family_files), "
                                         f"which has no variable {', '.join(repr(k) for k in stray)}; its variables: "
                                         f"{', '.join(sorted(target.variables)) or 'none'}: run {path} itself to set them",
                                         field="family_files")])
        pipe = load(path, dict(self.overrides), model_vars)
        pipe.chosen_from = self.source
        return pipe

    def schedule(self) -> dict[str, Any]:
        """Which file and which variable values this run uses, and where each value came from."""
        vals = {}
        for k, v in self.variables.items():
            if k in self.overrides:
                how = "set, exact"
            elif k in self.derived:
                how = f"{self.derived[k]} on {self.model_vars.get('llm_layers')} LLM layers"
            else:
                how = "file default"
            vals[k] = {"value": v, "from": how}
        return {"file": self.source, "chosen_for_family": self.model_vars.get("family") if self.chosen_from else None,
                "instead_of": self.chosen_from, "model": {k: self.model_vars.get(k) for k in sorted(self.model_vars)},
                "variables": vals, "sites": [str(s) for s in self.site_order()]}

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
        data["variables"] = {k: self.spec.variables[k] if k in self.derived else v for k, v in self.variables.items()}
        if not data["family_files"]:
            data.pop("family_files")
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
    """Parse and validate pipeline YAML (bounded: see safe_yaml.py); raise PipelineError listing every problem.

    With `model_vars` of a family listed in the file's `family_files`, that file is loaded."""
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
    pipe = build_pipeline(spec, source, overrides or {}, problems, node_lines, model_vars)
    if model_vars and str(model_vars.get("family")) in spec.family_files:
        return pipe.bind_model(model_vars)
    return pipe


def load(path: str | Path, overrides: dict[str, Any] | None = None, model_vars: dict[str, Any] | None = None) -> Pipeline:
    """Load a pipeline file; a relative path that does not exist falls back to the shipped pipeline
    of that name (`pipelines/nuwa.yaml` or `nuwa` from any folder; resources.resolve_pipeline)."""
    p = resolve_pipeline(path)
    if p != Path(path):
        path = p  # the shipped file: its family_files resolve beside it
    if p.is_dir():
        raise PipelineError([Problem(str(path), "is a folder, not a pipeline file")])
    if p.exists() and not p.is_file():
        raise PipelineError([Problem(str(path), "not a regular file (a device, pipe or socket?); give a YAML file")])
    if not p.is_file():
        raise PipelineError([Problem(str(path), "no such file, nor a shipped pipeline of that name (shipped: "
                                     + ", ".join(shipped_names()) + ")")])
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
