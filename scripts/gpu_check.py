"""Check nuwa-graph on a GPU in one command: tiny presets and the embedded model, no network.

    python scripts/gpu_check.py --device cuda --out gpu-check/    # about 8 minutes at most on one GPU
    python scripts/gpu_check.py --device cpu --out /tmp/check     # the same checks on the CPU (CI)

Writes OUT/gpu_check.json (every number) and OUT/gpu_check.md (the tables) and exits 1 when a
check that must hold fails (`problems` in the JSON). The checks (tests/test_cuda.py asserts
the same ones with pytest where CUDA exists):

- agreement: every shipped pipeline each model runs, float32 on the CPU (the reference) vs
  float32 / float16 / bfloat16 on the device: kept-set Jaccard per site (worst sample), same
  greedy tokens, finite logits and finite node scores (Scores outputs of a cache-free
  prefill). Must hold: finite everywhere; float32 on the device keeps the same tokens and
  greedy answer as the CPU (TF32 is switched off for this check). Half precision is reported;
  its kept sets move where scores tie or round (docs/adapters.md, "Half precision");
- attention implementations against sdpa: eager in float32 (the same math), flash_attention_2
  in float16 (when flash-attn imports, on CUDA): Jaccard and largest step-logit difference;
- a left-padded batch of two against each prompt alone (float32 on the device; pipelines with
  no seeded draw: a node's draws are seeded per sample index, so SparseVLM's tie-break noise
  and the random dropper differ with the sample's place in the batch);
- host syncs per decode step: on CUDA `torch.cuda.set_sync_debug_mode("warn")` counts them
  (the explicit timing synchronisations are left out); on a CPU the virtual devices of
  tests/_virtual_devices.py count them (from a checkout). Must be 1: the next token's ids;
- node time with and without the synchronisations around each node (RunReport.node_ms);
- pruned vs oracle prefill: a pre-LLM pipeline's prefill against the stock model fed the same
  number of visual tokens (benchmarks/bench_adapters.py's oracle: LLaVA and the Qwen-VL line).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nuwa_graph import RunError, load  # noqa: E402
from nuwa_graph.adapters import PRESETS, load_adapter  # noqa: E402
from nuwa_graph.adapters.tiny import synthetic_image  # noqa: E402
from nuwa_graph.types import Scores  # noqa: E402

PIPELINES = sorted(str(p.relative_to(ROOT / "pipelines"))[:-5] for p in (ROOT / "pipelines").rglob("*.yaml"))
QUICK_PIPELINES = ["fastv", "pdrop", "nuwa"]
MODELS = sorted(PRESETS) + ["embedded"]
DTYPES = ["float32", "float16", "bfloat16"]
PROMPTS = ["what colour is the square ?", "how many shapes are there in the image ? describe the image"]
NEW_TOKENS = 4


def images(n: int, adapter=None) -> list:
    """n pictures (at most 2): 96 px (fixed grids resize them), or on a model whose resolution is
    dynamic (the Qwen-VL line) 12 x 12 merged tokens (patch x merge px each): room for budgets
    that are counts there (64); on a model that cuts images into crops, two wide pictures of
    different crop counts (tiny_tiled.wide_pictures, as the tests use)."""
    if adapter is not None and adapter.model_variables().get("crops", 1) > 1:
        from nuwa_graph.adapters.tiny_tiled import wide_pictures

        return wide_pictures(adapter.family)[:n]
    vc = getattr(getattr(getattr(adapter, "model", None), "config", None), "vision_config", None)
    merge = getattr(vc, "spatial_merge_size", None)
    size = 12 * int(vc.patch_size) * int(merge) if merge else 96
    return [synthetic_image(size, seed=s) for s in (0, 3)][:n]


def build(model: str, dtype: str, device: str, attn: str = "sdpa"):
    if model == "embedded":
        from nuwa_graph.apps.models import default_model

        model = default_model()
    return load_adapter(model, dtype, device, attn_implementation=attn)


def runnable(adapter, names: list[str]) -> list[tuple[str, Any]]:
    out = []
    for name in names:
        pipe = load(ROOT / "pipelines" / f"{name}.yaml")
        try:
            adapter._bind(pipe)
        except RunError:
            continue  # refused on this family (with a hint); tests/test_pipelines_e2e.py checks it
        out.append((name, pipe))
    return out


def run(adapter, pipe, B: int = 1, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """A generate call (kept sets, tokens, step logits) and a cache-free prefill (node scores)."""
    rep = adapter.generate(pipe, images(B, adapter), PROMPTS[:B], max_new_tokens=new_tokens, stop_at_eos=False,
                           return_logits=True)
    _, r = adapter.forward_logits(pipe, images(B, adapter), PROMPTS[:B])
    scores = [v.values for vals in r.state.values.values() for v in vals if isinstance(v, Scores)]
    logits = torch.stack(rep.step_logits).float()
    return {"kept": [{s: set(ids) for s, ids in k.items()} for k in rep.kept], "tokens": rep.new_tokens,
            "logits": logits, "finite_logits": bool(torch.isfinite(logits).all()),
            "finite_scores": all(bool(torch.isfinite(s.float()).all()) for s in scores),
            "prefill_ms": rep.prefill_ms, "node_ms": sum(rep.node_ms.values())}


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Worst-sample Jaccard per site, same tokens, largest step-logit difference, finiteness."""
    sites = sorted({s for k in ref["kept"] for s in k})
    jac = {s: min(jaccard(r.get(s, set()), g.get(s, set())) for r, g in zip(ref["kept"], got["kept"])) for s in sites}
    n = min(ref["logits"].shape[0], got["logits"].shape[0])
    return {"jaccard": jac, "min_jaccard": min(jac.values(), default=1.0), "same_tokens": ref["tokens"] == got["tokens"],
            "max_logit_diff": float((ref["logits"][:n] - got["logits"][:n]).abs().max()),
            "finite": got["finite_logits"] and got["finite_scores"]}


@contextmanager
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the checks --------------------------------------------------------------------------------------
def check_agreement(device: str, models: list[str], names: list[str], dtypes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        ref_adapter = build(model, "float32", "cpu")
        pipes = runnable(ref_adapter, names)
        refs = {name: run(ref_adapter, pipe) for name, pipe in pipes}
        for dtype in dtypes:
            adapter = build(model, dtype, device)
            with no_tf32():
                for name, pipe in pipes:
                    rows.append({"model": model, "dtype": dtype, "pipeline": name,
                                 **compare(refs[name], run(adapter, pipe))})
            del adapter
    return rows


def flash_available(device: str) -> bool:
    return device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None


def check_attention(device: str, models: list[str], names: list[str]) -> list[dict[str, Any]]:
    """eager against sdpa in float32 (the same math: kept sets must match); flash_attention_2
    against sdpa in float16 (flash runs half precision only) where flash-attn imports."""
    impls = [("eager", "float32")] + ([("flash_attention_2", "float16")] if flash_available(device) else [])
    rows = []
    for model in models:
        for impl, dtype in impls:
            base = build(model, dtype, device)
            adapter = build(model, dtype, device, attn=impl)
            for name, pipe in runnable(base, names):
                with no_tf32():
                    rows.append({"model": model, "dtype": dtype, "implementation": impl, "pipeline": name,
                                 **compare(run(base, pipe), run(adapter, pipe))})
    if not flash_available(device):
        rows.append({"implementation": "flash_attention_2", "skipped": "flash-attn is not importable here"
                     if device.startswith("cuda") else "flash attention needs CUDA"})
    return rows


def check_padded_batch(device: str, models: list[str], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        adapter = build(model, "float32", device)
        for name, pipe in runnable(adapter, names):
            with no_tf32():
                batch = run(adapter, pipe, B=2)
                for b in range(2):
                    rep = adapter.generate(pipe, [images(2, adapter)[b]], [PROMPTS[b]], max_new_tokens=NEW_TOKENS,
                                           stop_at_eos=False, return_logits=True)
                    single = torch.stack(rep.step_logits).float()[:, 0]
                    rows.append({"model": model, "pipeline": name, "sample": b,
                                 "same_kept": {s: set(v) for s, v in rep.kept[0].items()} == batch["kept"][b],
                                 "same_tokens": rep.new_tokens[0] == batch["tokens"][b],
                                 "max_logit_diff": float((single - batch["logits"][:, b]).abs().max())})
    return rows


def syncs_per_step(adapter, pipe, B: int = 1) -> float:
    """Host syncs per decode step: CUDA's sync debug mode, or virtual devices on a CPU. The
    explicit synchronisations the timings make (and node timing) are switched off for this."""
    from nuwa_graph.adapters import generation

    saved_sync, adapter.sync_node_timing = generation.sync, False
    generation.sync = lambda devices: None
    try:
        if adapter.device.type == "cuda":
            counts = []
            for steps in (2, 6):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        adapter.generate(pipe, images(B, adapter), PROMPTS[:B], max_new_tokens=steps, stop_at_eos=False)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
            return (counts[1] - counts[0]) / 4
        sys.path.insert(0, str(ROOT / "tests"))
        from _virtual_devices import device_map, virtual_run

        with virtual_run(adapter, device_map(adapter, None)) as vd:
            adapter.generate(pipe, images(B, adapter), PROMPTS[:B], max_new_tokens=6, stop_at_eos=False)
        per = [sum(e.is_sync for e in vd.select(label=f"step{s}")) for s in range(1, 5)]
        return sum(per) / len(per)
    finally:
        generation.sync = saved_sync
        del adapter.sync_node_timing


def check_syncs(device: str, models: list[str], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        adapter = build(model, "auto", device)
        for name, pipe in runnable(adapter, names):
            for B in (1, 2):
                rows.append({"model": model, "pipeline": name, "batch": B, "syncs_per_step": syncs_per_step(adapter, pipe, B)})
    return rows


def check_node_timing(device: str, models: list[str], names: list[str], repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        adapter = build(model, "auto", device)
        for name, pipe in runnable(adapter, names):
            row: dict[str, Any] = {"model": model, "pipeline": name}
            for synced in (True, False):
                adapter.sync_node_timing = synced
                reps = [adapter.generate(pipe, images(1, adapter), PROMPTS[:1], max_new_tokens=2) for _ in range(repeats + 1)][1:]
                key = "synced" if synced else "not_synced"
                row[f"node_ms_{key}"] = sorted(sum(r.node_ms.values()) for r in reps)[repeats // 2]
                row[f"prefill_ms_{key}"] = sorted(r.prefill_ms for r in reps)[repeats // 2]
            del adapter.sync_node_timing
            rows.append(row)
    return rows


def check_oracle(device: str, models: list[str], names: list[str], repeats: int = 3) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench_adapters")
    rows = []
    for model in models:
        adapter = build(model, "auto", device)
        for name, pipe in runnable(adapter, names):
            reps = [adapter.generate(pipe, images(1, adapter), PROMPTS[:1], max_new_tokens=2) for _ in range(repeats + 1)][1:]
            counts = reps[0].visual_tokens_per_layer[0]
            if len(set(counts)) != 1:
                continue  # prunes inside the LLM: no oracle with the same schedule
            pruned = sorted(r.prefill_ms for r in reps)[repeats // 2]
            oracle = bench.bench_oracle(adapter, images(1, adapter)[0], PROMPTS[0], counts[0], 2, repeats)["prefill_ms"]
            rows.append({"model": model, "pipeline": name, "visual_tokens": counts[0], "prefill_ms": pruned,
                         "oracle_prefill_ms": oracle, "ratio": pruned / oracle if oracle else None})
    return rows


# ---- verdicts and the report -------------------------------------------------------------------------
def problems_of(result: dict[str, Any]) -> list[str]:
    """What must hold (see the module docstring); half-precision drift is reported, not failed."""
    out = []
    for r in result["agreement"]:
        where = f"{r['model']} {r['dtype']} {r['pipeline']}"
        if not r["finite"]:
            out.append(f"agreement: {where}: non-finite logits or scores")
        if r["dtype"] == "float32" and not (r["same_tokens"] and r["min_jaccard"] == 1.0):
            out.append(f"agreement: {where}: float32 on the device differs from the CPU "
                       f"(Jaccard {r['min_jaccard']:.2f}, same tokens {r['same_tokens']})")
    for r in result["attention"]:
        if "skipped" not in r and not r["finite"]:
            out.append(f"attention: {r['model']} {r['implementation']} {r['pipeline']}: non-finite logits or scores")
    for r in result["padded_batch"]:
        if not (r["same_kept"] and r["same_tokens"] and r["max_logit_diff"] <= 1e-3):
            out.append(f"padded batch: {r['model']} {r['pipeline']} sample {r['sample']} differs from the prompt alone")
    for r in result["syncs"]:
        if r["syncs_per_step"] != 1:
            out.append(f"syncs: {r['model']} {r['pipeline']} batch {r['batch']}: {r['syncs_per_step']} per decode step "
                       f"(1 expected: the next token)")
    return out


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return " ".join(f"{k} {fmt(x)}" for k, x in v.items())
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    parts = [f"# nuwa-graph GPU check ({env['device_name']}, {env['date']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, {env['seconds']:.0f} s; models {', '.join(env['models'])}.", "",
             "## Problems", ""] + ([f"- {p}" for p in result["problems"]] or ["none"]) + [
        "", "## Agreement with float32 on the CPU (worst sample; Jaccard of the kept sets per site)", "",
        _table(result["agreement"], ["model", "dtype", "pipeline", "min_jaccard", "jaccard", "same_tokens",
                                     "max_logit_diff", "finite"]),
        "", "## Attention implementations against sdpa", "",
        _table(result["attention"], ["model", "dtype", "implementation", "pipeline", "min_jaccard", "same_tokens",
                                     "max_logit_diff", "finite", "skipped"]),
        "", "## A left-padded batch of two against each prompt alone (float32)", "",
        _table(result["padded_batch"], ["model", "pipeline", "sample", "same_kept", "same_tokens", "max_logit_diff"]),
        "", "## Host syncs per decode step", "",
        _table(result["syncs"], ["model", "pipeline", "batch", "syncs_per_step"]),
        "", "## Node time with and without synchronising around each node (ms, median)", "",
        _table(result["node_timing"], ["model", "pipeline", "node_ms_synced", "node_ms_not_synced",
                                       "prefill_ms_synced", "prefill_ms_not_synced"]),
        "", "## Pruned prefill against the oracle (the stock model fed as many visual tokens)", "",
        _table(result["oracle"], ["model", "pipeline", "visual_tokens", "prefill_ms", "oracle_prefill_ms", "ratio",
                                  "skipped"]), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    ap.add_argument("--quick", action="store_true",
                    help=f"the tiny presets, pipelines {','.join(QUICK_PIPELINES)}, float32 and bfloat16 (a smoke run)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}, but CUDA is not available here (use --device cpu)", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; use {', '.join(MODELS)}", file=sys.stderr)
        return 2
    names, dtypes, few = PIPELINES, DTYPES, ["fastv", "pdrop", "sparsevlm", "nuwa", "visionzip"]
    if args.quick:
        models = [m for m in models if m != "embedded"]
        names, dtypes, few = QUICK_PIPELINES, ["float32", "bfloat16"], QUICK_PIPELINES[:2]
    t0 = time.time()
    torch.manual_seed(0)
    result: dict[str, Any] = {}
    steps = [("agreement", lambda: check_agreement(args.device, models, names, dtypes)),
             ("attention", lambda: check_attention(args.device, models, few)),
             # seeded draws follow the sample's content, so SparseVLM's tie-break noise is checked here too
             ("padded_batch", lambda: check_padded_batch(args.device, models, few[:3])),
             ("syncs", lambda: check_syncs(args.device, models, few[:3])),
             ("node_timing", lambda: check_node_timing(args.device, models, few[:3])),
             ("oracle", lambda: check_oracle(args.device, models, ["random", "visionzip", "nuwa"][: 1 if args.quick else 3]))]
    for key, check in steps:
        print(f"[{time.time() - t0:6.0f} s] {key} ...", file=sys.stderr, flush=True)
        result[key] = check()
    result["problems"] = problems_of(result)
    dev = torch.device(args.device)
    result["environment"] = {
        "device": args.device, "models": models, "pipelines": names, "dtypes": dtypes, "quick": args.quick,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()} CPU",
        "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": time.time() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=sorted) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(f"{len(result['problems'])} problem(s); report: {args.out / 'gpu_check.md'}")
    for p in result["problems"]:
        print(f"  - {p}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
