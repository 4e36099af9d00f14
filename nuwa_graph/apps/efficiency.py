"""What a run costs, measured per generate call and summarised with how it was measured.

Each batch of an eval is one `generate` call; `batch_costs(report)` keeps what its RunReport
measured (JSON, so the checkpoint and the shards carry it), and `summarize_costs` turns the
batches of a run into medians and maxima, each with the sentence saying how it was measured
(docs/evaluation.md, "Efficiency"). FLOPs are counted, not timed (nuwa_graph/flops.py).
"""

from __future__ import annotations

import statistics
from typing import Any

SYNC = "synchronised (torch.cuda.synchronize) on CUDA"


def batch_costs(rep: Any) -> dict[str, Any]:
    """One generate call's measurements (RunReport -> JSON)."""
    node = {k: round(float(v), 4) for k, v in (rep.node_ms or {}).items()}
    return {"batch": len(rep.answers), "prefill_ms": round(float(rep.prefill_ms), 4),
            "ttft_ms": round(float(getattr(rep, "ttft_ms", 0.0) or 0.0), 4),
            "decode_ms_per_token": round(float(rep.decode_ms_per_token), 4), "decode_steps": int(rep.decode_steps),
            "method_ms": round(sum(node.values()), 4), "node_ms": node,
            "node_ms_synchronized": bool(getattr(rep, "node_ms_synchronized", False)),
            "peak_memory_bytes": int(rep.peak_memory_bytes), "peak_memory_source": rep.peak_memory_source,
            "peak_memory_above_start_bytes": rep.peak_memory_above_start_bytes,
            "kv_cache_bytes": int(rep.kv_cache_bytes), "device": str(rep.device)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize_costs(batches: list[dict[str, Any]], flops: dict[str, Any] | None = None,
                    neutral: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The cost columns of one run from its batches (see the module docstring). `neutral`: the
    batches of a question-agnostic run's neutral-prompt pass (reported apart: it is what a
    cache of the image's pruned tokens saves)."""
    if not batches:
        return {}
    n = len(batches)
    size = max(b["batch"] for b in batches)
    dev = batches[0].get("device", "")
    decoded = [b for b in batches if b["decode_steps"] > 0]
    nodes: dict[str, list[float]] = {}
    for b in batches:
        for k, v in b["node_ms"].items():
            nodes.setdefault(k, []).append(v)
    peak = max(batches, key=lambda b: b["peak_memory_bytes"])
    out: dict[str, Any] = {
        "batches": n, "batch_size": size,
        "prefill_ms": {"median": _median([b["prefill_ms"] for b in batches]),
                       "how": f"wall time of one generate call's prefill (vision tower, pruning sites, LLM prefill) "
                              f"over up to {size} samples, {SYNC}; median of {n} calls"},
        "ttft_ms": {"median": _median([b["ttft_ms"] for b in batches]),
                    "how": f"from the generate call (processor encoding included) to the first token id on the host, "
                           f"{SYNC}; median of {n} calls"},
        "decode_ms_per_token": {"median": _median([b["decode_ms_per_token"] for b in decoded]),
                                "how": f"decoding wall time / steps after the first token, {SYNC} at every step; "
                                       f"median of {len(decoded)} calls that decoded"},
        "method_ms": {"median": _median([b["method_ms"] for b in batches]),
                      "per_node": {k: _median(v) for k, v in nodes.items()},
                      "how": "sum of the pipeline's node wall times in one generate call (RunReport.node_ms; "
                             "'replay' = issuing recorded Keeps), "
                             + ("on CUDA every GPU synchronised around each node" if all(b.get("node_ms_synchronized")
                                                                                         for b in batches)
                                else "host time only (GPU work not waited for)") + f"; median of {n} calls"},
        "peak_memory_bytes": {"max": peak["peak_memory_bytes"], "above_start": peak.get("peak_memory_above_start_bytes"),
                              "how": f"{peak['peak_memory_source']} during one generate call; largest of {n} calls"},
        "kv_cache_bytes": {"per_sample": round(statistics.fmean(b["kv_cache_bytes"] / b["batch"] for b in batches), 1),
                           "how": "bytes of the KV cache's key and value tensors after decoding, per sample (left "
                                  f"padding included), mean of {n} calls"},
        "device": dev,
    }
    if flops:
        out["flops"] = {k: flops.get(k) for k in ("vision", "projector", "llm_prefill", "prefill", "decode_step",
                                                  "vanilla_prefill", "prefill_ratio", "unavailable") if k in flops}
        out["flops"]["how"] = (f"counted from the model config (nuwa_graph/flops.py; {flops.get('convention', '')}): "
                               "vision tower + projector + LLM prefill at the measured tokens per layer; mean per sample")
    if neutral:
        out["neutral_prefill_ms"] = {"median": _median([b["prefill_ms"] for b in neutral]),
                                     "method_ms": _median([b["method_ms"] for b in neutral]),
                                     "how": "the question-agnostic run's pass over the neutral prompt (what a cache of "
                                            f"the image's pruned tokens saves), {SYNC}; median of {len(neutral)} calls"}
    return out


def cost_cells(eff: dict[str, Any]) -> dict[str, Any]:
    """The flat columns of a run's costs (CSV, tables)."""
    def get(key: str, field: str = "median"):
        v = eff.get(key) or {}
        return v.get(field)
    fl = eff.get("flops") or {}
    return {"prefill_ms": get("prefill_ms"), "ttft_ms": get("ttft_ms"), "decode_ms_per_token": get("decode_ms_per_token"),
            "method_ms": get("method_ms"), "peak_memory_mib": None if get("peak_memory_bytes", "max") is None
            else round(get("peak_memory_bytes", "max") / 2**20, 1),
            "kv_cache_kib_per_sample": None if get("kv_cache_bytes", "per_sample") is None
            else round(get("kv_cache_bytes", "per_sample") / 1024, 1),
            "prefill_gflops": None if fl.get("prefill") is None else round(fl["prefill"] / 1e9, 4)}
