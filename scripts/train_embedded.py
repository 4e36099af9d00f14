#!/usr/bin/env python
"""Train the embedded LLaVA on the shapes world (docs/embedded.md has the recipe and the full command).

    python scripts/train_embedded.py --help
    python scripts/train_embedded.py --out runs/embedded --seed 0      # the full run (resumable)
    python scripts/train_embedded.py --resume runs/embedded            # continue it after a stop
    python scripts/train_embedded.py --out /tmp/smoke --lm-steps 40 --warmup 8 --eval-every 20 --eval-n 16 --final-eval-n 64

The same entry point is `nuwa_graph.embedded.train.main(argv)`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from nuwa_graph.embedded.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
