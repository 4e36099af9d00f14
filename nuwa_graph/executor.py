"""The executor: runs a pipeline's nodes site by site over a batch.

An adapter drives a forward pass and calls `run_site(site)` where the pipeline has nodes;
a model-free run (`run_all`) visits every site in order with signals read from a dict.
Each node runs once per sample; its wall time is recorded (hooks, not node code, time it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .context import Keep, SampleContext
from .errors import BudgetError, RunError
from .part_views import image_reader, memo_reader, scope_of, split_to_units, to_block, unit_cells, unit_reader
from .pipeline import Pipeline
from .signals import SignalRequest
from .sites import Site
from .types import Geometry, PositionPlan, Selection, Tokens


@dataclass
class RunState:
    """Everything a run produced: port values per sample, actions, timings."""

    batch: int
    geometries: list[Geometry]
    present: list[torch.Tensor]
    values: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    actions: list[list[Keep]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    order: list[str] = field(default_factory=list)
    done_sites: list[str] = field(default_factory=list)
    # (node, port, sample) -> (per, the node's per-unit outputs in local ids): a node of the same
    # `per` takes these as they are instead of cutting the joined value again (that cut is a host
    # sync per unit on a GPU: how many ids fall in each unit is data)
    unit_values: dict[tuple[str, str, int], tuple[str, list[Any]]] = field(default_factory=dict)
    # per sample, its content key (context.sample_key; a model run gives them): seeded draws are
    # keyed on it, so they do not depend on the batch; None: on the sample's index
    keys: list[str] | None = None
    # waits for the device's queued work; called around each node when set, so a node's time is
    # its own work (on a GPU, work is queued: without it a node's first host read would be timed
    # waiting for the model's layers before it, and its own kernels would be missed)
    sync: Callable[[], None] | None = None

    def actions_at(self, site: Site) -> list[list[Keep]]:
        """Per sample, the Keep actions issued at `site`."""
        return [[a for a in acts if Site(a.site) == site] for acts in self.actions]

    def record(self, site: Site, issued: list[list[Keep]]) -> None:
        """What a visited site leaves: per sample the tokens present after its Keeps, the Keeps."""
        for b in range(self.batch):
            for act in issued[b]:
                self.present[b] = act.ids
            self.actions[b].extend(issued[b])
        self.done_sites.append(site.name)


class Executor:
    """Binds a pipeline to a batch; `run_site` is called in stream order."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.order = pipeline.order()
        self.by_site: dict[Site, list[str]] = defaultdict(list)
        for name in self.order:
            self.by_site[pipeline.sites[name]].append(name)
        self.inputs_of: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for src, out, dst, port in pipeline.edges:
            self.inputs_of[dst].append((port, src, out))

    def model_problems(self, model_vars: dict[str, Any]) -> list[str]:
        """What the nodes say they cannot do on this model (`Node.check_model`), node by node."""
        problems = []
        for name in self.order:
            node = self.pipeline.nodes[name]
            sources: dict[str, list[Any]] = defaultdict(list)
            for port, src, out in self.inputs_of[name]:
                sources[port].append(self.pipeline.nodes[src].outputs[out])
            msg = node.check_model(model_vars, dict(sources))
            if msg:
                problems.append(f"node {name!r} ({node.type_name}): {msg}")
        return problems

    def sites(self) -> list[Site]:
        return sorted(self.by_site)

    def requests(self) -> list[SignalRequest]:
        seen: dict[str, SignalRequest] = {}
        for node in self.pipeline.nodes.values():
            for r in node.requests():
                seen.setdefault(r.key + "@" + r.site, r)
        return list(seen.values())

    def start(self, geometries: list[Geometry], present: list[torch.Tensor] | None = None,
              device: torch.device | str = "cpu", keys: list[str] | None = None) -> RunState:
        """`device`: where the stream's ids live (the model's device); nodes make tensors there.
        `keys`: each sample's content key (`context.sample_key`), which seeded draws follow."""
        if present is None:
            present = [torch.arange(g.n_tokens, device=device) for g in geometries]
        return RunState(batch=len(geometries), geometries=geometries, present=list(present),
                        actions=[[] for _ in geometries], keys=keys)

    def run_site(self, state: RunState, site: Site, reader: Callable[[SignalRequest, int], torch.Tensor] | None,
                 seed: int | None = None) -> list[list[Keep]]:
        """Run every node of `site` for every sample; returns the Keep actions issued here."""
        seed = self.pipeline.seed if seed is None else seed
        issued: list[list[Keep]] = [[] for _ in range(state.batch)]
        for name in self.by_site.get(site, []):
            node = self.pipeline.nodes[name]
            if state.sync is not None:
                state.sync()
            t0 = time.perf_counter()
            outs_per_sample = []
            scope = scope_of(node, getattr(node, "per", None))
            for b in range(state.batch):
                kwargs: dict[str, Any] = {}
                for port, src, out in self.inputs_of[name]:
                    v = state.values[(src, out)][b]
                    if node.inputs[port].many:
                        kwargs.setdefault(port, []).append(v)
                    else:
                        kwargs[port] = v
                geom = state.geometries[b]
                try:
                    several = len(geom.blocks) > 1
                    if scope == "prompt" and several and getattr(node, "per_image_only", False):
                        raise RunError(f"node {name!r} ({node.type_name}) makes values that count from their "
                                       f"image's start; on a prompt of {len(geom.blocks)} images it runs per image, "
                                       f"not per: prompt")
                    if scope == "prompt" or (scope == "image" and not several) or geom.simple:
                        ctx = SampleContext(sample=b, geometry=geom, present=state.present[b], seed=seed,
                                            node_name=name, reader=image_reader(reader, name, getattr(node, "per", None)),
                                            actions=issued[b], key=state.keys[b] if state.keys else None)
                        out_vals = node.run(ctx, **kwargs) or {}
                    else:
                        split = {port: state.unit_values[(src, out, b)][1] for port, src, out in self.inputs_of[name]
                                 if not node.inputs[port].many
                                 and (src, out, b) in state.unit_values
                                 and geom.same_units(state.unit_values[(src, out, b)][0], scope)}
                        out_vals = self._run_units(node, name, scope, state, b, site, kwargs, reader, seed, issued[b],
                                                   split)
                except BudgetError as exc:  # the same data, now naming the node
                    raise exc.at(name, f"node {name!r} ({node.type_name}) failed on sample {b} at site {site}") from exc
                except RunError:
                    raise
                except Exception as exc:
                    raise RunError(f"node {name!r} ({node.type_name}) failed on sample {b} at site {site}: "
                                   f"{type(exc).__name__}: {exc}") from exc
                missing = set(node.outputs) - set(out_vals)
                if missing:
                    raise RunError(f"node {name!r} ({node.type_name}) did not produce output(s) {sorted(missing)}")
                outs_per_sample.append(out_vals)
            for port in node.outputs:
                state.values[(name, port)] = [o[port] for o in outs_per_sample]
            if state.sync is not None:
                state.sync()
            state.timings[name] += time.perf_counter() - t0
            state.order.append(name)
        for b in range(state.batch):
            if len(state.geometries[b].blocks) > 1:  # the stream holds each image's tokens in turn
                issued[b][:] = [in_block_order(act, state.geometries[b]) for act in issued[b]]
        state.record(site, issued)
        return issued

    def _run_units(self, node: Any, name: str, scope: str, state: RunState, b: int, site: Site,
                   kwargs: dict[str, Any], reader: Any, seed: int, issued: list[Keep],
                   split: dict[str, list[Any]]) -> dict[str, Any]:
        """Run `node` once per crop or spatial part of sample b's image (part_views.py); `split`:
        inputs already per unit (made by a node of the same `per`), taken as they are."""
        geom = state.geometries[b]
        units = geom.units(scope)
        if not units:
            what = "spatial part (a grid)" if scope == "part" else "vision crop"
            raise RunError(f"node {name!r} ({node.type_name}) runs per {scope}, but this image has no "
                           f"{what}: {geom.describe()}; it cannot run on this model (a spatial node never runs "
                           f"over the flat sequence)")
        untouched = site.name == "vision" and not state.actions[b]
        reader = memo_reader(reader)
        outs = []
        split = {**{port: split_to_units(v, units, port, name) for port, v in kwargs.items() if port not in split},
                 **split}
        presents = (None if untouched else
                    split_to_units(Selection(state.present[b]), units, "present", name, markers=False))
        for i, u in enumerate(units):
            local = {port: split[port][i] for port in kwargs}
            present = unit_cells(u, state.present[b].device) if presents is None else presents[i].ids
            ctx = SampleContext(sample=b, geometry=u.geometry or Geometry(u.shape, geom.image_start), present=present,
                                seed=seed,
                                node_name=name, reader=unit_reader(reader, u, state.present[b], name),
                                actions=issued, unit=u, key=state.keys[b] if state.keys else None)
            outs.append(node.run(ctx, **local) or {})
        for port in outs[0]:
            state.unit_values[(name, port, b)] = (scope, [o[port] for o in outs])
        return {port: to_block([o[port] for o in outs], units, port, name) for port in outs[0]}

    def run_all(self, geometries: list[Geometry], signals: dict[str, Any] | Callable | None = None,
                seed: int | None = None) -> RunState:
        """Model-free run: visit every site in order, signals from a dict (key -> per-sample list)
        or a reader function."""
        state = self.start(geometries)
        reader = signals if callable(signals) or signals is None else _dict_reader(signals)
        for site in self.sites():
            self.run_site(state, site, reader, seed)
        return state


def in_block_order(act: Keep, geom: Geometry) -> Keep:
    """`act` with its tokens ordered image by image (order kept within each image): on a prompt
    of several images each image's kept tokens sit in that image's block of the stream."""
    block_of = getattr(geom, "block_of", None)
    if block_of is None or act.ids.numel() == 0:
        return act
    order = torch.sort(block_of(act.ids.cpu()), stable=True).indices
    if torch.equal(order, torch.arange(order.numel())):
        return act
    dev = order.to(act.ids.device)
    tokens = act.tokens
    if tokens is not None:
        tokens = Tokens(tokens.values[dev.to(tokens.values.device)], tokens.ids[dev], tokens.space)
    pos = act.positions
    if pos is not None:
        pos = PositionPlan(pos.ids[dev.to(pos.ids.device)], pos.offsets[dev.to(pos.offsets.device)], pos.policy,
                           pos.text_follows)
    return replace(act, ids=act.ids[dev], tokens=tokens, positions=pos)


def _dict_reader(signals: dict[str, Any]) -> Callable[[SignalRequest, int], torch.Tensor]:
    def read(req: SignalRequest, sample: int) -> torch.Tensor:
        for key in (req.key + "@" + req.site, req.key, req.kind):
            if key in signals:
                v = signals[key]
                return v[sample] if isinstance(v, (list, tuple)) else v
        raise RunError(f"no tensor given for signal {req.key} at {req.site} (keys given: {', '.join(signals)})")

    return read


def tokens_per_layer(actions: list[Keep], n_visual: int, n_layers: int) -> list[int]:
    """Visual tokens seen by each LLM layer, from the Keep actions of one sample."""
    counts = []
    current = n_visual
    by_rank = sorted(actions, key=lambda a: Site(a.site).rank)
    i = 0
    for layer in range(n_layers):
        here = Site.llm(layer)
        while i < len(by_rank) and Site(by_rank[i].site) <= here:
            current = int(by_rank[i].ids.numel())
            i += 1
        counts.append(current)
    return counts
