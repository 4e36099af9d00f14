"""A training run's checkpoint (written atomically, resumed bit-for-bit), stop requests and progress lines."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .train_config import CHECKPOINT, LOG_FILE, STATE_FILE, TrainConfig


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


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

    def __init__(self) -> None:
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
