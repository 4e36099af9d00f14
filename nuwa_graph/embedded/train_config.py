"""The trainer's settings (TrainConfig, checked when made) and the names of a run folder's files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..world import shapes as W
from .build import WEIGHTS_DIR

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
