"""FLOPs accounting (nuwa_graph/flops.py) against hand counts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from nuwa_graph import load
from nuwa_graph.flops import (
    layer_shape,
    llm_decode_step,
    llm_prefill,
    mean_flops,
    run_flops,
    vision_flops,
)

ROOT = Path(__file__).resolve().parent.parent


def test_a_toy_layer_counted_by_hand():
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2,
                          hidden_act="silu")
    # layer 0 sees 2 text + 4 visual = 6 tokens: 6*4*(8+8) + 2*36*4 + 3*6*4*8 = 384 + 288 + 576
    # layer 1 sees 2 + 2 = 4 tokens:              4*4*16   + 2*16*4 + 3*4*4*8 = 256 + 128 + 384
    assert llm_prefill(cfg, 2, [4, 2]) == 1248 + 768
    # one decode step: cache 7 and 5 keys: 1*4*16 + 3*4*8 = 160 linear per layer
    assert llm_decode_step(cfg, 2, [4, 2]) == (160 + 2 * 7 * 4) + (160 + 2 * 5 * 4)
    # grouped-query attention: k and v are narrower (1 kv head of width 2)
    gqa = SimpleNamespace(**{**vars(cfg), "num_key_value_heads": 1})
    assert layer_shape(gqa).prefill(6) == 6 * 4 * (8 + 4) + 288 + 576


def _llava_7b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, hidden_act="silu")
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)


def test_llava_1_5_7b_by_hand():
    """LLaVA-1.5-7B, 35 text tokens + 576 visual, and FastV K=2 R=50% (288 kept)."""
    cfg = _llava_7b()
    d, m, n = 4096, 11008, 35 + 576
    per_layer = 4 * n * d * d + 2 * n * n * d + 3 * n * d * m  # PDrop's count (SwiGLU)
    assert llm_prefill(cfg.text_config, 35, [576] * 32) == 32 * per_layer
    nh = 35 + 288
    fastv = 2 * per_layer + 30 * (4 * nh * d * d + 2 * nh * nh * d + 3 * nh * d * m)
    out = run_flops(cfg, 35, [576, 576] + [288] * 30, 576)
    assert out["llm_prefill"] == fastv
    assert out["vanilla_llm_prefill"] == 32 * per_layer
    # the size of it: 6.48e9 layer weights x 611 tokens = 3.957e12, + 0.098e12 of attention = 4.055 TFLOPs;
    # FastV K=2 R=50% keeps 55.2% of it
    assert 32 * (4 * d * d + 3 * d * m) == pytest.approx(6.476e9, rel=1e-3)
    assert 32 * per_layer / 1e12 == pytest.approx(4.0547, abs=1e-3)
    assert fastv / (32 * per_layer) == pytest.approx(0.5525, abs=1e-3)
    # CLIP-L/14-336: 577 tokens (CLS), plain MLP (2 n d m), 24 layers; patch embedding 576*3*14*14*1024
    dv, mv, nv = 1024, 4096, 577
    tower = 24 * (4 * nv * dv * dv + 2 * nv * nv * dv + 2 * nv * dv * mv) + 576 * 3 * 196 * dv
    assert vision_flops(cfg)["vision"] == tower
    assert vision_flops(cfg)["projector"] == 576 * (dv * d + d * d)
    assert out["prefill"] == tower + 576 * (dv * d + d * d) + fastv
    # first decode step: layer l's cache holds 35 + kept + the new token
    step = sum(4 * d * d + 3 * d * m + 2 * (35 + v + 1) * d for v in [576, 576] + [288] * 30)
    assert out["decode_step"] == step
    assert out["prefill_tflops_saved"] == pytest.approx((32 * per_layer - fastv) / 1e12)


def test_qwen_windows_are_counted_per_window():
    from nuwa_graph.adapters.tiny import tiny_qwen

    cfg = tiny_qwen().model.config
    vc = cfg.vision_config  # d 32, m 64 (gated), depth 4, full attention at 1 and 3, window 16 px, patch 4, merge 2
    rows, cols = 6, 8  # merged grid -> 12 x 16 patches = 192 patches; windows of 2 x 2 merged units (16 patches)
    n, dv = 192, 32
    linear = n * dv * (4 * dv) + 3 * n * dv * 64
    windows = 12 * 16 * 16  # 12 windows of 16 patches: sum of w^2
    tower = 2 * (linear + 2 * windows * dv) + 2 * (linear + 2 * n * n * dv) + n * 3 * 2 * 16 * dv
    assert vc.fullatt_block_indexes == [1, 3]
    assert vision_flops(cfg, (rows, cols))["vision"] == tower
    assert vision_flops(cfg, (rows, cols))["projector"] == 48 * (128 * 128 + 128 * 64)


def test_runs_report_flops(tiny_llava, tiny_image):
    van = tiny_llava.generate(load(ROOT / "pipelines/vanilla.yaml"), [tiny_image], ["what colour is the square ?"],
                              max_new_tokens=1)
    fv = tiny_llava.generate(load(ROOT / "pipelines/fastv.yaml", {"budget": 144, "K": 2}), [tiny_image],
                             ["what colour is the square ?"], max_new_tokens=1)
    assert van.flops[0]["prefill"] == van.flops[0]["vanilla_prefill"]
    assert van.flops[0]["prefill_ratio"] == 1.0
    assert fv.flops[0]["vanilla_prefill"] == van.flops[0]["prefill"]
    assert fv.flops[0]["prefill"] < van.flops[0]["prefill"]
    assert fv.flops[0]["llm_prefill"] == llm_prefill(tiny_llava.model.config.text_config,
                                                     fv.flops[0]["text_tokens"], fv.visual_tokens_per_layer[0])
    assert "flops" in fv.to_dict()


def test_mean_flops_does_not_depend_on_the_order_of_the_samples():
    """Merged shards list their samples in another order than one process; the mean must not move
    (a plain float sum did, in the last bit, for the 16-layer embedded model)."""
    import random

    values = [0.1, 0.7, 1e-3, 0.36086072918796985, 3.3, 1e-9, 0.2] * 7
    rows = [{"prefill_ratio": v, "convention": "x"} for v in values]
    want = mean_flops(rows)
    for seed in range(20):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert mean_flops(shuffled) == want
    assert want["convention"] == "x"


def test_tiled_families_count_the_tower_once_per_crop():
    """LLaVA-NeXT: CLIP and the projector run per crop; InternVL: the projector takes 2x2 units."""
    from nuwa_graph.adapters.tiny import build_tokenizer
    from nuwa_graph.adapters.tiny_tiled import internvl_config, internvl_tokenizer, next_config
    from nuwa_graph.flops import layer_shape, vision_flops

    cfg = next_config(build_tokenizer())
    one = vision_flops(cfg, crops=1)
    five = vision_flops(cfg, crops=5)
    assert five == {k: 5 * v for k, v in one.items()}
    s = layer_shape(cfg.vision_config)
    assert one["vision"] == 4 * s.prefill(65) + 64 * 3 * 14 ** 2 * 64  # 4 layers over CLS + 8x8, patch embedding
    icfg = internvl_config(internvl_tokenizer())
    fl = vision_flops(icfg, crops=7)
    d, d_llm = icfg.vision_config.hidden_size, icfg.text_config.hidden_size
    assert fl["projector"] == 7 * 64 * (4 * d * d_llm + d_llm * d_llm)  # 8x8 units of 4 patches per tile


def test_qwen2_vl_and_qwen3_vl_towers_attend_over_the_whole_image():
    """No windows: every block is full attention. Qwen2-VL's width is embed_dim (its vision
    hidden_size is the merger's output width) with a plain MLP mlp_ratio x wider; Qwen3-VL's
    MLP is plain too and each DeepStack level adds a merger of the main one's size."""
    from nuwa_graph.adapters.tiny_qwen_vl import tiny_qwen2_vl, tiny_qwen3_vl

    rows, cols = 6, 8
    n, dv, units = 192, 32, 48  # 12 x 16 patches of width 32; 48 merged tokens of 4 patches
    layer = n * dv * (4 * dv) + 2 * n * dv * 64 + 2 * n * n * dv
    merger = units * (128 * 128 + 128 * 64)
    q2 = vision_flops(tiny_qwen2_vl().model.config, (rows, cols))
    assert q2 == {"vision": 4 * layer + n * 3 * 2 * 4 * 4 * dv, "projector": merger}
    q3 = vision_flops(tiny_qwen3_vl().model.config, (rows, cols))  # patch 4: 3 x 2 x 4 x 4 inputs per patch
    assert q3 == {"vision": 4 * layer + n * 3 * 2 * 4 * 4 * dv, "projector": 4 * merger}


def test_a_head_dim_wider_than_the_hidden_size_counts_the_query_width():
    """Qwen3-VL-4B's LLM: hidden 2560 but 32 heads x 128 = 4096 query dims, 8 KV heads."""
    from transformers import Qwen3VLTextConfig

    cfg = Qwen3VLTextConfig(hidden_size=2560, num_attention_heads=32, head_dim=128, num_key_value_heads=8,
                            intermediate_size=9728, num_hidden_layers=2)
    d, dq, dkv, m, n = 2560, 4096, 1024, 9728, 100
    assert llm_prefill(cfg, 40, [60, 60]) == 2 * (n * d * (2 * dq + 2 * dkv) + 2 * n * n * dq + 3 * n * d * m)
