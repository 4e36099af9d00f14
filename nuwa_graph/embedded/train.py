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

import math
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..world import shapes as W
from .build import WEIGHTS_DIR, build_model, load_embedded, save_embedded
from .train_checkpoint import _say, _sha256, _Stop, _write_json, load_checkpoint, save_checkpoint
from .train_cli import RESUME_OVERRIDES, build_parser
from .train_config import CHECKPOINT, EVAL_WORLD_OFFSET, LOG_FILE, MODEL_DIR, RECIPE, STATE_FILE, TrainConfig
from .train_data import N_CLS_OUT, Vocab, _turns, lm_batch, max_objects_at, next_indices, vision_batch
from .train_eval import SLICE_N, eval_set, evaluate, slice_accuracy


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


# The trainer's pieces live in train_config, train_data, train_eval, train_checkpoint and
# train_cli; their public names stay importable from here (tests, docs/embedded.md, the CLI).
__all__ = [
    "CHECKPOINT",
    "EVAL_WORLD_OFFSET",
    "LOG_FILE",
    "MODEL_DIR",
    "RECIPE",
    "RESUME_OVERRIDES",
    "SLICE_N",
    "STATE_FILE",
    "TrainConfig",
    "VisionHeads",
    "Vocab",
    "build_parser",
    "eval_set",
    "evaluate",
    "load_checkpoint",
    "lm_batch",
    "lr_at",
    "main",
    "max_objects_at",
    "next_indices",
    "save_checkpoint",
    "slice_accuracy",
    "train",
    "vision_batch",
]
