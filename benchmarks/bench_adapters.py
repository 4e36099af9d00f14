"""What a pipeline costs on a real-sized model: run by hand, not a test (docs/performance.md).

Two modes:

- `methods` (default): every shipped method at each `--budgets` value (LLaVA-1.5 counts of
  576) plus vanilla and the adaptive methods once; per run: average visual tokens, prefill
  ms, decode ms/token, peak memory, prefill GFLOPs (nuwa_graph/flops.py) and its ratio to
  vanilla, the pipeline nodes' time as % of the prefill, and `prefill / oracle`: the oracle
  is the stock model (no adapter, no hooks) fed the same number of visual tokens directly
  (vision tower + projector, then the first k projected rows as inputs_embeds, greedy
  decoding with a cache; on Qwen3-VL the first k rows of each DeepStack level too), the
  cheapest possible run at that count. Also `Stock`: the unmodified model's own `generate`
  (its placeholder scatter, M-RoPE, DeepStack and cache), run in turn with keep-everything
  through the adapter (vanilla), which is compared with it.
- `growth`: how cost grows with the number of visual tokens (`--tokens 576,1152,2304,2880`,
  as with LLaVA-NeXT / Qwen2.5-VL dynamic resolution), on a Qwen2.5-VL-architecture model
  whose merged grid is sized per row (24x24, 24x48, 48x48, 48x60): vanilla and the
  `--growth-methods` at `--growth-budget`.

Models: `random-llava` (random weights at LLaVA-1.5-like shapes, sizes from the flags; 336
px CLIP grid = 576 tokens), `random-llava-next` (LLaVA-NeXT v1.6 token geometry: 336 px crops,
a 640x480 image = 5 crops, 2340 tokens), `random-internvl` (448 px tiles, 256 tokens each, up
to 12 tiles + thumbnail, Qwen3 LLM), `random-llava-onevision` (384 px SigLIP crops, anyres_max_9,
Qwen2 LLM), `random-smolvlm` (512 px SigLIP crops of 64 tokens after the shuffle, up to 4x4 tiles +
the global image, each crop its own run; Llama LLM), `random-qwen` (Qwen2.5-VL; growth mode),
`random-qwen2-vl`, `random-qwen3-vl` (the real classes and structure: patch 14 / 16, Qwen3-VL's
DeepStack levels at 8/27, 16/27, 24/27 of the vision depth, QK-norm, head_dim 128; widths and
depths from the flags; a 24 x 24 merged grid = 576 tokens in methods mode), or any local
directory / hub id / preset `load_adapter` takes. Every number is the median (`--stat min`: the minimum) of `--repeats` runs after
`--warmup` warm-up runs.

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

from nuwa_graph import PipelineError, RunError, load  # noqa: E402
from nuwa_graph.adapters import load_adapter  # noqa: E402
from nuwa_graph.adapters.llava import LlavaAdapter  # noqa: E402
from nuwa_graph.adapters.loading import to_dtype_as_loaded  # noqa: E402
from nuwa_graph.adapters.report import PeakMemory, model_devices, sync  # noqa: E402
from nuwa_graph.adapters.tiny import build_processor, synthetic_image  # noqa: E402

LLAVA_METHODS = ["vanilla", "random", "downsample", "fastv", "fastv_fix", "pdrop", "sparsevlm", "sparsevlm_v2",
                 "visionzip", "visionzip_fix", "prumerge_plus", "feather", "nuwa", "dart", "divprune", "vispruner",
                 "fastervlm", "hiprune", "cdpruner", "gprune", "vtw"]
QWEN_METHODS = ["vanilla", "random", "downsample", "fastv", "fastv_fix", "pdrop", "feather", "nuwa_qwen"]
PRE_LLM = {"random", "downsample", "visionzip", "visionzip_fix", "prumerge_plus", "nuwa", "nuwa_qwen", "divprune",
           "vispruner", "fastervlm", "hiprune", "cdpruner", "gprune"}
GROWTH_GRIDS = {576: (24, 24), 1152: (24, 48), 2304: (48, 48), 2880: (48, 60)}
MARKS = {"methods": ("<!-- bench:methods:start -->", "<!-- bench:methods:end -->"),
         "growth": ("<!-- bench:growth:start -->", "<!-- bench:growth:end -->")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- models ------------------------------------------------------------------------------------
def _clip_llama(args, tok):
    """(CLIP-L/336-shaped vision config, Llama config) at the flags' widths: 576 tokens a crop."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=max(1, args.vision_hidden // 64),
                              image_size=336, patch_size=14, projection_dim=args.vision_hidden)
    text = LlamaConfig(hidden_size=args.llm_hidden, intermediate_size=int(args.llm_hidden * 2.6875),
                       num_hidden_layers=args.llm_layers, num_attention_heads=max(1, args.llm_hidden // 128),
                       num_key_value_heads=max(1, args.llm_hidden // 128), vocab_size=32064,
                       max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    return vision, text


def _random_model(model_cls, cfg, dtype, device, seed: int, pad_token_id=None):
    torch.manual_seed(seed)
    with torch.device(device):
        model = to_dtype_as_loaded(model_cls(cfg), dtype).eval()  # RoPE tables stay float32
    if pad_token_id is not None:
        model.generation_config.pad_token_id = pad_token_id
    return model


def random_llava(dtype, device, attn, args, seed: int = 0) -> LlavaAdapter:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    proc = build_processor(image_size=336)
    tok = proc.tokenizer
    vision, text = _clip_llama(args, tok)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    model = _random_model(LlavaForConditionalGeneration, cfg, dtype, device, seed, tok.pad_token_id)
    name = (f"random LLaVA (CLIP {args.vision_hidden}x{args.vision_layers} on 336 px = 576 tokens, "
            f"Llama {args.llm_hidden}x{args.llm_layers})")
    adapter = LlavaAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)
    # CDPruner's auxiliary CLIP text tower at the real CLIP-L shape (12 layers, width 768), random weights
    from nuwa_graph.adapters.clip_text import build_tiny_clip_text
    from nuwa_graph.adapters.tiny import WORDS

    clip = build_tiny_clip_text(args.vision_hidden, [w for w in WORDS if w], seed, width=768, layers=12, heads=12)
    clip.text_model.to(device=device)
    clip.visual_projection.to(device=device)
    adapter.clip_text = clip
    return adapter


def random_llava_next(dtype, device, attn, args, seed: int = 0):
    """LLaVA-NeXT (v1.6) token geometry at the flags' widths: 336 px crops of 24x24, the v1.6
    pinpoints; a 640x480 image gives 5 crops and 576 + 36 x 49 = 2340 stream tokens."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from nuwa_graph.adapters.llava_next import LlavaNextAdapter
    from nuwa_graph.adapters.tiny_tiled import next_processor

    tok = build_processor().tokenizer
    proc = next_processor(tok, image_size=336)
    vision, text = _clip_llama(args, tok)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=proc.image_processor.image_grid_pinpoints, pad_token_id=tok.pad_token_id)
    model = _random_model(LlavaNextForConditionalGeneration, cfg, dtype, device, seed, tok.pad_token_id)
    name = (f"random LLaVA-NeXT (CLIP {args.vision_hidden}x{args.vision_layers}, 336 px crops, v1.6 pinpoints, "
            f"Llama {args.llm_hidden}x{args.llm_layers})")
    return LlavaNextAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def random_internvl(dtype, device, attn, args, seed: int = 0):
    """InternVL3.5 token geometry at the flags' widths: 448 px tiles of 14 px patches, 256 tokens per
    tile after the pixel shuffle, up to 12 tiles + thumbnail; a Qwen3 LLM with QK-norm."""
    from transformers import InternVLForConditionalGeneration

    from nuwa_graph.adapters.internvl import InternVLAdapter
    from nuwa_graph.adapters.tiny_tiled import internvl_config, internvl_processor, internvl_tokenizer

    tok = internvl_tokenizer()
    proc = internvl_processor(tok, tile=448, units=256, max_patches=12)
    cfg = internvl_config(tok, tile=448, patch=14, vision_hidden=args.vision_hidden, vision_layers=args.vision_layers,
                          text_hidden=args.llm_hidden, text_layers=args.llm_layers)
    model = _random_model(InternVLForConditionalGeneration, cfg, dtype, device, seed)
    name = (f"random InternVL3.5 (InternViT {args.vision_hidden}x{args.vision_layers}, 448 px tiles, "
            f"Qwen3 {args.llm_hidden}x{args.llm_layers})")
    return InternVLAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def random_llava_onevision(dtype, device, attn, args, seed: int = 0):
    """LLaVA-OneVision token geometry at the flags' widths: 384 px SigLIP crops (27x27), the released
    pinpoints (up to 6x6) with anyres_max_9; a Qwen2 LLM."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from nuwa_graph.adapters.llava_onevision import LlavaOnevisionAdapter
    from nuwa_graph.adapters.tiny_tiled import onevision_config, onevision_processor

    proc = onevision_processor(image_size=384, patch=14, aspect="anyres_max_9",
                               pinpoints=LlavaOnevisionImageProcessorPil.image_grid_pinpoints)
    cfg = onevision_config(proc, image_size=384, patch=14, vision_hidden=args.vision_hidden,
                           vision_layers=args.vision_layers, text_hidden=args.llm_hidden, text_layers=args.llm_layers)
    model = _random_model(LlavaOnevisionForConditionalGeneration, cfg, dtype, device, seed)
    name = (f"random LLaVA-OneVision (SigLIP {args.vision_hidden}x{args.vision_layers}, 384 px crops, anyres_max_9, "
            f"Qwen2 {args.llm_hidden}x{args.llm_layers})")
    return LlavaOnevisionAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def random_smolvlm(dtype, device, attn, args, seed: int = 0):
    """SmolVLM-256M / 500M token geometry at the flags' widths: 512 px SigLIP crops of 16 px
    patches, pixel shuffle 4 -> 64 tokens per crop, the longest edge resized to 2048 px (up to
    4x4 tiles + the global image, each crop its own run); a Llama LLM. A 640x480 picture is 4x3
    tiles + global = 13 runs, 832 tokens."""
    from transformers import SmolVLMForConditionalGeneration

    from nuwa_graph.adapters.idefics3 import Idefics3Adapter
    from nuwa_graph.adapters.tiny_idefics3 import smolvlm_config, smolvlm_processor

    proc = smolvlm_processor(tile=512, units=64, longest_edge=2048)
    cfg = smolvlm_config(proc.tokenizer, tile=512, patch=16, scale=4, vision_hidden=args.vision_hidden,
                         vision_layers=args.vision_layers, text_hidden=args.llm_hidden, text_layers=args.llm_layers)
    model = _random_model(SmolVLMForConditionalGeneration, cfg, dtype, device, seed)
    name = (f"random SmolVLM (SigLIP {args.vision_hidden}x{args.vision_layers}, 512 px crops, shuffle 4, "
            f"Llama {args.llm_hidden}x{args.llm_layers})")
    return Idefics3Adapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def random_qwen(dtype, device, attn, args, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nuwa_graph.adapters.qwen import QwenAdapter, qwen_processor
    from nuwa_graph.adapters.tiny import TINY_SPECIALS, TINY_VISION_TOKENS, tiny_qwen_config, tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS + TINY_VISION_TOKENS}
    cfg = tiny_qwen_config(len(tok), ids, depth=args.vision_layers, patch_size=14, window_size=112,
                           vision_hidden=args.vision_hidden, text_hidden=args.llm_hidden, text_layers=args.llm_layers)
    proc = qwen_processor(tok, patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=3000 * 28 * 28)
    model = _random_model(Qwen2_5_VLForConditionalGeneration, cfg, dtype, device, seed)
    name = (f"random Qwen2.5-VL (vision {args.vision_hidden}x{args.vision_layers}, windows 112 px, "
            f"LLM {args.llm_hidden}x{args.llm_layers})")
    return QwenAdapter(model, proc, name=name, dtype=dtype, device=device, attn_implementation=attn)


def random_qwen_line(kind: str, dtype, device, attn, args, seed: int = 0):
    """A random-weight Qwen2-VL (`kind` qwen2_vl) or Qwen3-VL (qwen3_vl) with the real classes
    and structure at the flags' widths and depths (heads of 64 dims in the tower, 128 in the LLM)."""
    import transformers

    from nuwa_graph.adapters.qwen_processing import qwen_processor
    from nuwa_graph.adapters.qwen_vl import Qwen2VLAdapter, Qwen3VLAdapter
    from nuwa_graph.adapters.tiny import TINY_SPECIALS, TINY_VISION_TOKENS, tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS + TINY_VISION_TOKENS}
    heads, dv = max(1, args.llm_hidden // 128), args.vision_hidden
    half = args.llm_hidden // heads // 2
    text = dict(vocab_size=len(tok), hidden_size=args.llm_hidden, intermediate_size=int(args.llm_hidden * 2.6875),
                num_hidden_layers=args.llm_layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=4096, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<pad>"])
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if kind == "qwen2_vl":
        patch, cls, adapter_cls, proc = 14, transformers.Qwen2VLForConditionalGeneration, Qwen2VLAdapter, "Qwen2VLProcessor"
        section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        cfg = transformers.Qwen2VLConfig(
            vision_config=dict(depth=args.vision_layers, embed_dim=dv, hidden_size=args.llm_hidden, mlp_ratio=4,
                               num_heads=max(1, dv // 64), patch_size=patch, spatial_merge_size=2),
            text_config=dict(text, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                    "rope_theta": 1000000.0}), **special)
    else:
        patch, cls, adapter_cls, proc = 16, transformers.Qwen3VLForConditionalGeneration, Qwen3VLAdapter, "Qwen3VLProcessor"
        depth = args.vision_layers
        deepstack = sorted({min(depth - 1, round(depth * f)) for f in (8 / 27, 16 / 27, 24 / 27)})
        section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # [24, 20, 20] at head_dim 128
        cfg = transformers.Qwen3VLConfig(
            vision_config=dict(depth=depth, hidden_size=dv, intermediate_size=4 * dv, num_heads=max(1, dv // 64),
                               patch_size=patch, spatial_merge_size=2, out_hidden_size=args.llm_hidden,
                               num_position_embeddings=2304, deepstack_visual_indexes=deepstack),
            text_config=dict(text, head_dim=128, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                                  "mrope_interleaved": True, "rope_theta": 5000000.0}),
            **special)
    unit = patch * 2
    processor = qwen_processor(tok, patch_size=patch, merge_size=2, min_pixels=unit * unit,
                               max_pixels=3000 * unit * unit, processor_class=proc)
    model = _random_model(cls, cfg, dtype, device, seed)
    name = (f"random {adapter_cls.display_name} (vision {dv}x{args.vision_layers}, patch {patch}"
            + (f", DeepStack after blocks {cfg.vision_config.deepstack_visual_indexes}" if kind == "qwen3_vl" else "")
            + f", LLM {args.llm_hidden}x{args.llm_layers})")
    return adapter_cls(model, processor, name=name, dtype=dtype, device=device, attn_implementation=attn)


def qwen_inputs(adapter, grid, seed: int = 0):
    """A random image whose merged grid is `grid` for this model (unit = patch x merge pixels)."""
    from nuwa_graph.adapters.tiny import tiny_qwen_image, tiny_qwen_prompt

    vc = adapter.model.config.vision_config
    unit = int(vc.patch_size) * int(vc.spatial_merge_size)
    return tiny_qwen_image(grid, seed=seed, unit=unit), tiny_qwen_prompt("describe the image")


# ---- timing ------------------------------------------------------------------------------------
def _median(xs):
    """The statistic of a row's timings: the median (default), or the minimum with `--stat min`
    (the least disturbed run: for a machine that other jobs share)."""
    if not xs:
        return float("nan")
    return min(xs) if STAT == "min" else statistics.median(xs)


WARMUP = 1
STAT = "median"


def bench_pipeline(adapter, pipe, image, prompt, new_tokens, repeats, batch: int = 1, oracle_of=None):
    """A row's runs; with `oracle_of(k)` (a one-run oracle at k visual tokens, k from the first
    run), the oracle runs in turn with the row's runs, so both see the same machine (--interleave)."""
    rows, oracle_rows, oracle = [], [], None
    for i in range(repeats + WARMUP):
        rep = adapter.generate(pipe, [image] * batch, [prompt] * batch, max_new_tokens=new_tokens, stop_at_eos=False)
        if oracle_of is not None and oracle is None:
            oracle = oracle_of(round(rep.visual_tokens_avg[0]))
        o = oracle() if oracle is not None else None
        if i >= WARMUP:
            rows.append(rep)
            oracle_rows.append(o)
    last = rows[-1]
    fl = last.flops[0]
    interleaved = None
    if oracle is not None:
        interleaved = {"prefill_ms": _median([o[0] for o in oracle_rows]), "decode_ms": _median([o[1] for o in oracle_rows]),
                       "peak_bytes": _median([o[2] for o in oracle_rows])}
    return {
        "oracle": interleaved,
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


def _one_run(devices, prefill, step, new_tokens: int) -> tuple[float, float, int]:
    """(prefill ms, decode ms/token, peak memory) of one run: `prefill()` -> (last logits, state)
    is timed as the prefill, then greedy decoding, `step(next ids, state, i)` -> logits, per step;
    `devices`: every device of the model (`model_devices`: all GPUs of a --device-map model)."""
    mem = PeakMemory(devices)
    with mem:
        sync(devices)
        t0 = time.perf_counter()
        logits, state = prefill()
        sync(devices)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        steps, t_dec = 0, 0.0
        for j in range(new_tokens - 1):
            t1 = time.perf_counter()
            logits = step(logits.argmax(-1), state, j)
            sync(devices)
            t_dec += time.perf_counter() - t1
            steps += 1
    return prefill_ms, t_dec * 1e3 / max(steps, 1), mem.peak


def _timed_runs(once, repeats: int):
    """The statistic of `repeats` runs of `once()` after WARMUP."""
    rows = [once() for _ in range(repeats + WARMUP)][WARMUP:]
    return {"prefill_ms": _median([r[0] for r in rows]), "decode_ms": _median([r[1] for r in rows]),
            "peak_bytes": _median([r[2] for r in rows])}


def _oracle_parts(adapter, image, prompt):
    """The encoded prompt, its ids on the model's device, and where its image block starts and ends."""
    model, dev = adapter.model, adapter.device
    enc = adapter.encode([image], [prompt])
    ids = enc.input_ids[0].to(dev)
    where = (ids == model.config.image_token_id).nonzero().flatten()
    return enc, ids, int(where[0]), int(where[-1]) + 1


def bench_oracle(adapter, image, prompt, k: int, new_tokens: int, repeats: int):
    """The oracle at k visual tokens (`oracle_run`), `repeats` runs after WARMUP."""
    return _timed_runs(oracle_run(adapter, image, prompt, k, new_tokens), repeats)


def oracle_run(adapter, image, prompt, k: int, new_tokens: int):
    """One-run function of the family's oracle at k tokens (the LLaVA line or the Qwen-VL line)."""
    qwen = adapter.model_variables().get("family_group") == "qwen-vl"
    return (_oracle_qwen if qwen else _oracle_llava)(adapter, image, prompt, k, new_tokens)


def _oracle_llava(adapter, image, prompt, k: int, new_tokens: int):
    """The stock LLaVA-line model (no hooks; LLaVA-1.5 and the tiled families) fed the first k
    projected visual tokens directly (tiled: the packed crops' rows, in stream order; Idefics3 /
    SmolVLM: the crops' rows in place of the span from the first to the last image token, so the
    few tile markers between its runs go too: a timing reference)."""
    from transformers import DynamicCache

    model, dev = adapter.model, adapter.device
    enc, ids, s, e = _oracle_parts(adapter, image, prompt)
    vision = {name: (v.to(dev, adapter.dtype) if name == "pixel_values" else v.to(dev))
              for name, v in enc.vision_inputs.items()}
    lm, head, emb = adapter.text_model(), model.lm_head, model.get_input_embeddings()

    def prefill():
        pooled = model.model.get_image_features(**vision).pooler_output  # per image rows (tiled: packed)
        feats = (torch.cat(list(pooled)) if isinstance(pooled, (list, tuple))
                 else pooled.reshape(-1, pooled.shape[-1]))[:k]
        e_ids = emb(ids)
        x = torch.cat([e_ids[:s], feats.to(e_ids), e_ids[e:]])[None]
        cache = DynamicCache(config=model.config.text_config)
        out = lm(inputs_embeds=x, cache=cache, use_cache=True)
        return head(out.last_hidden_state[:, -1]), (cache, x.shape[1])

    def step(nxt, state, j):
        cache, n = state
        pos = torch.full((1, 1), n + j, device=dev, dtype=torch.long)
        return head(lm(inputs_embeds=emb(nxt[:, None]), position_ids=pos, cache=cache,
                       use_cache=True).last_hidden_state[:, -1])

    return torch.no_grad()(lambda: _one_run(model_devices(model, dev), prefill, step, new_tokens))


def _oracle_qwen(adapter, image, prompt, k: int, new_tokens: int):
    """The stock Qwen-VL model (no hooks) fed the first k merged visual tokens directly: its
    vision tower and merger on the image, then the text model on [text | k rows | text] with
    contiguous M-RoPE ids (on Qwen3-VL the first k rows of each DeepStack level, added by the
    stock text model), and cached greedy decoding."""
    from transformers import DynamicCache

    model, dev = adapter.model, adapter.device
    enc, ids, s, e = _oracle_parts(adapter, image, prompt)
    pix = enc.vision_inputs["pixel_values"].to(dev, adapter.dtype)
    thw = enc.vision_inputs["image_grid_thw"].to(dev)
    lm, head, emb = model.model.language_model, model.lm_head, model.get_input_embeddings()

    def prefill():
        out = model.model.get_image_features(pixel_values=pix, image_grid_thw=thw)
        feats = out.pooler_output[0][:k]
        e_ids = emb(ids)
        x = torch.cat([e_ids[:s], feats.to(e_ids), e_ids[e:]])[None]
        n = x.shape[1]
        extra = {}
        if getattr(out, "deepstack_features", None):
            mask = torch.zeros(1, n, dtype=torch.bool, device=dev)
            mask[0, s:s + feats.shape[0]] = True
            extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": [f[0][:k] for f in out.deepstack_features]}
        cache = DynamicCache(config=model.config.text_config)
        pos = torch.arange(n, device=dev).view(1, 1, -1).expand(3, 1, -1)
        hs = lm(inputs_embeds=x, position_ids=pos, cache=cache, use_cache=True, **extra).last_hidden_state
        return head(hs[:, -1]), (cache, n)

    def step(nxt, state, j):
        cache, n = state
        pos = torch.full((3, 1, 1), n + j, device=dev, dtype=torch.long)
        return head(lm(inputs_embeds=emb(nxt[:, None]), position_ids=pos, cache=cache,
                       use_cache=True).last_hidden_state[:, -1])

    return torch.no_grad()(lambda: _one_run(model_devices(model, dev), prefill, step, new_tokens))


@torch.no_grad()
def bench_stock(adapter, vanilla, image, prompt, new_tokens: int, repeats: int):
    """The unmodified model's own `generate` on the processor's inputs (its placeholder scatter,
    M-RoPE, DeepStack, cache; greedy) and keep-everything through the adapter (`vanilla`), run
    in turn so that both see the same machine: what the adapter costs next to no adapter at
    all. Stock times come from a clock logits processor (called once a step, after that step's
    forward): prefill = start to the first call, decode ms/token = first to last call / steps;
    the adapter's are its report's."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, dev = adapter.model, adapter.device
    enc = adapter.encode([image], [prompt])
    inputs = {"input_ids": enc.input_ids.to(dev), "attention_mask": enc.attention_mask.to(dev)}
    inputs.update({k: v.to(dev, adapter.dtype) if v.is_floating_point() else v.to(dev)
                   for k, v in enc.vision_inputs.items()})
    inputs.update({k: v.to(dev) for k, v in enc.extras.items() if torch.is_tensor(v)})

    devices = model_devices(model, dev)

    class Clock(LogitsProcessor):
        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            sync(devices)
            self.t.append(time.perf_counter())
            return scores

    rows = []
    for i in range(repeats + WARMUP):
        rep = adapter.generate(vanilla, [image], [prompt], max_new_tokens=new_tokens, stop_at_eos=False)
        clock = Clock()
        sync(devices)
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
        decode = (clock.t[-1] - clock.t[0]) * 1e3 / max(len(clock.t) - 1, 1)
        if i >= WARMUP:
            rows.append(((clock.t[0] - t0) * 1e3, decode, rep.prefill_ms, rep.decode_ms_per_token))
    return {"prefill_ms": _median([r[0] for r in rows]), "decode_ms": _median([r[1] for r in rows]),
            "vanilla_prefill_ms": _median([r[2] for r in rows]), "vanilla_decode_ms": _median([r[3] for r in rows])}


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
            try:
                out.append((name, str(b), load(path, over)))
            except PipelineError as exc:  # a budget this method's file has no entry for (nuwa: 64/128/192)
                print(f"skipping {name} at budget {b}: {str(exc).splitlines()[-1].strip()[:160]}", file=sys.stderr)
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
    qwen = adapter.model_variables().get("family_group") == "qwen-vl"
    if qwen:
        image, prompt = qwen_inputs(adapter, GROWTH_GRIDS[576])
    elif adapter.family != "llava":  # tiled families: a 640x480 picture (LLaVA-NeXT: 2x2 tiles, 5 crops)
        image, prompt = synthetic_image(640).resize((640, 480)), "What shapes are in the image, and what colour is each one?"
    else:
        image, prompt = synthetic_image(336), "What shapes are in the image, and what colour is each one?"
    rows, oracles = [], {}
    for name, budget, pipe in _pipelines(args.methods or (QWEN_METHODS if qwen else LLAVA_METHODS), args.budgets, qwen):
        wants = args.oracle == "all" or (args.oracle == "pre-llm" and (name in PRE_LLM or name == "vanilla"))
        oracle_of = None
        if wants and args.interleave:
            def oracle_of(k):
                return oracle_run(adapter, image, prompt, k, args.new_tokens)
        try:
            r = bench_pipeline(adapter, pipe, image, prompt, args.new_tokens, args.repeats, args.batch, oracle_of)
        except RunError as exc:  # a method this model cannot run (e.g. a layer past the last): say so
            print(f"{name} {budget}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        k = round(r["avg_tokens"])
        if r["oracle"] is not None:  # run in turn with this row (the last such row's is listed below)
            oracles[k] = r["oracle"]
        elif wants and k not in oracles:
            oracles[k] = bench_oracle(adapter, image, prompt, k, args.new_tokens, args.repeats)
        o = r["oracle"] or oracles.get(k)
        r["prefill_vs_oracle"] = r["prefill_ms"] / o["prefill_ms"] if o else None
        r["decode_vs_oracle"] = r["decode_ms"] / o["decode_ms"] if o else None
        rows.append((name, budget, r))
        print(_method_row(name, budget, r), flush=True)  # a cut-short run still leaves its rows
    lines = [("| method | budget | avg visual tokens | prefill ms | decode ms/token | peak memory | prefill GFLOPs "
              "(% of vanilla) | node time % of prefill | prefill / oracle | decode / oracle |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_method_row(name, budget, r) for name, budget, r in rows]
    if any(name == "vanilla" for name, _, _ in rows):
        st = bench_stock(adapter, load(ROOT / "pipelines/vanilla.yaml"), image, prompt, args.new_tokens, args.repeats)
        lines += ["", f"Stock (the unmodified model's own generate, no adapter), run in turn with vanilla through the "
                      f"adapter: stock {st['prefill_ms']:.0f} ms prefill, {st['decode_ms']:.1f} ms/token; vanilla "
                      f"{st['vanilla_prefill_ms']:.0f} ms, {st['vanilla_decode_ms']:.1f} ms/token; prefill / stock "
                      f"{st['vanilla_prefill_ms'] / st['prefill_ms']:.2f}, decode / stock "
                      f"{st['vanilla_decode_ms'] / st['decode_ms']:.2f}"]
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
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall: elapsed time; thread: the CPU time of this thread (with --threads 1, on a CPU): what "
                         "the work costs, without the time spent waiting for a core on a machine shared with other "
                         "jobs; node time and prefill are then both CPU times, so their ratio does not depend on the "
                         "load")


def apply_clock(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--threads and --clock: every timer in the package and here reads `time.perf_counter`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if args.device != "cpu" or torch.get_num_threads() != 1:
            ap.error("--clock thread measures one CPU thread: give --threads 1 (CPU only)")
        time.perf_counter = time.thread_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["methods", "growth"], default="methods")
    ap.add_argument("--model", default=None, help="random-llava (methods default), random-llava-next, random-internvl, "
                                                  "random-llava-onevision, random-smolvlm, random-qwen (growth default), "
                                                  "random-qwen2-vl, random-qwen3-vl, "
                                                  "a preset, a local directory or a hub id")
    ap.add_argument("--device-map", default=None, help="e.g. auto (checkpoints only; needs accelerate)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None, help="comma-separated pipeline names")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 192])
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[576, 1152, 2304, 2880])
    ap.add_argument("--growth-methods", type=lambda s: s.split(","), default=["fastv", "pdrop", "downsample"])
    ap.add_argument("--growth-budget", type=int, default=192)
    ap.add_argument("--oracle", choices=["pre-llm", "all", "none"], default="pre-llm",
                    help="which runs get an oracle (pre-llm: vanilla and the methods that prune before the LLM)")
    ap.add_argument("--interleave", action="store_true",
                    help="run each row's oracle in turn with the row's runs (both see the same machine: for a shared "
                         "machine whose load moves)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic of the timed runs (min: the least disturbed run, on a shared machine)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None, help="replace this mode's results block of a markdown file")
    add_model_args(ap, vision_layers=None, vision_hidden=None, llm_layers=8, llm_hidden=512,
                   vision_help="random models: default 6 layers x 256 (llava), 4 x 128 (qwen)")
    args = ap.parse_args(argv)
    global WARMUP
    WARMUP = args.warmup
    apply_clock(ap, args)
    global STAT
    STAT = args.stat
    dtype = DTYPES[args.dtype]
    model = args.model or ("random-qwen" if args.mode == "growth" else "random-llava")
    qwen_sizes = model in ("random-qwen", "random-qwen2-vl", "random-qwen3-vl")
    args.vision_layers = args.vision_layers or (4 if qwen_sizes else 6)
    args.vision_hidden = args.vision_hidden or (128 if qwen_sizes else 256)
    t0 = time.perf_counter()
    if model == "random-llava":
        adapter = random_llava(dtype, args.device, args.attn_implementation, args)
    elif model in ("random-llava-next", "random-internvl", "random-llava-onevision", "random-smolvlm"):
        build = {"random-llava-next": random_llava_next, "random-internvl": random_internvl,
                 "random-llava-onevision": random_llava_onevision, "random-smolvlm": random_smolvlm}[model]
        adapter = build(dtype, args.device, args.attn_implementation, args)
    elif model == "random-qwen":
        adapter = random_qwen(dtype, args.device, args.attn_implementation, args)
    elif model in ("random-qwen2-vl", "random-qwen3-vl"):
        adapter = random_qwen_line(model[len("random-"):].replace("-", "_"), dtype, args.device,
                                   args.attn_implementation, args)
    else:
        adapter = load_adapter(model, dtype, args.device, attn_implementation=args.attn_implementation,
                               device_map=args.device_map)
    if args.mode == "growth" and adapter.model_variables().get("family_group") != "qwen-vl":
        ap.error("growth mode needs a Qwen-VL model (dynamic resolution): --model random-qwen, random-qwen2-vl, "
                 "random-qwen3-vl or a checkpoint")
    print(f"model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = methods_mode(adapter, args) if args.mode == "methods" else growth_mode(adapter, args)
    dev = (torch.cuda.get_device_name(adapter.device) if adapter.device.type == "cuda"
           else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
           + ("; times are CPU times of the one thread (--clock thread)" if args.clock == "thread" else ""))
    env = (f"{adapter.name}; {dev}; torch {torch.__version__}; {args.dtype}, {args.attn_implementation}; batch "
           f"{args.batch}; {args.new_tokens} new tokens; {args.stat} of {args.repeats} after {args.warmup} warm-up; "
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
