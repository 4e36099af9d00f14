"""The trainer's command line options (`python scripts/train_embedded.py --help`); main() is in train.py."""

from __future__ import annotations

import argparse
from typing import Any

from .build import WEIGHTS_DIR
from .train_config import TrainConfig

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
    kw: dict[str, Any] = {"argument_default": argparse.SUPPRESS} if suppress else {}
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
