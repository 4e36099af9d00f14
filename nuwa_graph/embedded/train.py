"""Train the embedded LLaVA on the shapes world (the project command; see docs/embedded.md).

Recipe (the prototype's lessons):

1. Vision pre-training (`--vision-steps`): the CLIP tower alone, on patch-level object
   labels (colour x shape x size or background, from hidden_states[-2], the layer LLaVA
   feeds the projector), the patch's own row and column (CLIP features carry their
   position), and a CLS attribute head on the pooled CLS output (which colours, shapes and
   colour-shape pairs are present, how many objects) so that the CLS token, and with it CLS
   attention, means something, as in a real CLIP.
2. LM training (`--lm-steps`): vision tower frozen (as in LLaVA); projector + Llama trained
   on multi-turn conversations about each image (grounding and VQA turns), with the LM loss
   on the answers AND on the question tokens (`--question-weight`), lr 2e-3, and an
   auxiliary loss that makes ONE head (`--att-layer`, `--att-head`: layer 1, head 0) look
   from the end of each question (its '?', 'assistant', ':' and answer positions) at the
   patches of the objects the question is about. Its weight decays linearly to zero at
   `--att-anneal-end` (0.8) of the LM phase; the rest trains without it.

Everything is a function of `--seed`: the model init, the training images (scene indices
of world `seed`), the held-out images (world `seed + 1000003`). `--minutes` is a safety
cap only: the schedules are defined by the step counts, so a run that is not cut short is
reproducible (bit-exact for the same torch build and thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import exact_match
from ..world import shapes as W
from ..world.boxes import box_to_tokens, iou, parse_box
from .build import WEIGHTS_DIR, build_model, load_embedded, pixel_values, save_embedded

EVAL_WORLD_OFFSET = 1_000_003


@dataclass
class TrainConfig:
    out: str = str(WEIGHTS_DIR)
    seed: int = 0
    minutes: float = 150.0            # hard cap on the whole run (both phases, evals, save)
    vision_steps: int = 1200
    lm_steps: int = 6000
    batch: int = 32                   # images per step (both phases)
    vision_lr: float = 1e-3
    lm_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grounding_turns: int = 2          # grounding questions per image in the LM phase
    vqa_turns: int = 2                # VQA questions per image
    question_weight: float = 0.5      # LM loss weight of question tokens (answers: 1)
    att_weight: float = 1.0           # auxiliary attention loss weight at the start of the LM phase
    att_layer: int = 1
    att_head: int = 0
    att_anneal_end: float = 0.8       # fraction of the LM phase where that weight reaches 0
    position_weight: float = 0.5      # vision phase: patch row/col prediction loss weight
    tune_vision: bool = False         # also train the vision tower in the LM phase
    eval_every: int = 500             # LM steps between held-out evals
    eval_n: int = 128                 # held-out grounding and VQA samples per periodic eval
    final_eval_n: int = 1000          # ... for the final eval (after the save -> load round trip)
    save_dtype: str = "float16"
    threads: int = 0                  # torch threads (0 = torch's default)
    dims: dict = field(default_factory=dict)   # model sizes, see build.DEFAULT_DIMS


# --- data ---------------------------------------------------------------------------------------
class Vocab:
    """Fast word -> id for the world's own (space-separated) text; checked against the tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.v = tok.get_vocab()
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.image = self.v["<image>"]

    def ids(self, text: str) -> list[int]:
        return [self.v[w] for w in text.lower().split()]


def _turns(seed: int, index: int, cfg: TrainConfig):
    scene, g_items, v_items = W.samples(seed, index, cfg.grounding_turns, cfg.vqa_turns)
    turns = [(g.question, box_to_tokens(g.box, scene.size, scene.size), [g.target]) for g in g_items]
    turns += [(v.question, v.answer, v.targets) for v in v_items]
    order = np.random.default_rng([seed, index, 2]).permutation(len(turns))
    return scene, [turns[int(k)] for k in order]


def lm_batch(seed: int, indices: list[int], cfg: TrainConfig, vocab: Vocab, grid: int):
    """Token ids, loss weights, attention-supervision rows/targets, pixel values for scenes `indices`."""
    n_img = grid * grid
    seqs, wts, att = [], [], []   # att: (batch row, query position, target distribution over patches)
    images = []
    for b, idx in enumerate(indices):
        scene, turns = _turns(seed, idx, cfg)
        images.append(scene.render()[0])
        cov = scene.patch_coverage()
        ids = [vocab.bos] + vocab.ids("user :") + [vocab.image] * n_img
        w = [0.0] * len(ids)
        first = True
        for q, a, targets in turns:
            if not first:
                ids += vocab.ids("user :")
                w += [0.0, 0.0]
            first = False
            q_ids = vocab.ids(q) + vocab.ids("assistant :")
            a_ids = vocab.ids(a) + [vocab.eos]
            q_start = len(ids)
            ids += q_ids
            w += [cfg.question_weight] * len(q_ids)
            ids += a_ids
            w += [1.0] * len(a_ids)
            if targets:
                t = cov[targets].sum(0).reshape(-1)
                if t.sum() > 0:
                    t = t / t.sum()
                    qmark = q_start + len(q_ids) - 3          # position of '?'
                    for pos in range(qmark, len(ids) - 1):     # '?' .. last answer token
                        att.append((b, pos, t))
        seqs.append(ids)
        wts.append(w)
    L = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), vocab.pad, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    weights = torch.zeros((B, L))
    for b, (s, w) in enumerate(zip(seqs, wts)):
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        weights[b, : len(w)] = torch.tensor(w)
    image_start = 1 + len(vocab.ids("user :"))
    if att:
        att_rows = torch.tensor([(b, p) for b, p, _ in att], dtype=torch.long)
        att_tgt = torch.from_numpy(np.stack([t for _, _, t in att]).astype(np.float32))
    else:
        att_rows, att_tgt = torch.zeros((0, 2), dtype=torch.long), torch.zeros((0, n_img))
    return dict(input_ids=input_ids, attention_mask=mask, weights=weights, att_rows=att_rows, att_tgt=att_tgt,
                image_start=image_start, pixel_values=pixel_values(images))


N_CLS_OUT = len(W.COLOR_NAMES) + len(W.SHAPES) + len(W.COLOR_NAMES) * len(W.SHAPES) + (W.MAX_OBJECTS + 1)


def vision_batch(seed: int, indices: list[int], grid: int):
    imgs, labels, attrs, counts = [], [], [], []
    for idx in indices:
        scene = W.make_scene(seed, idx)
        imgs.append(scene.render()[0])
        labels.append(scene.patch_labels().reshape(-1))
        a = np.zeros(N_CLS_OUT - (W.MAX_OBJECTS + 1), dtype=np.float32)
        for o in scene.objects:
            c, s = W.COLOR_NAMES.index(o.color), W.SHAPES.index(o.shape)
            a[c] = 1
            a[len(W.COLOR_NAMES) + s] = 1
            a[len(W.COLOR_NAMES) + len(W.SHAPES) + c * len(W.SHAPES) + s] = 1
        attrs.append(a)
        counts.append(len(scene.objects))
    return (pixel_values(imgs), torch.from_numpy(np.stack(labels)).long(), torch.from_numpy(np.stack(attrs)),
            torch.tensor(counts))


class VisionHeads(torch.nn.Module):
    """Pre-training heads (discarded after phase 1): patch labels, patch row/col, CLS attributes."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.patch = torch.nn.Linear(d, 1 + W.N_OBJECT_CLASSES)
        self.pos = torch.nn.Linear(d, 2 * grid)
        self.cls = torch.nn.Linear(d, N_CLS_OUT)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# --- evaluation ---------------------------------------------------------------------------------
def eval_set(seed: int, n: int):
    """n held-out grounding and n VQA samples: (image, question, truth, kind) from world seed + offset."""
    ws = seed + EVAL_WORLD_OFFSET
    g, v = [], []
    i = 0
    while len(g) < n or len(v) < n:
        scene, gi, vi = W.samples(ws, i, 1, 1)
        img = scene.render()[0]
        if gi and len(g) < n:
            g.append((img, gi[0].question, gi[0].box, gi[0].kind))
        if vi and len(v) < n:
            v.append((img, vi[0].question, vi[0].answer, vi[0].kind))
        i += 1
    return g, v


@torch.no_grad()
def generate_answers(model, tok, items, max_new_tokens: int, batch: int = 64) -> list[str]:
    from .build import prompt
    out = []
    for s in range(0, len(items), batch):
        chunk = items[s: s + batch]
        enc = tok([prompt(q) for _, q, _, _ in chunk], return_tensors="pt", padding=True)
        enc["input_ids"] = _expand_image(enc["input_ids"], tok, model.config.image_seq_length)
        enc["attention_mask"] = (enc["input_ids"] != tok.pad_token_id).long()
        gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             pixel_values=pixel_values([img for img, _, _, _ in chunk]),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def _expand_image(ids: torch.Tensor, tok, n: int) -> torch.Tensor:
    """Left-padded ids with one <image> -> n <image> placeholders (what LlavaProcessor does)."""
    image = tok.convert_tokens_to_ids("<image>")
    rows = []
    for r in ids.tolist():
        r = [t for t in r if t != tok.pad_token_id]
        k = r.index(image)
        rows.append(r[:k] + [image] * n + r[k + 1:])
    L = max(len(r) for r in rows)
    return torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in rows])


def evaluate(model, tok, g_items, v_items) -> dict:
    """Grounding Acc@0.5 (+ mean IoU, parse rate) and VQA exact match, overall and per kind."""
    model.eval()
    res: dict = {}
    if g_items:
        preds = generate_answers(model, tok, g_items, 5)
        ious = [iou(parse_box(p, img.shape[1], img.shape[0]), box) for p, (img, _, box, _) in zip(preds, g_items)]
        res["grounding_acc50"] = float(np.mean([x >= 0.5 for x in ious]))
        res["grounding_miou"] = float(np.mean(ious))
        res["grounding_parsed"] = float(np.mean([parse_box(p, img.shape[1], img.shape[0]) is not None
                                                 for p, (img, *_) in zip(preds, g_items)]))
        res["grounding_by_kind"] = _by_kind([x >= 0.5 for x in ious], [k for *_, k in g_items])
        res["grounding_examples"] = [(q, p) for (_, q, _, _), p in list(zip(g_items, preds))[:3]]
    if v_items:
        preds = generate_answers(model, tok, v_items, 2)
        ok = [exact_match(p, [a]) for p, (_, _, a, _) in zip(preds, v_items)]
        res["vqa_em"] = float(np.mean(ok))
        res["vqa_by_kind"] = _by_kind(ok, [k for *_, k in v_items])
        res["vqa_examples"] = [(q, p) for (_, q, _, _), p in list(zip(v_items, preds))[:3]]
    return res


SLICE_N = 100  # the fixed check slice: the first 100 grounding and 100 VQA samples of the held-out eval set


def slice_accuracy(path: str | Path | None = None, seed: int = 0, n: int = SLICE_N) -> dict:
    """Grounding Acc@0.5 and VQA EM of a saved model (default: the shipped weights) on the fixed
    slice; docs/embedded.md records the shipped model's values and a test holds it to them."""
    model, proc = load_embedded(path)
    g, v = eval_set(seed, n)
    r = evaluate(model, proc.tokenizer, g, v)
    return {"grounding_acc50": r["grounding_acc50"], "vqa_em": r["vqa_em"], "n": n}


def _by_kind(ok, kinds) -> dict:
    out: dict = {}
    for o, k in zip(ok, kinds):
        out.setdefault(str(k), []).append(float(o))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(out.items())}


# --- training -----------------------------------------------------------------------------------
class _Clock:
    def __init__(self, minutes: float):
        self.t0 = time.time()
        self.limit = minutes * 60

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def over(self, reserve: float = 0.0) -> bool:
        return self.elapsed + reserve > self.limit


# --- one supervised head without eager attention everywhere ------------------------------------
_ATT: dict = {"layer": 1, "head": 0, "on": False, "w": None}
ATTN_NAME = "nuwa_train_attention"


def _train_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Stock sdpa output; at the supervised layer also the post-softmax rows of the supervised head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    if _ATT["on"] and getattr(module, "layer_idx", None) == _ATT["layer"]:
        h = _ATT["head"]
        q, k = query[:, h], key[:, h // getattr(module, "num_key_value_groups", 1)]
        s = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        L, S = s.shape[-2:]
        if attention_mask is None:
            allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
            s = s.masked_fill(~allowed, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask[:, 0, :, :S], float("-inf"))
        else:
            s = s + attention_mask[:, 0, :, :S]
        _ATT["w"] = s.softmax(-1)
    return out, None


def _register_train_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_NAME, _train_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _plain(console, step: int, every: int, text: str):
    """A plain status line every `every` steps when the output is not a terminal (background runs)."""
    if not console.is_terminal and step % every == 0:
        console.print(text, soft_wrap=True, highlight=False, markup=False)


def _progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, refresh_per_second=2)


def train(cfg: TrainConfig, command: str | None = None, console=None) -> dict:
    """Run both phases, save to cfg.out, reload, evaluate; returns (and writes) the training log."""
    from rich.console import Console
    console = console or Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    clock = _Clock(cfg.minutes)
    model, processor = build_model(cfg.seed, **cfg.dims)
    tok = processor.tokenizer
    vocab = Vocab(tok)
    _check_vocab(vocab, cfg)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    d_v = model.config.vision_config.hidden_size
    log: dict = {"command": command, "config": asdict(cfg), "seed": cfg.seed, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "params": sum(p.numel() for p in model.parameters()), "history": [], "evals": [],
                 "supervised_attention_head": {"layer": cfg.att_layer, "head": cfg.att_head,
                                               "weight_start": cfg.att_weight, "zero_from_lm_step":
                                               int(cfg.att_anneal_end * cfg.lm_steps)}}
    g_eval, v_eval = eval_set(cfg.seed, cfg.eval_n)
    images_seen = {"vision": 0, "lm": 0}
    stopped_early = False
    next_index = 0

    # ---- phase 1: vision pre-training ----
    vt = model.model.vision_tower
    heads = VisionHeads(d_v, grid)
    params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    t_phase = time.time()
    with _progress(console) as prog:
        task = prog.add_task("vision", total=cfg.vision_steps, info="")
        vt.train()
        for step in range(cfg.vision_steps):
            if clock.over(reserve=60 + 0.02 * cfg.minutes * 60):
                stopped_early = True
                break
            idx = list(range(next_index, next_index + cfg.batch))
            next_index += cfg.batch
            px, labels, attrs, counts = vision_batch(cfg.seed, idx, grid)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup)
            out = vt(pixel_values=px, output_hidden_states=True)
            h = heads.norm(out.hidden_states[-2][:, 1:])
            l_patch = F.cross_entropy(heads.patch(h).flatten(0, 1), labels.flatten())
            pos = heads.pos(h)
            l_pos = (F.cross_entropy(pos[..., :grid].flatten(0, 1), rows.repeat(len(idx)))
                     + F.cross_entropy(pos[..., grid:].flatten(0, 1), cols.repeat(len(idx))))
            c = heads.cls(out.pooler_output)
            n_attr = N_CLS_OUT - (W.MAX_OBJECTS + 1)
            l_cls = (F.binary_cross_entropy_with_logits(c[:, :n_attr], attrs)
                     + F.cross_entropy(c[:, n_attr:], counts))
            loss = l_patch + l_cls + cfg.position_weight * l_pos
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            images_seen["vision"] += len(idx)
            if step % 20 == 0 or step == cfg.vision_steps - 1:
                rec = {"phase": "vision", "step": step, "t": round(clock.elapsed, 1), "loss": round(loss.item(), 4),
                       "patch": round(l_patch.item(), 4), "cls": round(l_cls.item(), 4), "pos": round(l_pos.item(), 4)}
                log["history"].append(rec)
                ips = images_seen["vision"] / (time.time() - t_phase)
                prog.update(task, info=f"loss {rec['loss']:.3f} patch {rec['patch']:.3f} cls {rec['cls']:.3f} "
                                       f"pos {rec['pos']:.3f} | {ips:.0f} img/s")
                _plain(console, step, 200, f"vision {step}/{cfg.vision_steps} {rec} {ips:.1f} img/s")
            prog.advance(task)
    log["vision_images_per_s"] = round(images_seen["vision"] / max(1e-6, time.time() - t_phase), 2)
    del heads, opt

    # ---- phase 2: LM training ----
    if not cfg.tune_vision:
        for p in vt.parameters():
            p.requires_grad_(False)
    vt.eval()
    _register_train_attention()  # sdpa, plus the rows of the supervised head for the aux loss
    model.set_attn_implementation({"text_config": ATTN_NAME})
    _ATT.update(layer=cfg.att_layer, head=cfg.att_head, on=False, w=None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lm_lr, weight_decay=cfg.weight_decay)
    n_img = grid * grid
    t_phase = time.time()
    try:
        with _progress(console) as prog:
            task = prog.add_task("lm", total=cfg.lm_steps, info="")
            for step in range(cfg.lm_steps if not stopped_early else 0):
                if clock.over(reserve=60 + 0.02 * cfg.minutes * 60):
                    stopped_early = True
                    break
                model.train()
                if not cfg.tune_vision:
                    vt.eval()
                idx = list(range(next_index, next_index + cfg.batch))
                next_index += cfg.batch
                b = lm_batch(cfg.seed, idx, cfg, vocab, grid)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg.lm_steps, cfg.lm_lr, cfg.warmup)
                w_att = cfg.att_weight * max(0.0, 1.0 - step / max(1.0, cfg.att_anneal_end * cfg.lm_steps))
                _ATT["on"] = w_att > 0
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"], use_cache=False)
                logits = out.logits[:, :-1].float()
                tgt = b["input_ids"][:, 1:]
                wt = b["weights"][:, 1:]
                ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view_as(wt)
                l_lm = (ce * wt).sum() / wt.sum()
                ans = (wt == 1.0)
                l_ans = (ce * ans).sum() / ans.sum()
                loss = l_lm
                l_att = torch.zeros(())
                if w_att > 0 and len(b["att_rows"]):
                    a = _ATT["w"][b["att_rows"][:, 0], b["att_rows"][:, 1]]     # (R, L) rows over keys
                    s = b["image_start"]
                    a_img = a[:, s: s + n_img]
                    l_att = -(b["att_tgt"] * torch.log(a_img + 1e-8)).sum(-1).mean()
                    loss = loss + w_att * l_att
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                _ATT.update(on=False, w=None)
                images_seen["lm"] += len(idx)
                if step % 20 == 0 or step == cfg.lm_steps - 1:
                    rec = {"phase": "lm", "step": step, "t": round(clock.elapsed, 1), "loss": round(loss.item(), 4),
                           "lm": round(l_lm.item(), 4), "answer": round(l_ans.item(), 4),
                           "att": round(l_att.item(), 4), "att_w": round(w_att, 4)}
                    log["history"].append(rec)
                    ips = images_seen["lm"] / (time.time() - t_phase)
                    prog.update(task, info=f"lm {rec['lm']:.3f} ans {rec['answer']:.3f} att {rec['att']:.3f}"
                                           f"(w {w_att:.2f}) | {ips:.0f} img/s")
                    _plain(console, step, 200, f"lm {step}/{cfg.lm_steps} {rec} {ips:.1f} img/s")
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.lm_steps:
                    ev = evaluate(model, tok, g_eval, v_eval)
                    ev.update(step=step + 1, t=round(clock.elapsed, 1), images=images_seen["lm"])
                    log["evals"].append(ev)
                    console.print(f"[cyan]eval @ lm step {step + 1}[/]: grounding Acc@0.5 "
                                  f"{ev['grounding_acc50']:.3f} (mIoU {ev['grounding_miou']:.3f}), "
                                  f"VQA EM {ev['vqa_em']:.3f}")
                prog.advance(task)
    finally:
        _ATT.update(on=False, w=None)
    log["lm_images_per_s"] = round(images_seen["lm"] / max(1e-6, time.time() - t_phase), 2)
    for p in model.parameters():
        p.requires_grad_(True)
    model.set_attn_implementation({"text_config": "sdpa"})

    # ---- save, reload, final eval on the saved weights ----
    out_dir = Path(cfg.out)
    log.update(images_seen=images_seen, stopped_early=stopped_early, train_seconds=round(clock.elapsed, 1))
    save_embedded(model, processor, out_dir, dtype=getattr(torch, cfg.save_dtype),
                  extra={"seed": cfg.seed, "supervised_attention_head": log["supervised_attention_head"]})
    model2, proc2 = load_embedded(out_dir)
    g_fin, v_fin = eval_set(cfg.seed, cfg.final_eval_n)
    t_ev = time.time()
    final = evaluate(model2, proc2.tokenizer, g_fin, v_fin)
    final["n"] = cfg.final_eval_n
    final["seconds"] = round(time.time() - t_ev, 1)
    log["final"] = final
    log["minutes"] = round(clock.elapsed / 60, 2)
    log["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1, default=_json_default) + "\n")
    console.print(f"[bold green]done[/] in {log['minutes']:.1f} min: grounding Acc@0.5 {final['grounding_acc50']:.3f}, "
                  f"VQA EM {final['vqa_em']:.3f} (n={cfg.final_eval_n}, saved weights) -> {out_dir}")
    return log


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _check_vocab(vocab: Vocab, cfg: TrainConfig):
    """The fast path (split on spaces) must give exactly the tokenizer's ids."""
    from .build import prompt
    for i in range(20):
        _, turns = _turns(cfg.seed, 10_000_000 + i, cfg)
        q, a, _ = turns[0]
        want = vocab.tok(prompt(q) + " " + a + "</s>").input_ids
        got = [vocab.bos] + vocab.ids("user :") + [vocab.image] + vocab.ids(q) + vocab.ids("assistant :") + vocab.ids(a) + [vocab.eos]
        if want != got:
            raise RuntimeError(f"fast tokenisation differs from the tokenizer for {q!r} -> {a!r}")


# --- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="train_embedded", description="Train the embedded LLaVA on the shapes world.")
    p.add_argument("--out", default=d.out, help="output folder (default: the shipped weights folder)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--minutes", type=float, default=d.minutes, help="hard time cap for the whole run")
    p.add_argument("--vision-steps", type=int, default=d.vision_steps)
    p.add_argument("--lm-steps", type=int, default=d.lm_steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--vision-lr", type=float, default=d.vision_lr)
    p.add_argument("--lm-lr", type=float, default=d.lm_lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps of each phase")
    p.add_argument("--grounding-turns", type=int, default=d.grounding_turns)
    p.add_argument("--vqa-turns", type=int, default=d.vqa_turns)
    p.add_argument("--question-weight", type=float, default=d.question_weight)
    p.add_argument("--att-weight", type=float, default=d.att_weight)
    p.add_argument("--att-layer", type=int, default=d.att_layer)
    p.add_argument("--att-head", type=int, default=d.att_head)
    p.add_argument("--att-anneal-end", type=float, default=d.att_anneal_end)
    p.add_argument("--position-weight", type=float, default=d.position_weight)
    p.add_argument("--tune-vision", action="store_true")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-n", type=int, default=d.eval_n)
    p.add_argument("--final-eval-n", type=int, default=d.final_eval_n)
    p.add_argument("--save-dtype", default=d.save_dtype, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=d.threads)
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    cfg = TrainConfig(**args)
    return train(cfg, command="python scripts/train_embedded.py " + " ".join(argv))
