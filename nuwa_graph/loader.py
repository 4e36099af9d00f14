"""Reading pipeline files: the schema as written, bounded YAML with line numbers, `--set` values.

The bottom of the loading stack: bytes or text -> `PipelineSpec`, the problems found so far and
each node's line. validation.py turns a spec into checked nodes, a graph and sites;
pipeline.py (the public `load`) puts the two together. Neither is imported here, so the
two can use this module without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
)

from .errors import PipelineError, Problem
from .safe_yaml import MAX_FILE_BYTES, YamlLimitError, load_yaml


class NodeSpec(BaseModel):
    """One node as written in the file (params still hold `${...}` expressions)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="unique node name, used in `inputs` as name.port")
    type: str = Field(description="registered node type, e.g. selector.top-k")
    params: dict[str, Any] = Field(default_factory=dict, description="node parameters")
    inputs: dict[str, str | list[str]] = Field(default_factory=dict, description="port -> 'node.port' (or a list)")
    per: Literal["image", "crop", "part"] | None = Field(
        None, description="on an image made of several crops or parts (LLaVA-NeXT, InternVL): run once for the whole "
        "image, once per vision crop (its budget then counts per crop) or once per spatial part; default: spatial "
        "nodes per part, nodes reading a vision signal per crop, the rest per image (nuwa_graph/part_views.py)")
    _line: int | None = PrivateAttr(default=None)  # line of the entry in its file (not dumped)


class PipelineSpec(BaseModel):
    """The whole file as written."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    variables: dict[str, Any] = Field(default_factory=dict)
    seed: StrictInt = 0
    # model family (adapter `family`, e.g. qwen2_5_vl) or family group (`family_group`, e.g.
    # qwen-vl: every Qwen-VL generation) -> file run INSTEAD of this one on such a model (path
    # relative to this file): one method, one file name, the authors' per-family code
    family_files: dict[str, str] = Field(default_factory=dict)
    nodes: list[NodeSpec]


# Variables the MODEL provides: a file may use them in expressions (`${llm_layers // 2}`) so
# one file fits models of any depth. Without a model (validate, draw, docs) they take the
# LLaVA-1.5-7B values below; an adapter rebinds them to its model before running.
# A variable's default may itself be an expression over them (`K: "${scale32(2)}"`): it is
# evaluated for each model; `--set K=3` replaces it by the exact value.
MODEL_VARIABLES: dict[str, Any] = {
    "family": "llava",  # adapter family: llava | qwen2_vl | qwen2_5_vl | qwen3_vl (see family_files)
    # the family's group: models that share a token stream and its signals (qwen-vl: every
    # Qwen-VL generation; llava: CLIP + projector + LLM). `family_files` keys may name one.
    "family_group": "llava",
    "has_cls": True,  # the vision tower has a CLS token (CLS-based methods need one)
    "llm_layers": 32,  # decoder layers of the language model
    "vision_layers": 24,  # layers (blocks) of the vision encoder
    # visual tokens per image on a FIXED patch grid (576 = 24x24 on LLaVA-1.5). Budgets in the
    # shipped files are LLaVA-1.5 counts (64/128/192 of 576) scaled by grid_tokens / 576, so
    # `budget=64` keeps 1/9 of the tokens on any fixed grid (16 of 144 on the embedded model).
    # Models whose grid depends on the image (Qwen2.5-VL) do not bind it: there budget is a count.
    "grid_tokens": 576,
    # tiled families (LLaVA-NeXT, OneVision, InternVL): the most crops (vision passes) an image
    # can have, the tokens of one crop's grid, and the most visual tokens of one image. One-grid
    # families: crops 1, crop_tokens = visual_tokens = the grid. Papers count LLaVA-NeXT
    # budgets over 5 crops (640/320/160 = 5 x 128/64/32), so `budget // crops` is a per-crop count.
    "crops": 1,
    "crop_tokens": 576,
    "visual_tokens": 576,
}


def family_file_of(family_files: dict[str, str], model_vars: dict[str, Any] | None) -> str | None:
    """The file `family_files` names for a model (None: this file itself runs): its family's
    entry, else its family group's. Only the values a caller gives count (never the defaults
    above), so a file is switched for a model only when its adapter says what it is."""
    if not family_files or not model_vars:
        return None
    for key in ("family", "family_group"):
        if key in model_vars and str(model_vars[key]) in family_files:
            return family_files[str(model_vars[key])]
    return None


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


def pydantic_problems(file: str, exc: ValidationError, node: str | None, prefix: str, line: int | None) -> list[Problem]:
    """pydantic's errors as problems: `field` is `prefix` + the error's location."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(Problem(file, msg, node=node, field=f"{prefix}{loc}" if loc else prefix.rstrip("."), line=line))
    return out


def read_spec(text: str | bytes, source: str = "<string>") -> tuple[PipelineSpec, list[Problem], dict[str, int | None]]:
    """The spec in `text` (bounded: see safe_yaml.py), the problems found while reading it
    (node entries are read one by one so that one bad node does not hide the others) and each
    node's line. Raises PipelineError when not even the top level can be read."""
    try:
        raw = load_yaml(text, source)
    except YamlLimitError as exc:
        raise PipelineError([Problem(source, exc.message, line=exc.line)]) from None
    if not isinstance(raw, dict):
        raise PipelineError([Problem(source, "a pipeline file must be a mapping with 'name' and 'nodes'", line=1)])
    problems: list[Problem] = []
    # validate node entries one by one so that one bad node does not hide the others
    raw_nodes = raw.get("nodes")
    lines: dict[int, int | None] = {}
    good_nodes: list[NodeSpec] = []
    if isinstance(raw_nodes, list):
        for i, rn in enumerate(raw_nodes):
            line = getattr(rn, "line", None)
            label = rn.get("name") if isinstance(rn, dict) and isinstance(rn.get("name"), str) else f"#{i}"
            try:
                good_nodes.append(NodeSpec.model_validate(rn))
                lines[len(good_nodes) - 1] = line
            except ValidationError as exc:
                problems += pydantic_problems(source, exc, label, "", line)
        top = {k: v for k, v in raw.items() if k != "nodes"} | {"nodes": []}
    else:
        top = dict(raw)
    try:
        spec = PipelineSpec.model_validate(top)
    except ValidationError as exc:
        raise PipelineError(problems + pydantic_problems(source, exc, None, "", getattr(raw, "line", None))) from None
    spec.nodes = good_nodes
    if not isinstance(raw_nodes, list) or not raw_nodes:
        problems.append(Problem(source, "'nodes' must be a non-empty list of nodes", field="nodes"))
    node_lines: dict[str, int | None] = {}
    for i, s in enumerate(spec.nodes):
        s._line = lines.get(i)
        node_lines.setdefault(s.name, s._line)  # a duplicate name keeps its first entry's line
    return spec, problems, node_lines


def read_bounded(path: Path) -> bytes:
    """The bytes of a pipeline file, refused before reading when over MAX_FILE_BYTES (OSError
    and PipelineError pass through)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PipelineError([Problem(str(path), f"file is {size} bytes; a pipeline file may have at most "
                                     f"{MAX_FILE_BYTES} bytes (limit MAX_FILE_BYTES)")])
    with path.open("rb") as fh:
        return fh.read(MAX_FILE_BYTES + 1)
