"""Load-time validation: one pass that collects every problem, then raises once.

Checks, each naming file, node and field: variables (undefined, unused, bad overrides),
unknown node types (with "did you mean"), params (pydantic, with the path), the signals a
node requests (kind, arguments and site: signals.py), duplicate names, inputs (format,
unknown node or port, listing the ports with their types; missing required; type mismatch,
never converted), cycles (listing their nodes), and sites (a node
that must act at a site earlier than a signal it needs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import ValidationError

from . import registry
from .errors import PipelineError, Problem
from .expressions import ExpressionError, substitute
from .loader import MODEL_VARIABLES, PipelineSpec, pydantic_problems
from .node import Node
from .signals import SignalError
from .sites import MAX_LLM_LAYERS, Site


@dataclass
class CheckedSpec:
    """A spec that passed every check: node instances, the graph, each node's effective site and
    the variable values; pipeline.Pipeline is made from these fields."""

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


def _ports_text(ports) -> str:
    return ", ".join(f"{n}: {p.describe()}" for n, p in ports.items()) or "none"


def check_spec(
    spec: PipelineSpec,
    source: str,
    overrides: dict[str, Any],
    problems: list[Problem],
    node_lines: dict[str, int | None],
    model_vars: dict[str, Any] | None = None,
) -> CheckedSpec:
    """Every check on `spec` (adding to `problems`, found while reading it); PipelineError if any."""
    model_known = model_vars is not None and "llm_layers" in model_vars
    model_vars = {**MODEL_VARIABLES, **(model_vars or {})}
    variables = dict(spec.variables)
    for name in variables:
        if name in model_vars:
            problems.append(Problem(source, f"{name!r} is a model variable (given by the model: "
                                    f"{', '.join(sorted(model_vars))}); rename the pipeline variable",
                                    field=f"variables.{name}"))
    for name, value in overrides.items():
        if name in model_vars and name not in variables:
            problems.append(Problem(source, f"--set {name}: {name!r} is given by the model and cannot be set",
                                    field=f"variables.{name}"))
        elif name not in variables:
            problems.append(Problem(source, f"--set {name}: no such variable (defined: {', '.join(sorted(variables)) or 'none'})"
                                    + _family_hint(spec), field=f"variables.{name}"))
        else:
            variables[name] = value

    used: set[str] = set()
    # defaults written as expressions over the model variables (`K: "${scale32(2)}"`), for this model
    derived: dict[str, str] = {}
    for name, value in spec.variables.items():
        if name in overrides or not (isinstance(value, str) and "${" in value):
            continue
        try:
            variables[name] = substitute(value, dict(model_vars), used)
            derived[name] = value.strip().removeprefix("${").removesuffix("}").strip()
        except ExpressionError as exc:
            depth = f"{model_vars.get('llm_layers')}-layer " if "llm_layers" in value or "scale32" in value else ""
            problems.append(Problem(source, f"the default of {name!r} ({value}) does not fit this {depth}model: {exc}; "
                                    f"give it for this model with --set {name}=...", field=f"variables.{name}"))
    nodes: dict[str, Node] = {}
    seen: set[str] = set()
    accepted: set[int] = set()  # id() of the specs that made `nodes` (not their duplicates)
    for ns in spec.nodes:
        line = ns._line if ns._line is not None else node_lines.get(ns.name)
        # expressions first: a node that is broken otherwise still counts as using its variables
        params = {}
        bad_expr = False
        for key, value in ns.params.items():
            try:
                params[key] = substitute(value, {**model_vars, **variables}, used)
            except ExpressionError as exc:
                problems.append(Problem(source, str(exc), node=ns.name, field=f"params.{key}", line=line))
                bad_expr = True
        if ns.name in seen:
            problems.append(Problem(source, "duplicate node name (names must be unique)", node=ns.name, field="name", line=line))
            continue
        seen.add(ns.name)
        if "." in ns.name or not ns.name:
            problems.append(Problem(source, "node names must be non-empty and contain no '.'", node=ns.name, field="name",
                                    line=line))
        try:
            cls = registry.get(ns.type)
        except KeyError as exc:
            problems.append(Problem(source, str(exc.args[0]), node=ns.name, field="type", line=line))
            continue
        if bad_expr:
            continue
        try:
            node = cls(ns.name, params)
        except ValidationError as exc:
            problems += pydantic_problems(source, exc, ns.name, "params.", line)
            continue
        node.per = ns.per
        if ns.per not in (None, "image") and node.family == "applier":
            problems.append(Problem(source, f"an applier changes the whole image's token set once: per: {ns.per} is "
                                    f"not allowed here (run the nodes before it per {ns.per})", node=ns.name,
                                    field="per", line=line))
        checks = node.check()
        for msg in checks:
            problems.append(Problem(source, msg, node=ns.name, field="params", line=line))
        signal_problem = _signal_problem(source, node, line, spec, variables)
        if signal_problem is not None:
            if not checks:  # the node's own check usually says the same thing in its words
                problems.append(signal_problem)
            continue
        nodes[ns.name] = node
        accepted.add(id(ns))

    for name in variables:
        if name not in used and name not in model_vars:
            problems.append(Problem(source, "variable is defined but no node uses it", field=f"variables.{name}"))

    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    edges: list[tuple[str, str, str, str]] = []
    for ns in spec.nodes:
        if ns.name not in nodes or id(ns) not in accepted:
            continue
        node = nodes[ns.name]
        line = node_lines.get(ns.name)
        for port, refs in ns.inputs.items():
            field = f"inputs.{port}"
            if port not in node.inputs:
                problems.append(Problem(source, f"{node.type_name} has no input {port!r}; its inputs: {_ports_text(node.inputs)}",
                                        node=ns.name, field=field, line=line))
                continue
            want = node.inputs[port]
            ref_list = refs if isinstance(refs, list) else [refs]
            if isinstance(refs, list) and not want.many:
                problems.append(Problem(source, f"input {port!r} takes one 'node.port', got a list of {len(refs)}",
                                        node=ns.name, field=field, line=line))
                continue
            for ref in ref_list:
                src, dot, out = ref.partition(".")
                if not dot or not src or not out:
                    problems.append(Problem(source, f"{ref!r} is not of the form 'node.port'", node=ns.name, field=field,
                                            line=line))
                    continue
                if src not in nodes:
                    if src in seen:
                        continue  # that node is already reported broken
                    problems.append(Problem(source, f"unknown node {src!r}{_close(src, seen)}", node=ns.name, field=field,
                                            line=line))
                    continue
                sn = nodes[src]
                if out not in sn.outputs:
                    problems.append(Problem(source, f"node {src!r} ({sn.type_name}) has no output {out!r}; its outputs: "
                                            f"{_ports_text(sn.outputs)}", node=ns.name, field=field, line=line))
                    continue
                have = sn.outputs[out].type
                if have is not want.type:
                    problems.append(Problem(source, f"type mismatch: {ref} is {have.type_name()} but {port!r} needs "
                                            f"{want.type.type_name()} (no conversion is made)", node=ns.name, field=field,
                                            line=line))
                    continue
                graph.add_edge(src, ns.name)
                edges.append((src, out, ns.name, port))
        for port, p in node.inputs.items():
            if not p.optional and port not in ns.inputs:
                problems.append(Problem(source, f"missing required input {port!r} ({p.describe()}); its inputs: "
                                        f"{_ports_text(node.inputs)}", node=ns.name, field=f"inputs.{port}", line=line))

    cycles = list(nx.simple_cycles(graph))
    for cyc in cycles:
        problems.append(Problem(source, "cycle: " + " -> ".join(cyc + [cyc[0]]), node=cyc[0], field="inputs",
                                line=node_lines.get(cyc[0])))

    sites: dict[str, Site] = {}
    if not cycles:
        pos = {n.name: i for i, n in enumerate(spec.nodes)}
        for name in nx.lexicographical_topological_sort(graph, key=lambda n: pos.get(n, 0)):
            node = nodes[name]
            own = node.site()
            for req in node.requests():
                rs = Site(req.site)
                if own is not None and rs > own:
                    problems.append(Problem(source, f"reads {req.key} at {rs} but acts at {own}", node=name, field="params",
                                            line=node_lines.get(name)))
                own = rs if own is None else max(own, rs) if node.site() is None else own
            ready = max((sites[p] for p in graph.predecessors(name) if p in sites), default=None)
            if own is not None and ready is not None and ready > own:
                late = [p for p in graph.predecessors(name) if sites.get(p) == ready]
                problems.append(Problem(source, f"must act at site {own} but needs {', '.join(repr(x) for x in late)}, "
                                        f"only available at {ready} (a signal cannot be used before it exists)",
                                        node=name, field="inputs", line=node_lines.get(name)))
            site = own if own is not None else ready
            sites[name] = site if site is not None else Site("vision")
        problems += _sites_beyond_model(source, nodes, sites, node_lines, model_vars, model_known, spec, variables)

    if problems:
        raise PipelineError(problems)
    return CheckedSpec(spec=spec, source=source, variables=variables, nodes=nodes, graph=graph, sites=sites, edges=edges,
                       model_vars=model_vars, model_vars_used=frozenset(used & set(model_vars)),
                       overrides={k: v for k, v in overrides.items() if k in spec.variables}, derived=derived)


def _signal_problem(source: str, node: Node, line: int | None, spec: PipelineSpec,
                    variables: dict[str, Any]) -> Problem | None:
    """The node's signal requests, made (and so checked: signals.py) once here; the first one
    that cannot be made, as a problem pointing at the param of the same name where there is one."""
    try:
        node.requests()
    except SignalError as exc:
        params = type(node.params).model_fields
        field = f"params.{exc.arg}" if exc.arg in params else "params"
        msg = exc.message
        if exc.arg in ("layer", "site"):
            msg += "; " + layer_variable_hint(spec, {node.name}, variables)
        return Problem(source, msg, node=node.name, field=field, line=line)
    return None


def _family_hint(spec: PipelineSpec) -> str:
    if not spec.family_files:
        return ""
    return "; " + "; ".join(f"on a {fam} model this file runs {f}: pass that file to set its variables"
                            for fam, f in spec.family_files.items())


def layer_variable_hint(spec: PipelineSpec, node_names: set[str], variables: dict[str, Any]) -> str:
    """'change K (now 40), e.g. --set K=...': the variables in the `site`/`layer` params of these nodes."""
    names: set[str] = set()
    for ns in spec.nodes:
        if ns.name in node_names:
            where = {k: v for k, v in ns.params.items() if k in ("site", "layer")}  # what places a node
            names |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(where)))
    names = {n for n in names if n in variables}
    if not names:
        return "lower the layer in the pipeline file"
    shown = ", ".join(f"{n} (now {variables[n]!r})" for n in sorted(names))
    return f"change {shown}, e.g. --set {min(names)}=..."


def _sites_beyond_model(source, nodes, sites, node_lines, model_vars, model_known, spec, variables) -> list[Problem]:
    """`llm.K` sites past the model's last layer (or, with no model, past any model's)."""
    n_layers = int(model_vars["llm_layers"]) if model_known else MAX_LLM_LAYERS
    what = f"this model has {n_layers} LLM layers" if model_known else \
        f"no supported model has more than {MAX_LLM_LAYERS} LLM layers"
    out = []
    for name, node in nodes.items():
        used = {node.site()} | {Site(r.site) for r in node.requests()}
        for s in sorted(x for x in used if x is not None and x.layer is not None and x.layer >= n_layers):
            out.append(Problem(source, f"site {s} is past the last LLM layer ({what}: llm.0 .. llm.{n_layers - 1}); "
                                       f"{layer_variable_hint(spec, {name}, variables)}",
                               node=name, field="params", line=node_lines.get(name)))
    return out


def _close(name: str, names) -> str:
    import difflib

    c = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {c[0]!r}?" if c else ""
