"""Adapter cost at real shapes: run by hand, not a test.

Random weights at LLaVA-1.5-like shapes (CLIP ViT-L/14-336: 24 layers, 1024 wide, 576 patch
tokens + CLS; Llama hidden 2048 x 16 layers, 16 heads, vocab 32064), bf16 on CPU by default.
For each pipeline: prefill ms, generate ms for N new tokens (greedy, no early stop), peak
memory, the pipeline's node time as % of prefill. Two stock references run without any
adapter, hooks or pipeline:

- `stock`: `model.generate(**inputs)` with all 576 visual tokens;
- `oracle`: the same model fed `budget` visual tokens directly (vision tower + projector,
  then the first `budget` projected rows as `inputs_embeds`), i.e. the cheapest possible run
  at that budget; `prefill / oracle` says how close a pruned run gets to it.

Every number is the median of `--repeats` runs after one warm-up run.

    python benchmarks/bench_adapters.py --repeats 5 --write docs/performance.md
    python benchmarks/bench_adapters.py --pipeline fastv=pipelines/fastv.yaml --set budget=64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nuwa_graph import load, load_text  # noqa: E402
from nuwa_graph.adapters.base import _PeakMemory  # noqa: E402
from nuwa_graph.adapters.llava import LlavaAdapter  # noqa: E402
from nuwa_graph.adapters.tiny import build_processor, synthetic_image  # noqa: E402

TOPK_PRE_LLM = """
name: topk-pre-llm
description: CLS attention of CLIP layer 22 (sum over heads), top `budget` patches enter the LLM (PERC).
variables: {budget: 64}
nodes:
  - name: cls
    type: scorer.cls-attention
    params: {layer: -2, heads: sum}
  - name: topk
    type: selector.top-k
    params: {k: "${budget}"}
    inputs: {scores: cls.scores}
  - name: keep
    type: applier.keep
    params: {site: pre_llm}
    inputs: {selection: topk.selection}
"""

MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def build_model(dtype: torch.dtype, layers: int, hidden: int, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    proc = build_processor(image_size=336)
    tok = proc.tokenizer
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, proc


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_pipeline(adapter, pipe, image, prompt, new_tokens, repeats):
    rows = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        rep = adapter.generate(pipe, [image], [prompt], max_new_tokens=new_tokens, stop_at_eos=False)
        wall = (time.perf_counter() - t0) * 1e3
        if i == 0:
            continue  # warm-up
        rows.append((rep.prefill_ms, wall, rep.peak_memory_bytes, sum(rep.node_ms.values()), rep))
    return {
        "prefill_ms": _median([r[0] for r in rows]),
        "generate_ms": _median([r[1] for r in rows]),
        "peak_bytes": _median([r[2] for r in rows]),
        "node_pct": _median([100.0 * r[3] / r[0] for r in rows]),
        "avg_tokens": rows[-1][4].visual_tokens_avg[0],
        "per_layer": rows[-1][4].visual_tokens_per_layer[0],
        "mem_source": rows[-1][4].peak_memory_source,
    }


@torch.no_grad()
def bench_stock(adapter, image, prompt, new_tokens, repeats, budget: int | None):
    """Stock transformers, no hooks: all tokens (budget None) or `budget` tokens fed directly."""
    from transformers import DynamicCache

    model, proc = adapter.model, adapter.processor
    text = adapter.format_prompt(prompt)
    enc = proc(images=[image], text=[text], return_tensors="pt")
    ids = enc["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().flatten()
    s, e = int(img[0]), int(img[-1]) + 1
    def inputs_embeds():
        feats = model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output[0][:budget]
        emb = model.get_input_embeddings()(ids)
        x = torch.cat([emb[:s], feats.to(emb), emb[e:]])[None]
        return x, torch.ones(1, x.shape[1], dtype=torch.long)

    rows = []
    for i in range(repeats + 1):
        mem = _PeakMemory(adapter.device)
        with mem:
            # prefill: vision tower + projector + one LLM forward with a cache (last logits only)
            t0 = time.perf_counter()
            if budget is None:
                out = model(**enc, cache=DynamicCache(config=model.config.text_config), use_cache=True,
                            logits_to_keep=1)
            else:
                x, am = inputs_embeds()
                out = model(inputs_embeds=x, attention_mask=am, use_cache=True, logits_to_keep=1)
            prefill = (time.perf_counter() - t0) * 1e3
            del out
            # generate: everything again, as one call would (vision, prefill, N greedy tokens)
            t0 = time.perf_counter()
            if budget is None:
                model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            else:
                x, am = inputs_embeds()
                model.generate(inputs_embeds=x, attention_mask=am, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
            wall = (time.perf_counter() - t0) * 1e3
        if i == 0:
            continue
        rows.append((prefill, wall, mem.peak, mem.source))
    return {"prefill_ms": _median([r[0] for r in rows]), "generate_ms": _median([r[1] for r in rows]),
            "peak_bytes": _median([r[2] for r in rows]), "node_pct": 0.0,
            "avg_tokens": float(budget if budget is not None else e - s), "per_layer": None, "mem_source": rows[-1][3]}


def table(results: dict, oracle_prefill: float, args) -> str:
    lines = ["| run | avg visual tokens | prefill ms | generate ms (%d new) | peak memory | node time %% of prefill "
             "| prefill / oracle |" % args.new_tokens, "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['avg_tokens']:.1f} | {r['prefill_ms']:.0f} | {r['generate_ms']:.0f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['node_pct']:.2f} | "
                     f"{r['prefill_ms'] / oracle_prefill:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", action="append", default=[], metavar="NAME=PATH",
                    help="pipeline to time (repeatable); default: vanilla, fastv, visionzip, top-k pre-LLM")
    ap.add_argument("--budget", type=int, default=64, help="visual-token budget (sets variable `budget` where defined)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--llm-layers", type=int, default=16)
    ap.add_argument("--llm-hidden", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", type=Path, default=None, help="replace the results block of this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    specs = [p.split("=", 1) for p in args.pipeline] or [
        ["vanilla", str(ROOT / "pipelines/vanilla.yaml")], ["fastv", str(ROOT / "pipelines/fastv.yaml")],
        ["visionzip", str(ROOT / "pipelines/visionzip.yaml")], ["topk-pre-llm", "builtin"]]
    pipes = {}
    for name, path in specs:
        if path == "builtin":
            pipe = load_text(TOPK_PRE_LLM, "topk-pre-llm", {"budget": args.budget})
        elif not Path(path).is_file():
            print(f"skipping {name}: {path} does not exist", file=sys.stderr)
            continue
        else:
            pipe = load(path)
            if "budget" in pipe.variables:
                pipe = load(path, {"budget": args.budget})
        pipes[name] = pipe

    t0 = time.perf_counter()
    model, proc = build_model(dtype, args.llm_layers, args.llm_hidden)
    adapter = LlavaAdapter(model, proc, name=f"random LLaVA (CLIP-L/14-336 + Llama {args.llm_hidden}x{args.llm_layers})",
                           dtype=dtype, device="cpu")
    print(f"model built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    image, prompt = synthetic_image(336), "What shapes are in the image, and what colour is each one?"

    results = {}
    results["stock (576 tokens, no adapter)"] = bench_stock(adapter, image, prompt, args.new_tokens, args.repeats, None)
    results[f"oracle ({args.budget} tokens fed directly)"] = bench_stock(adapter, image, prompt, args.new_tokens,
                                                                          args.repeats, args.budget)
    print("stock/oracle done", file=sys.stderr)
    for name, pipe in pipes.items():
        results[name] = bench_pipeline(adapter, pipe, image, prompt, args.new_tokens, args.repeats)
        print(f"{name}: {results[name]['prefill_ms']:.0f} ms prefill", file=sys.stderr)
    oracle = results[f"oracle ({args.budget} tokens fed directly)"]["prefill_ms"]
    text = table(results, oracle, args)
    per_layer = "\n".join(f"- {n}: {r['per_layer']}" for n, r in results.items() if r["per_layer"] is not None)
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads, {args.dtype}, median of {args.repeats} after 1 warm-up, "
           f"{time.strftime('%Y-%m-%d %H:%M')}")
    mem = next(iter(results.values()))["mem_source"]
    block = (f"{MARK_START}\n{env}. Peak memory: {mem}.\n\n{text}\n\nVisual tokens per LLM layer:\n{per_layer}\n"
             f"{MARK_END}")
    print(block)
    if args.write:
        doc = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        if MARK_START in doc and MARK_END in doc:
            doc = doc[:doc.index(MARK_START)] + block + doc[doc.index(MARK_END) + len(MARK_END):]
        else:
            doc = doc.rstrip() + "\n\n" + block + "\n"
        args.write.write_text(doc, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
