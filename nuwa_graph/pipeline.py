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

Reading the file (schema, line numbers, `--set`) is loader.py; checking it is validation.py;
this module puts them together (`load`, `load_text`) into a `Pipeline`. Loading collects every
problem and raises one PipelineError.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import networkx as nx
import yaml
from pydantic import ValidationError

from .errors import PipelineError, Problem
from .loader import MODEL_VARIABLES, NodeSpec, PipelineSpec, family_file_of, parse_override, read_bounded, read_spec
from .resources import resolve_pipeline, shipped_names
from .safe_yaml import YamlLimitError, load_yaml
from .sites import Site
from .validation import CheckedSpec, check_spec

__all__ = ["MODEL_VARIABLES", "NodeSpec", "Pipeline", "PipelineSpec", "load", "load_text", "parse_override"]


@dataclass
class Pipeline(CheckedSpec):
    """A loaded, validated pipeline: node instances, the graph, and each node's site (the
    fields of validation.CheckedSpec), with what the engine and the CLI do with it."""

    chosen_from: str | None = None  # the file whose family_files picked this one for the model

    def bind_model(self, model_vars: dict[str, Any]) -> Pipeline:
        """This pipeline for a model (re-validated with its variables), or itself if they don't matter.

        If `model_vars` name a `family` (or a `family_group`) listed in the file's
        `family_files`, that file is loaded instead, with the same overrides (each must be one
        of its variables)."""
        merged = {**self.model_vars, **model_vars}
        if "family" in model_vars and "family_group" not in model_vars:
            merged["family_group"] = str(model_vars["family"])  # a family named alone is its own group
        other = family_file_of(self.spec.family_files, model_vars)
        if other is not None:
            return self._family_file(other, merged)
        if all(self.model_vars.get(k) == merged.get(k) for k in self.model_vars_used):
            return self
        node_lines = {n.name: n._line for n in self.spec.nodes}
        return _build(self.spec, self.source, dict(self.overrides), [], node_lines, merged)

    def with_overrides(self, overrides: dict[str, Any]) -> Pipeline:
        """This file again with `overrides` added to its own (`--set`); PipelineError if they do not fit."""
        node_lines = {n.name: n._line for n in self.spec.nodes}
        return _build(self.spec, self.source, {**self.overrides, **overrides}, [], node_lines, dict(self.model_vars))

    def _family_file(self, other: str, model_vars: dict[str, Any]) -> Pipeline:
        path = Path(self.source).parent / other
        family = model_vars.get("family")
        try:
            raw = load_yaml(read_bounded(path), str(path))  # bounded like any pipeline file (safe_yaml.py)
            target = PipelineSpec.model_validate({**raw, "nodes": []})
        except (OSError, TypeError, YamlLimitError, ValidationError, PipelineError):
            raise PipelineError([Problem(self.source, f"family_files: {other} (for {family} models) is missing or "
                                         f"not a pipeline file", field="family_files")]) from None
        onward = family_file_of(target.family_files, model_vars)
        if onward is not None:
            raise PipelineError([Problem(self.source, f"family_files: {other} sends {family} models on to "
                                         f"{onward}; name the final file", field="family_files")])
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
                "variables": vals, "sites": [str(s) for s in self.site_order()], "resolved": self.resolved()}

    def resolved(self) -> dict[str, dict[str, Any]]:
        """Per node, what its expressions resolved to for this model (budgets as counts) and its
        `per` when the file gives one (a budget then counts per crop or part)."""
        out: dict[str, dict[str, Any]] = {}
        for ns in self.spec.nodes:
            node = self.nodes.get(ns.name)
            if node is None:
                continue
            vals = {k: getattr(node.params, k) for k, v in ns.params.items() if isinstance(v, str) and "${" in v}
            if ns.per:
                vals["per"] = ns.per
            if vals:
                out[ns.name] = vals
        return out

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
            if n.get("per") is None:
                n.pop("per", None)
        return data

    def dumps(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False, allow_unicode=True)


def _build(spec: PipelineSpec, source: str, overrides: dict[str, Any], problems: list[Problem],
           node_lines: dict[str, int | None], model_vars: dict[str, Any] | None) -> Pipeline:
    """Validate (validation.py; raises PipelineError with every problem) and make the Pipeline."""
    checked = check_spec(spec, source, overrides, problems, node_lines, model_vars)
    return Pipeline(**{f.name: getattr(checked, f.name) for f in fields(checked)})


def load_text(text: str | bytes, source: str = "<string>", overrides: dict[str, Any] | None = None,
              model_vars: dict[str, Any] | None = None) -> Pipeline:
    """Parse and validate pipeline YAML (bounded: see safe_yaml.py); raise PipelineError listing every problem.

    With `model_vars` of a family listed in the file's `family_files`, that file is loaded."""
    spec, problems, node_lines = read_spec(text, source)
    pipe = _build(spec, source, overrides or {}, problems, node_lines, model_vars)
    if model_vars and family_file_of(spec.family_files, model_vars) is not None:
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
        data = read_bounded(p)
    except OSError as exc:
        raise PipelineError([Problem(str(path), f"cannot be read ({exc.strerror or exc})")]) from None
    return load_text(data, str(path), overrides, model_vars)
