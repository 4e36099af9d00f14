"""Record the device and dtype of every signal and every node output of a run (docs/CONTRACTS.md).

`DeviceAudit(adapter)` wraps, for the duration of a `with` block, the adapter's signal
reader and the `run` of every node the executor calls. With `strict_factories=True` a node
body runs with the default device set to `meta`: a tensor the node creates without
`device=` lands on `meta` and either fails to combine with its inputs or shows up as a
meta output, so a CPU-only machine catches what would be a device mismatch on CUDA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nuwa_graph.devices import check_port_value, check_signal
from nuwa_graph.executor import Executor


class DeviceAudit:
    def __init__(self, adapter, strict_factories: bool = True):
        self.adapter = adapter
        self.strict = strict_factories
        self.problems: list[str] = []
        self.signals: list[tuple[str, torch.device, torch.dtype]] = []
        self.outputs: list[tuple[str, str, torch.device]] = []

    def __enter__(self):
        adapter, audit = self.adapter, self
        device, dtype = adapter.device, adapter.dtype
        orig_reader = adapter._reader

        def reader_factory(r):
            read = orig_reader(r)

            def wrapped(req, b):
                with torch.device(device):  # the adapter's own code runs as it would
                    v = read(req, b)
                audit.problems += check_signal(req.kind, v, device, dtype)
                if isinstance(v, torch.Tensor):
                    audit.signals.append((req.kind, v.device, v.dtype))
                return v

            return wrapped

        adapter._reader = reader_factory
        self._orig_run_site = Executor.run_site

        def run_site(ex, state, site, reader, seed=None):
            for name in ex.by_site.get(site, []):
                node = ex.pipeline.nodes[name]
                if "run" not in vars(node):
                    node.run = audit._wrap(node, node.run, device)
            return audit._orig_run_site(ex, state, site, reader, seed)

        Executor.run_site = run_site
        return self

    def _wrap(self, node, run, device):
        audit = self

        def wrapped(ctx, **kwargs):
            with torch.device("meta") if audit.strict else nullcontext():
                out = run(ctx, **kwargs) or {}
            for port, v in out.items():
                audit.problems += check_port_value(f"node {node.name!r} ({node.type_name}) output {port}", v, device)
                audit.outputs.append((node.type_name, port, device))
            for a in ctx.actions:
                audit.problems += check_port_value(f"node {node.name!r} Keep", a, device)
            return out

        return wrapped

    def __exit__(self, *exc):
        Executor.run_site = self._orig_run_site
        del self.adapter._reader
        return False
