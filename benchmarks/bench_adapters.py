"""What a pipeline costs on a real-sized model: run by hand, not a test (docs/performance.md).

Two modes:

- `methods` (default): every shipped method at each `--budgets` value (LLaVA-1.5 counts of
  576) plus vanilla and the adaptive methods once; per run: average visual tokens, prefill
  ms, decode ms/token, peak memory, prefill GFLOPs (nuwa_graph/flops.py) and its ratio to
  vanilla, the pipeline nodes' time as % of the prefill, and `prefill / oracle`: the oracle
  is the stock model (no adapter, no hooks) fed the same number of visual tokens directly
  (vision tower + projector, then the first k projected rows as inputs_embeds, greedy
  decoding with a cache), the cheapest possible run at that count. LLaVA-family models only
  for the oracle.
- `growth`: how cost grows with the number of visual tokens (`--tokens 576,1152,2304,2880`,
  as with LLaVA-NeXT / Qwen2.5-VL dynamic resolution), on a Qwen2.5-VL-architecture model
  whose merged grid is sized per row (24x24, 24x48, 48x48, 48x60): vanilla and the
  `--growth-methods` at `--growth-budget`.

Models: `random-llava` (random weights at LLaVA-1.5-like shapes, sizes from the flags; 336
px CLIP grid = 576 tokens), `random-qwen` (growth mode), or any local directory / hub id /
preset `load_adapter` takes. Every number is the median of `--repeats` runs after one
warm-up run.

    # CPU, a small model (the command of docs/performance.md)
    python benchmarks/bench_adapters.py --dtype float32 --repeats 2 --new-tokens 8 --write docs/performance.md
    # a GPU, the real model
    python benchmarks/bench_adapters.py --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16 \\
        --attn-implementation sdpa --repeats 5 --new-tokens 32
    python benchmarks/bench_adapters.py --mode growth --model random-qwen --device cuda --dtype bfloat16
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

from nuwa_graph import RunError, load  # noqa: E402
from nuwa_graph.adapters import load_adapter  # noqa: E402
from nuwa_graph.adapters.llava import LlavaAdapter  # noqa: E402
from nuwa_graph.adapters.loading import to_dtype_as_loaded  # noqa: E402
from nuwa_graph.adapters.report import PeakMemory, model_devices, sync  # noqa: E402
from nuwa_graph.adapters.tiny import build_processor, synthetic_image  # noqa: E402

LLAVA_METHODS = ["vanilla", "random", "downsample", "fastv", "fastv_fix", "pdrop", "sparsevlm", "sparsevlm_v2",
                 "visionzip", "visionzip_fix", "prumerge_plus", "feather", "nuwa"]
QWEN_METHODS = ["vanilla", "random", "downsample", "fastv", "fastv_fix", "pdrop", "feather", "nuwa_qwen"]
PRE_LLM = {"random", "downsample", "visionzip", "visionzip_fix", "prumerge_plus", "nuwa", "nuwa_qwen"}
GROWTH_GRIDS = {576: (24, 24), 1152: (24, 48), 2304: (48, 48), 2880: (48, 60)}
MARKS = {"methods": ("<!-- bench:methods:start -->", "<!-- bench:methods:end -->"),
         "growth": ("<!-- bench:growth:start -->", "<!-- bench:growth:end -->")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- models ------------------------------------------------------------------------------------
def random_llava(dtype, device, attn, args, seed: int = 0) -> LlavaAdapter:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    proc = build_processor(image_size=336)
    tok = proc.tokenizer
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                              image_size=336, patch_size=14, projection_dim=args.vision_hidden)
    text = LlamaConfig(hidden_size=args.llm_hidden, intermediate_size=int(args.llm_hidden * 2.6875),
                       num_hidden_layers=args.llm_layers, num_attention_heads=max(1, args.llm_hidden // 128),
                       num_key_value_heads=max(1, args.llm_hidden // 128), vocab_size=32064,
                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = to_dtype_as_loaded(LlavaForConditionalGeneration(cfg), dtype).eval()  # RoPE tables stay float32
    model.generation_config.pad_token_id = tok.pad_token_id
    name = (f"random LLaVA (CLIP {args.vision_hidden}x{args.vision_layers} on 336 px = 576 tokens, "
            f"Llama {args.llm_hidden}x{args.llm_layers})")
    return LlavaAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def random_qwen(dtype, device, attn, args, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nuwa_graph.adapters.qwen import QwenAdapter, qwen_processor
    from nuwa_graph.adapters.tiny import TINY_SPECIALS, TINY_VISION_TOKENS, tiny_qwen_config, tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS + TINY_VISION_TOKENS}
    cfg = tiny_qwen_config(len(tok), ids, depth=args.vision_layers, patch_size=14, window_size=112,
                           vision_hidden=args.vision_hidden, text_hidden=args.llm_hidden, text_layers=args.llm_layers)
    proc = qwen_processor(tok, patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=3000 * 28 * 28)
    torch.manual_seed(seed)
    with torch.device(device):
        model = to_dtype_as_loaded(Qwen2_5_VLForConditionalGeneration(cfg), dtype).eval()
    name = (f"random Qwen2.5-VL (vision {args.vision_hidden}x{args.vision_layers}, windows 112 px, "
            f"LLM {args.llm_hidden}x{args.llm_layers})")
    return QwenAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def qwen_inputs(adapter, grid, seed: int = 0):
    """A random image whose merged grid is `grid` for this model (unit = patch x merge pixels)."""
    from nuwa_graph.adapters.tiny import tiny_qwen_image, tiny_qwen_prompt

    vc = adapter.model.config.vision_config
    unit = int(vc.patch_size) * int(vc.spatial_merge_size)
    return tiny_qwen_image(grid, seed=seed, unit=unit), tiny_qwen_prompt("describe the image")


# ---- timing ------------------------------------------------------------------------------------
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


WARMUP = 1


def bench_pipeline(adapter, pipe, image, prompt, new_tokens, repeats, batch: int = 1):
    rows = []
    for i in range(repeats + WARMUP):
        rep = adapter.generate(pipe, [image] * batch, [prompt] * batch, max_new_tokens=new_tokens, stop_at_eos=False)
        if i >= WARMUP:
            rows.append(rep)
    last = rows[-1]
    fl = last.flops[0]
    return {
        "prefill_ms": _median([r.prefill_ms for r in rows]),
        "decode_ms": _median([r.decode_ms_per_token for r in rows]),
        "peak_bytes": _median([r.peak_memory_bytes for r in rows]),
        "above_bytes": last.peak_memory_above_start_bytes,
        "node_pct": _median([100.0 * sum(r.node_ms.values()) / r.prefill_ms for r in rows]),
        "avg_tokens": last.visual_tokens_avg[0],
        "per_layer": last.visual_tokens_per_layer[0],
        "gflops": fl.get("prefill", float("nan")) / 1e9,
        "flops_ratio": fl.get("prefill_ratio", float("nan")),
        "decode_gflops": fl.get("decode_step", float("nan")) / 1e9,
        "mem_source": last.peak_memory_source,
    }


@torch.no_grad()
def bench_oracle(adapter, image, prompt, k: int, new_tokens: int, repeats: int):
    """The stock LLaVA model (no hooks) fed the first k projected visual tokens directly."""
    from transformers import DynamicCache

    model, dev = adapter.model, adapter.device
    devices = model_devices(model, dev)  # every GPU of a --device-map model
    enc = adapter.encode([image], [prompt])
    ids = enc.input_ids[0].to(dev)
    where = (ids == model.config.image_token_id).nonzero().flatten()
    s, e = int(where[0]), int(where[-1]) + 1
    pix = enc.vision_inputs["pixel_values"].to(dev, adapter.dtype)
    lm, head, emb = model.model.language_model, model.lm_head, model.get_input_embeddings()
    rows = []
    for i in range(repeats + WARMUP):
        mem = PeakMemory(devices)
        with mem:
            sync(devices)
            t0 = time.perf_counter()
            feats = model.model.get_image_features(pixel_values=pix).pooler_output[0][:k]
            e_ids = emb(ids)
            x = torch.cat([e_ids[:s], feats.to(e_ids), e_ids[e:]])[None]
            cache = DynamicCache(config=model.config.text_config)
            out = lm(inputs_embeds=x, cache=cache, use_cache=True)
            logits = head(out.last_hidden_state[:, -1])
            sync(devices)
            prefill = (time.perf_counter() - t0) * 1e3
            n = x.shape[1]
            steps, t_dec = 0, 0.0
            for step in range(new_tokens - 1):
                t1 = time.perf_counter()
                nxt = logits.argmax(-1)
                pos = torch.full((1, 1), n + step, device=dev, dtype=torch.long)
                out = lm(inputs_embeds=emb(nxt[:, None]), position_ids=pos, cache=cache, use_cache=True)
                logits = head(out.last_hidden_state[:, -1])
                sync(devices)
                t_dec += time.perf_counter() - t1
                steps += 1
        if i >= WARMUP:
            rows.append((prefill, t_dec * 1e3 / max(steps, 1), mem.peak))
    return {"prefill_ms": _median([r[0] for r in rows]), "decode_ms": _median([r[1] for r in rows]),
            "peak_bytes": _median([r[2] for r in rows])}


# ---- the two modes -----------------------------------------------------------------------------
def _pipelines(methods, budgets, qwen: bool):
    out = []
    for name in methods:
        path = ROOT / "pipelines" / f"{name}.yaml"
        if not path.is_file():
            print(f"skipping {name}: {path} does not exist", file=sys.stderr)
            continue
        pipe = load(path)
        if name == "vanilla" or "budget" not in pipe.variables:
            out.append((name, "-" if name == "vanilla" else "adaptive", pipe))
            continue
        for b in budgets:
            over = {"budget": b}
            if qwen and name == "nuwa_qwen":
                over = {}
            out.append((name, str(b), load(path, over)))
            if not over:
                break
    return out


def _fmt_mem(r):
    gib = r["peak_bytes"] / 2**30
    above = r.get("above_bytes")
    return f"{gib:.2f} GiB" + (f" (+{above / 2**20:.0f} MiB)" if above is not None else "")


def _method_row(name, budget, r) -> str:
    pvo = "-" if r["prefill_vs_oracle"] is None else f"{r['prefill_vs_oracle']:.2f}"
    dvo = "-" if r["decode_vs_oracle"] is None else f"{r['decode_vs_oracle']:.2f}"
    return (f"| {name} | {budget} | {r['avg_tokens']:.1f} | {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} | "
            f"{_fmt_mem(r)} | {r['gflops']:.2f} ({100 * r['flops_ratio']:.0f} %) | {r['node_pct']:.2f} | {pvo} | {dvo} |")


def methods_mode(adapter, args) -> str:
    qwen = adapter.family != "llava"
    if qwen:
        image, prompt = qwen_inputs(adapter, GROWTH_GRIDS[576])
    else:
        image, prompt = synthetic_image(336), "What shapes are in the image, and what colour is each one?"
    rows, oracles = [], {}
    for name, budget, pipe in _pipelines(args.methods or (QWEN_METHODS if qwen else LLAVA_METHODS), args.budgets, qwen):
        try:
            r = bench_pipeline(adapter, pipe, image, prompt, args.new_tokens, args.repeats, args.batch)
        except RunError as exc:  # a method this model cannot run (e.g. a layer past the last): say so
            print(f"{name} {budget}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        k = round(r["avg_tokens"])
        wants = args.oracle == "all" or (args.oracle == "pre-llm" and (name in PRE_LLM or name == "vanilla"))
        if not qwen and wants and k not in oracles:
            oracles[k] = bench_oracle(adapter, image, prompt, k, args.new_tokens, args.repeats)
        o = oracles.get(k)
        r["prefill_vs_oracle"] = r["prefill_ms"] / o["prefill_ms"] if o else None
        r["decode_vs_oracle"] = r["decode_ms"] / o["decode_ms"] if o else None
        rows.append((name, budget, r))
        print(_method_row(name, budget, r), flush=True)  # a cut-short run still leaves its rows
    lines = [("| method | budget | avg visual tokens | prefill ms | decode ms/token | peak memory | prefill GFLOPs "
              "(% of vanilla) | node time % of prefill | prefill / oracle | decode / oracle |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_method_row(name, budget, r) for name, budget, r in rows]
    if oracles:
        lines += ["", "Oracle (stock model, k visual tokens fed directly): "
                  + "; ".join(f"k={k}: {o['prefill_ms']:.0f} ms prefill, {o['decode_ms']:.1f} ms/token"
                              for k, o in sorted(oracles.items()))]
    return "\n".join(lines)


def growth_mode(adapter, args) -> str:
    lines = [("| visual tokens | method | avg visual tokens | prefill ms | decode ms/token | peak memory | "
              "prefill GFLOPs (% of vanilla) | node time % |"), "|---|---|---|---|---|---|---|---|"]
    for n in args.tokens:
        grid = GROWTH_GRIDS.get(n)
        if grid is None:
            side = round(n ** 0.5)
            grid = (side, -(-n // side))
        image, prompt = qwen_inputs(adapter, grid)
        for name in ["vanilla"] + args.growth_methods:
            over = {} if name == "vanilla" else {"budget": args.growth_budget}
            pipe = load(ROOT / "pipelines" / f"{name}.yaml", over)
            r = bench_pipeline(adapter, pipe, image, prompt, args.new_tokens, args.repeats, args.batch)
            lines.append(f"| {grid[0] * grid[1]} ({grid[0]}x{grid[1]}) | {name}"
                         f"{'' if name == 'vanilla' else f' {args.growth_budget}'} | {r['avg_tokens']:.1f} | "
                         f"{r['prefill_ms']:.0f} | {r['decode_ms']:.1f} | {_fmt_mem(r)} | {r['gflops']:.2f} "
                         f"({100 * r['flops_ratio']:.0f} %) | {r['node_pct']:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def add_model_args(ap: argparse.ArgumentParser, vision_layers: int | None, vision_hidden: int | None,
                   llm_layers: int, llm_hidden: int, vision_help: str | None = None) -> None:
    """Device, dtype, attention, threads and the random model's sizes: the flags this script and
    profile_nodes.py share (each with its own default sizes)."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    ap.add_argument("--vision-layers", type=int, default=vision_layers, help=vision_help)
    ap.add_argument("--vision-hidden", type=int, default=vision_hidden, help=vision_help)
    ap.add_argument("--llm-layers", type=int, default=llm_layers)
    ap.add_argument("--llm-hidden", type=int, default=llm_hidden)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["methods", "growth"], default="methods")
    ap.add_argument("--model", default=None, help="random-llava (methods default), random-qwen (growth default), "
                                                  "a preset, a local directory or a hub id")
    ap.add_argument("--device-map", default=None, help="e.g. auto (checkpoints only; needs accelerate)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None, help="comma-separated pipeline names")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 192])
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[576, 1152, 2304, 2880])
    ap.add_argument("--growth-methods", type=lambda s: s.split(","), default=["fastv", "pdrop", "downsample"])
    ap.add_argument("--growth-budget", type=int, default=192)
    ap.add_argument("--oracle", choices=["pre-llm", "all", "none"], default="pre-llm",
                    help="which runs get an oracle (pre-llm: vanilla and the methods that prune before the LLM)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None, help="replace this mode's results block of a markdown file")
    add_model_args(ap, vision_layers=None, vision_hidden=None, llm_layers=8, llm_hidden=512,
                   vision_help="random models: default 6 layers x 256 (llava), 4 x 128 (qwen)")
    args = ap.parse_args(argv)
    global WARMUP
    WARMUP = args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = args.model or ("random-qwen" if args.mode == "growth" else "random-llava")
    qwen_sizes = model == "random-qwen"
    args.vision_layers = args.vision_layers or (4 if qwen_sizes else 6)
    args.vision_hidden = args.vision_hidden or (128 if qwen_sizes else 256)
    t0 = time.perf_counter()
    if model == "random-llava":
        adapter = random_llava(dtype, args.device, args.attn_implementation, args)
    elif model == "random-qwen":
        adapter = random_qwen(dtype, args.device, args.attn_implementation, args)
    else:
        adapter = load_adapter(model, dtype, args.device, attn_implementation=args.attn_implementation,
                               device_map=args.device_map)
    if args.mode == "growth" and adapter.family != "qwen2_5_vl":
        ap.error("growth mode needs a Qwen2.5-VL model (dynamic resolution): --model random-qwen or a checkpoint")
    print(f"model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = methods_mode(adapter, args) if args.mode == "methods" else growth_mode(adapter, args)
    dev = (torch.cuda.get_device_name(adapter.device) if adapter.device.type == "cuda"
           else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    env = (f"{adapter.name}; {dev}; torch {torch.__version__}; {args.dtype}, {args.attn_implementation}; batch "
           f"{args.batch}; {args.new_tokens} new tokens; median of {args.repeats} after {args.warmup} warm-up; "
           f"{time.strftime('%Y-%m-%d %H:%M')}")
    start, end = MARKS[args.mode]
    block = f"{start}\n{env}.\n\n{text}\n{end}"
    print(block)
    if args.write:
        doc = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        if start in doc and end in doc:
            doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
        else:
            doc = doc.rstrip() + "\n\n" + block + "\n"
        args.write.write_text(doc, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
