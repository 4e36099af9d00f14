"""Train the embedded LLaVA on the shapes world (the project command; see docs/embedded.md).

Recipe (issue 14: "trained as LLaVA is"):

- The vision tower is a CLIP-style ViT, pre-trained and then frozen, as LLaVA-1.5 freezes its
  pre-trained CLIP ViT-L/14. By default (`--vision-from`) it is the tower of the shipped model,
  which was pre-trained on patch-level labels and CLS attributes (`--vision-steps` reruns that
  pre-training from scratch instead).
- The projector (LLaVA's 2-layer GELU MLP) and a deep Llama (`dims`, default 16 layers x 128)
  are trained on multi-turn conversations about each image (grounding, VQA and pointing turns)
  with the next-token loss on the answers (weight 1) and the question tokens
  (`--question-weight`). There is NO loss on any attention map: the model learns from text only.
- Grounding is helped through data only: a curriculum from simple to crowded scenes
  (`--curriculum`, the most objects a training scene may have until a fraction of the run) and
  pointing questions (`what is in <x3> <y5> ?` -> `large red circle`, `--point-turns`).

Resumable: the run folder (`--out`) holds `checkpoint/state.pt` (model, optimizer, step,
data position, RNG state, config, log), written every `--ckpt-every` steps, at the session's
time cap (`--minutes`), after `--stop-after` steps and on SIGTERM/SIGINT; `--resume DIR`
continues bit-for-bit (same torch build and thread count). The finished model is saved to
`DIR/model/` (reloaded and evaluated there); the shipped weights folder is written only with
`--out-package`.

Everything is a function of `--seed`: the model init, the training images (scene indices of
world `seed`), the held-out images (world `seed + 1000003`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..apps.data import exact_match
from ..world import shapes as W
from ..world.boxes import box_to_tokens, iou, parse_box
from .build import WEIGHTS_DIR, build_model, load_embedded, pixel_values, save_embedded

EVAL_WORLD_OFFSET = 1_000_003
CHECKPOINT = "checkpoint"
STATE_FILE = "state.pt"
MODEL_DIR = "model"
LOG_FILE = "training_log.json"
RECIPE = "issue14: frozen pre-trained CLIP tower, projector + deep Llama on answers and questions, no attention loss"


@dataclass
class TrainConfig:
    out: str = ""                     # run folder: checkpoint/, model/, training_log.json (required)
    out_package: bool = False         # also copy the finished model into the shipped weights folder
    seed: int = 0
    minutes: float = 0.0              # time cap of this session (0 = none): checkpoint and stop
    stop_after: int = 0               # checkpoint and stop after this many LM steps this session (0 = none)
    vision_from: str = str(WEIGHTS_DIR)  # saved embedded model whose CLIP tower is reused ('' = none)
    vision_steps: int = 0             # pre-train the tower from scratch for this many steps instead
    lm_steps: int = 5000
    batch: int = 32                   # images per step (both phases)
    vision_lr: float = 1e-3
    lm_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 200
    grounding_turns: int = 2          # grounding questions per image
    vqa_turns: int = 2                # VQA questions per image
    point_turns: int = 1              # pointing questions per image ('what is in <x3> <y5> ?')
    question_weight: float = 0.5      # LM loss weight of question tokens (answers: 1)
    curriculum: list = field(default_factory=lambda: [[3, 0.1], [4, 0.2], [5, 0.3]])  # [max objects, until fraction]
    position_weight: float = 0.5      # vision pre-training: patch row/col loss weight
    tune_vision: bool = False         # also train the vision tower in the LM phase (LLaVA does not)
    eval_every: int = 250             # LM steps between short held-out evals (0 = none)
    eval_n: int = 64                  # held-out grounding and VQA samples per periodic eval
    final_eval_n: int = 1000          # ... for the final eval (after the save -> load round trip)
    ckpt_every: int = 100             # LM steps between checkpoints
    ckpt_minutes: float = 10.0        # ... and at least this often in wall-clock minutes (0 = steps only)
    save_dtype: str = "float16"
    threads: int = 0                  # torch threads (0 = torch's default)
    dims: dict = field(default_factory=lambda: {"text_layers": 16})  # model sizes, see build.DEFAULT_DIMS

    def validate(self, fresh: bool = True) -> None:
        """Clear errors for options that cannot work (the CLI shows them as usage errors);
        `fresh`: also check what only a new run reads (the tower to reuse)."""
        def bad(opt, val, want):
            raise ValueError(f"--{opt.replace('_', '-')} {val!r}: {want}")
        if not self.out:
            bad("out", self.out, "the run folder is required (checkpoints, final model and log go there); "
                "the shipped weights folder is written only with --out-package")
        out = Path(self.out).resolve()
        if (out == WEIGHTS_DIR.resolve() or WEIGHTS_DIR.resolve() in out.parents) and not self.out_package:
            bad("out", self.out, f"is inside the shipped weights folder {WEIGHTS_DIR}; use another folder "
                "(add --out-package to copy the finished model there)")
        for name in ("batch", "lm_steps", "ckpt_every", "grounding_turns"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "must be a positive integer")
        for name in ("vision_steps", "vqa_turns", "point_turns", "eval_every", "eval_n", "final_eval_n", "warmup",
                     "stop_after", "threads"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be >= 0")
        for name in ("lm_lr", "vision_lr"):
            if not getattr(self, name) > 0:
                bad(name, getattr(self, name), "must be > 0")
        for name in ("minutes", "ckpt_minutes", "question_weight", "weight_decay"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "must be >= 0")
        if self.vision_steps and self.vision_from:
            bad("vision_steps", self.vision_steps, "pre-trains a new tower; pass --vision-from '' with it "
                "(or 0 steps to reuse the tower of --vision-from)")
        last = 0.0
        for item in self.curriculum:
            if (len(item) != 2 or not W.MIN_OBJECTS <= int(item[0]) <= W.MAX_OBJECTS
                    or not last <= float(item[1]) <= 1.0):
                bad("curriculum", self.curriculum, f"want MAX:UNTIL pairs with MAX in {W.MIN_OBJECTS}..{W.MAX_OBJECTS} "
                    "and increasing fractions UNTIL in 0..1, e.g. 3:0.1,4:0.2,5:0.3 (or 'none')")
            last = float(item[1])
        if fresh and self.vision_from and not (Path(self.vision_from) / "config.json").is_file():
            bad("vision_from", self.vision_from, "holds no saved embedded model (config.json)")


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
    """(scene, [(question, answer)]) for training scene `index`, turns in a seeded random order."""
    scene, g_items, v_items = W.samples(seed, index, cfg.grounding_turns, cfg.vqa_turns)
    turns = [(g.question, box_to_tokens(g.box, scene.size, scene.size)) for g in g_items]
    turns += [(v.question, v.answer) for v in v_items]
    rng = np.random.default_rng([seed, index, 3])
    for _ in range(cfg.point_turns):
        p = W.point_item(scene, rng)
        if p is not None:
            turns.append((p.question, p.answer))
    order = np.random.default_rng([seed, index, 2]).permutation(len(turns))
    return scene, [turns[int(k)] for k in order]


def max_objects_at(step: int, cfg: TrainConfig) -> int:
    """The curriculum: the most objects a training scene of LM step `step` may have."""
    frac = step / cfg.lm_steps
    for cap, until in cfg.curriculum:
        if frac < float(until):
            return int(cap)
    return W.MAX_OBJECTS


def next_indices(seed: int, start: int, n: int, max_objects: int) -> tuple[list[int], int]:
    """The next n training scene indices from `start` with at most `max_objects` objects; new start."""
    out, i = [], start
    while len(out) < n:
        if max_objects >= W.MAX_OBJECTS or len(W.make_scene(seed, i).objects) <= max_objects:
            out.append(i)
        i += 1
    return out, i


def lm_batch(seed: int, indices: list[int], cfg: TrainConfig, vocab: Vocab, grid: int):
    """Token ids, loss weights (answers 1, questions cfg.question_weight, rest 0), pixel values."""
    n_img = grid * grid
    seqs, wts, images = [], [], []
    for idx in indices:
        scene, turns = _turns(seed, idx, cfg)
        images.append(scene.render()[0])
        ids = [vocab.bos] + vocab.ids("user :") + [vocab.image] * n_img
        w = [0.0] * len(ids)
        for k, (q, a) in enumerate(turns):
            if k:
                ids += vocab.ids("user :")
                w += [0.0, 0.0]
            q_ids = vocab.ids(q) + vocab.ids("assistant :")
            a_ids = vocab.ids(a) + [vocab.eos]
            ids += q_ids + a_ids
            w += [cfg.question_weight] * len(q_ids) + [1.0] * len(a_ids)
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
    return {"input_ids": input_ids, "attention_mask": mask, "weights": weights, "pixel_values": pixel_values(images)}


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
    """Pre-training heads (discarded after the vision phase): patch labels, patch row/col, CLS attributes."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.patch = torch.nn.Linear(d, 1 + W.N_OBJECT_CLASSES)
        self.pos = torch.nn.Linear(d, 2 * grid)
        self.cls = torch.nn.Linear(d, N_CLS_OUT)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine from base down to base / 10 at `total`."""
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
    was_training = model.training
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
    model.train(was_training)
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


# --- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, model, opt, state: dict, cfg: TrainConfig, log: dict) -> Path:
    """Atomically write run_dir/checkpoint/state.pt (and the running training_log.json)."""
    ck = run_dir / CHECKPOINT
    ck.mkdir(parents=True, exist_ok=True)
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": dict(state),
            "config": asdict(cfg), "log": log, "torch_rng": torch.get_rng_state(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    tmp = ck / (STATE_FILE + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, ck / STATE_FILE)
    _write_json(run_dir / LOG_FILE, log)
    return ck / STATE_FILE


def load_checkpoint(run_dir: str | Path) -> dict:
    p = Path(run_dir) / CHECKPOINT / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint at {p}")
    return torch.load(p, map_location="cpu", weights_only=False)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Stop:
    """SIGTERM / SIGINT -> finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _say(console, text: str) -> None:
    if console is None:
        print(text, flush=True)
    else:
        console.print(text, soft_wrap=True, highlight=False, markup=False)


# --- training -----------------------------------------------------------------------------------
def _pretrain_vision(model, cfg: TrainConfig, grid: int, log: dict, console) -> int:
    """The tower alone on patch labels, patch row/col and CLS attributes; returns the next scene index."""
    vt = model.model.vision_tower
    heads = VisionHeads(model.config.vision_config.hidden_size, grid)
    params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    n_attr = N_CLS_OUT - (W.MAX_OBJECTS + 1)
    t0 = time.time()
    vt.train()
    for step in range(cfg.vision_steps):
        idx = list(range(step * cfg.batch, (step + 1) * cfg.batch))
        px, labels, attrs, counts = vision_batch(cfg.seed, idx, grid)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vision_steps, cfg.vision_lr, min(cfg.warmup, cfg.vision_steps))
        out = vt(pixel_values=px, output_hidden_states=True)
        h = heads.norm(out.hidden_states[-2][:, 1:])
        l_patch = F.cross_entropy(heads.patch(h).flatten(0, 1), labels.flatten())
        pos = heads.pos(h)
        l_pos = (F.cross_entropy(pos[..., :grid].flatten(0, 1), rows.repeat(len(idx)))
                 + F.cross_entropy(pos[..., grid:].flatten(0, 1), cols.repeat(len(idx))))
        c = heads.cls(out.pooler_output)
        l_cls = F.binary_cross_entropy_with_logits(c[:, :n_attr], attrs) + F.cross_entropy(c[:, n_attr:], counts)
        loss = l_patch + l_cls + cfg.position_weight * l_pos
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == cfg.vision_steps - 1:
            rec = {"phase": "vision", "step": step, "loss": round(loss.item(), 4), "patch": round(l_patch.item(), 4),
                   "cls": round(l_cls.item(), 4), "pos": round(l_pos.item(), 4)}
            log["history"].append(rec)
            if step % 200 == 0:
                _say(console, f"vision {step}/{cfg.vision_steps} {rec}")
    log["vision_images_per_s"] = round(cfg.vision_steps * cfg.batch / max(1e-6, time.time() - t0), 2)
    vt.eval()
    return cfg.vision_steps * cfg.batch


def _new_run(cfg: TrainConfig, command: str | None, console):
    """Model with its vision tower in place, optimizer, start state and log for a fresh run."""
    model, processor = build_model(cfg.seed, **cfg.dims)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    log: dict = {"recipe": RECIPE, "command": command, "config": asdict(cfg), "seed": cfg.seed,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "params": sum(p.numel() for p in model.parameters()), "attention_loss": None,
                 "history": [], "evals": [], "sessions": []}
    start = 0
    if cfg.vision_from:
        src, _ = load_embedded(cfg.vision_from)
        try:
            model.model.vision_tower.load_state_dict(src.model.vision_tower.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"--vision-from {cfg.vision_from}: its vision tower does not fit the configured "
                             f"dims {cfg.dims} ({str(exc).splitlines()[0]})") from None
        wfile = Path(cfg.vision_from) / "model.safetensors"
        log["vision_tower"] = {"from": str(cfg.vision_from), "sha256": _sha256(wfile) if wfile.is_file() else None}
        del src
    elif cfg.vision_steps:
        start = _pretrain_vision(model, cfg, grid, log, console)
        log["vision_tower"] = {"pretrained_steps": cfg.vision_steps}
    else:
        log["vision_tower"] = {"random": True}   # tests only: a frozen random tower
    if not cfg.tune_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lm_lr,
                            weight_decay=cfg.weight_decay)
    state = {"step": 0, "next_index": start, "images": 0, "train_seconds": 0.0}
    return model, processor, opt, state, log


def train(cfg: TrainConfig, command: str | None = None, console=None, resume: str | None = None,
          overrides: dict | None = None) -> dict:
    """Train (or continue `resume`) until the LM schedule ends or this session stops; returns the log.

    A stopped session leaves a checkpoint and `log["paused"]`; a finished one saves the model to
    `out/model`, reloads it, evaluates it there and sets `log["final"]`.
    """
    if resume:
        blob = load_checkpoint(resume)
        cfg = TrainConfig(**{**blob["config"], **(overrides or {}), "out": str(resume)})
    cfg.validate(fresh=not resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = Path(cfg.out)
    if not resume and (run_dir / CHECKPOINT / STATE_FILE).exists():
        raise ValueError(f"--out {run_dir}: already holds a run; continue it with --resume {run_dir} "
                         "or choose another folder")
    session_t0 = time.time()
    if resume:
        model, processor = build_model(cfg.seed, **cfg.dims)
        model.load_state_dict(blob["model"])
        if not cfg.tune_vision:
            for p in model.model.vision_tower.parameters():
                p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lm_lr,
                                weight_decay=cfg.weight_decay)
        opt.load_state_dict(blob["optimizer"])
        state, log = dict(blob["state"]), blob["log"]
        torch.set_rng_state(blob["torch_rng"])
        if blob.get("threads") != torch.get_num_threads() or blob.get("torch") != torch.__version__:
            _say(console, f"warning: checkpoint written with torch {blob.get('torch')} / {blob.get('threads')} "
                          f"threads, resuming with {torch.__version__} / {torch.get_num_threads()}: "
                          "not bit-identical to an uninterrupted run")
        del blob
    else:
        torch.manual_seed(cfg.seed)
        model, processor, opt, state, log = _new_run(cfg, command, console)
    tok = processor.tokenizer
    vocab = Vocab(tok)
    _check_vocab(vocab, cfg)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    vt = model.model.vision_tower
    trainable = [p for p in model.parameters() if p.requires_grad]
    g_eval, v_eval = eval_set(cfg.seed, cfg.eval_n)
    session = {"command": command, "resumed_from_step": state["step"] if resume else None,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    log["sessions"].append(session)
    if not resume:
        save_checkpoint(run_dir, model, opt, state, cfg, log)
    _say(console, f"{'resuming' if resume else 'starting'} at LM step {state['step']}/{cfg.lm_steps} "
                  f"({log['params']:,} parameters, {len(trainable)} trainable tensors) -> {run_dir}")
    steps_this_session, t_steps, last_save = 0, 0.0, time.time()
    stopped = None
    with _Stop() as stop:
        while state["step"] < cfg.lm_steps:
            if stop.signal:
                stopped = stop.signal
            elif cfg.minutes and time.time() - session_t0 > cfg.minutes * 60:
                stopped = "time cap"
            elif cfg.stop_after and steps_this_session >= cfg.stop_after:
                stopped = "stop-after"
            if stopped:
                break
            t0 = time.time()
            step = state["step"]
            idx, state["next_index"] = next_indices(cfg.seed, state["next_index"], cfg.batch,
                                                    max_objects_at(step, cfg))
            b = lm_batch(cfg.seed, idx, cfg, vocab, grid)
            model.train()
            if not cfg.tune_vision:
                vt.eval()
            lr = lr_at(step, cfg.lm_steps, cfg.lm_lr, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixel_values=b["pixel_values"], use_cache=False)
            logits = out.logits[:, :-1].float()
            tgt = b["input_ids"][:, 1:]
            wt = b["weights"][:, 1:]
            ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view_as(wt)
            loss = (ce * wt).sum() / wt.sum()
            ans = wt == 1.0
            l_ans = (ce * ans).sum() / ans.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            state["step"] = step + 1
            state["images"] += len(idx)
            steps_this_session += 1
            dt = time.time() - t0
            t_steps += dt
            state["train_seconds"] = round(state["train_seconds"] + dt, 2)
            if step % 20 == 0 or step == cfg.lm_steps - 1:
                rec = {"phase": "lm", "step": step, "loss": round(loss.item(), 4), "answer": round(l_ans.item(), 4),
                       "lr": round(lr, 6), "max_objects": max_objects_at(step, cfg), "s_per_step": round(dt, 2),
                       "time": time.strftime("%H:%M:%S")}
                log["history"].append(rec)
                _say(console, f"lm {step}/{cfg.lm_steps} loss {rec['loss']:.4f} answer {rec['answer']:.4f} "
                              f"lr {lr:.2e} max_objects {rec['max_objects']} | {t_steps / steps_this_session:.2f} "
                              "s/step this session")
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.lm_steps:
                t_ev = time.time()
                ev = evaluate(model, tok, g_eval, v_eval)
                ev.update(step=state["step"], images=state["images"], seconds=round(time.time() - t_ev, 1),
                          time=time.strftime("%Y-%m-%d %H:%M:%S"))
                log["evals"].append(ev)
                _say(console, f"eval @ lm step {state['step']} (n={cfg.eval_n}): grounding Acc@0.5 "
                              f"{ev['grounding_acc50']:.3f} (mIoU {ev['grounding_miou']:.3f}) "
                              f"{ev['grounding_by_kind']}, VQA EM {ev['vqa_em']:.3f} {ev['vqa_by_kind']}")
            if (state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.lm_steps
                    or (cfg.ckpt_minutes and time.time() - last_save > cfg.ckpt_minutes * 60)):
                session.update(steps=steps_this_session, s_per_step=round(t_steps / steps_this_session, 3))
                save_checkpoint(run_dir, model, opt, state, cfg, log)
                last_save = time.time()
    session.update(steps=steps_this_session, ended=time.strftime("%Y-%m-%d %H:%M:%S"), stopped=stopped,
                   s_per_step=round(t_steps / max(1, steps_this_session), 3))
    log["images_seen"] = {"lm": state["images"]}
    log["train_seconds"] = state["train_seconds"]
    if state["step"] < cfg.lm_steps:
        log["paused"] = {"at_step": state["step"], "reason": stopped}
        save_checkpoint(run_dir, model, opt, state, cfg, log)
        _say(console, f"stopped ({stopped}) at LM step {state['step']}/{cfg.lm_steps}; checkpoint in "
                      f"{run_dir / CHECKPOINT}; continue with: python scripts/train_embedded.py --resume {run_dir}")
        return log
    log.pop("paused", None)
    save_checkpoint(run_dir, model, opt, state, cfg, log)
    return _finish(model, processor, cfg, log, run_dir, console)


def _finish(model, processor, cfg: TrainConfig, log: dict, run_dir: Path, console) -> dict:
    """Save the model to run_dir/model, reload it, evaluate the saved weights, write the log."""
    out_dir = run_dir / MODEL_DIR
    log.update(stopped_early=False, minutes=round(log["train_seconds"] / 60, 2),
               lm_images_per_s=round(log["images_seen"]["lm"] / max(1e-6, log["train_seconds"]), 2))
    save_embedded(model, processor, out_dir, dtype=getattr(torch, cfg.save_dtype),
                  extra={"seed": cfg.seed, "recipe": RECIPE, "attention_loss": None, "text_layers":
                         model.config.text_config.num_hidden_layers})
    model2, proc2 = load_embedded(out_dir)
    g_fin, v_fin = eval_set(cfg.seed, cfg.final_eval_n)
    t_ev = time.time()
    final = evaluate(model2, proc2.tokenizer, g_fin, v_fin)
    final.update(n=cfg.final_eval_n, seconds=round(time.time() - t_ev, 1))
    log["final"] = final
    log["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_json(out_dir / LOG_FILE, log)
    _write_json(run_dir / LOG_FILE, log)
    if cfg.out_package:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        for f in out_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, WEIGHTS_DIR / f.name)
    _say(console, f"done: grounding Acc@0.5 {final['grounding_acc50']:.3f}, VQA EM {final['vqa_em']:.3f} "
                  f"(n={cfg.final_eval_n}, saved weights) -> {out_dir}"
                  + (f" (copied to {WEIGHTS_DIR})" if cfg.out_package else ""))
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
        for q, a in turns:
            want = vocab.tok(prompt(q) + " " + a + "</s>").input_ids
            got = ([vocab.bos] + vocab.ids("user :") + [vocab.image] + vocab.ids(q) + vocab.ids("assistant :")
                   + vocab.ids(a) + [vocab.eos])
            if want != got:
                raise RuntimeError(f"fast tokenisation differs from the tokenizer for {q!r} -> {a!r}")


# --- command line -------------------------------------------------------------------------------
RESUME_OVERRIDES = ("minutes", "stop_after", "threads", "ckpt_minutes")   # what --resume may change (not the schedule)


def _curriculum(text: str) -> list:
    if text.strip().lower() in ("none", ""):
        return []
    try:
        return [[int(a), float(b)] for a, b in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want MAX:UNTIL pairs, e.g. 3:0.1,4:0.2,5:0.3, or 'none'") from None


def _dims(text: str) -> dict:
    from .build import DEFAULT_DIMS
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k not in DEFAULT_DIMS or not v.isdigit() or int(v) <= 0:
            raise argparse.ArgumentTypeError(f"{part!r}: want NAME=POSITIVE_INT with NAME in {sorted(DEFAULT_DIMS)}")
        out[k] = int(v)
    return out


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    d = TrainConfig()
    kw = {"argument_default": argparse.SUPPRESS} if suppress else {}
    p = argparse.ArgumentParser(prog="train_embedded", description="Train the embedded LLaVA on the shapes world "
                                "(recipe in docs/embedded.md).", **kw)
    dflt = (lambda v: {}) if suppress else (lambda v: {"default": v})
    p.add_argument("--out", **dflt(d.out), help="run folder (required): checkpoint/, model/, training_log.json")
    p.add_argument("--out-package", action="store_true", **dflt(False),
                   help=f"also copy the finished model into the shipped weights folder {WEIGHTS_DIR}")
    p.add_argument("--resume", metavar="DIR", **dflt(None),
                   help="continue the run in DIR from its checkpoint (only --minutes, --stop-after, --threads may change)")
    p.add_argument("--seed", type=int, **dflt(d.seed))
    p.add_argument("--minutes", type=float, **dflt(d.minutes), help="time cap of this session (0 = none); "
                   "the run checkpoints and stops, --resume continues it")
    p.add_argument("--stop-after", type=int, **dflt(d.stop_after), help="checkpoint and stop after N LM steps")
    p.add_argument("--vision-from", **dflt(d.vision_from),
                   help="saved embedded model whose (frozen) CLIP tower is reused; '' to pre-train one")
    p.add_argument("--vision-steps", type=int, **dflt(d.vision_steps), help="pre-train the tower (with --vision-from '')")
    p.add_argument("--lm-steps", type=int, **dflt(d.lm_steps))
    p.add_argument("--batch", type=int, **dflt(d.batch))
    p.add_argument("--vision-lr", type=float, **dflt(d.vision_lr))
    p.add_argument("--lm-lr", type=float, **dflt(d.lm_lr))
    p.add_argument("--weight-decay", type=float, **dflt(d.weight_decay))
    p.add_argument("--warmup", type=int, **dflt(d.warmup), help="linear warm-up steps")
    p.add_argument("--grounding-turns", type=int, **dflt(d.grounding_turns))
    p.add_argument("--vqa-turns", type=int, **dflt(d.vqa_turns))
    p.add_argument("--point-turns", type=int, **dflt(d.point_turns))
    p.add_argument("--question-weight", type=float, **dflt(d.question_weight))
    p.add_argument("--curriculum", type=_curriculum, **dflt(d.curriculum),
                   help="MAX:UNTIL,...: at most MAX objects per training scene until fraction UNTIL of the run")
    p.add_argument("--dims", type=_dims, **dflt(d.dims), help="model sizes, e.g. text_layers=16,text_hidden=128")
    p.add_argument("--position-weight", type=float, **dflt(d.position_weight))
    p.add_argument("--tune-vision", action="store_true", **dflt(False))
    p.add_argument("--eval-every", type=int, **dflt(d.eval_every))
    p.add_argument("--eval-n", type=int, **dflt(d.eval_n))
    p.add_argument("--final-eval-n", type=int, **dflt(d.final_eval_n))
    p.add_argument("--ckpt-every", type=int, **dflt(d.ckpt_every), help="LM steps between checkpoints")
    p.add_argument("--ckpt-minutes", type=float, **dflt(d.ckpt_minutes),
                   help="also checkpoint after this many minutes since the last one (0 = steps only)")
    p.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], **dflt(d.save_dtype))
    p.add_argument("--threads", type=int, **dflt(d.threads))
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    given = vars(build_parser(suppress=True).parse_args(argv))
    resume = args.pop("resume")
    command = "python scripts/train_embedded.py " + " ".join(argv)
    try:
        if resume:
            extra = sorted(k for k in given if k not in RESUME_OVERRIDES + ("resume",))
            if extra:
                parser.error(f"--resume continues the run with its own settings; only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may be given "
                             f"(got {', '.join('--' + k.replace('_', '-') for k in extra)})")
            overrides = {"minutes": args["minutes"], "stop_after": args["stop_after"]}   # per session
            overrides.update({k: args[k] for k in ("threads", "ckpt_minutes") if k in given})
            return train(TrainConfig(out=resume), command=command, resume=resume, overrides=overrides)
        return train(TrainConfig(**args), command=command)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
