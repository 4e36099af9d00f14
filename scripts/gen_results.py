"""Regenerate docs/results.md (and docs/results/*.png) from a fresh evaluation.

    python scripts/gen_results.py                 # 500 + 500 held-out samples x 80 runs, 19 min on 2 idle CPU cores
    python scripts/gen_results.py --n 50 --write /tmp/results.md   # a quick look

Everything is measured on the committed embedded model; see scripts/results_report.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # results_report.py, this script's module


def main(argv: list[str] | None = None) -> int:
    from results_report import load_run, render, run_all, write_pictures
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from nuwa_graph.embedded import WEIGHTS_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="held-out scenes = grounding and VQA samples each (default 500)")
    ap.add_argument("--model", default=str(WEIGHTS_DIR), help="model folder (default: the committed embedded model)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/results", help="raw results folder")
    ap.add_argument("--write", type=Path, default=ROOT / "docs/results.md", help="markdown to write")
    ap.add_argument("--pictures", type=Path, default=None, help="folder for the plots (default: beside --write, "
                                                                 "<stem>/)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own; the page "
                                                               "records the count, its prefill ms depend on it)")
    ap.add_argument("--no-caveat", action="store_true", help="skip the masked-head rerun")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown and pictures from the files "
                                                                "of the last run in --out, without evaluating")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    pictures = args.pictures or args.write.with_suffix("")
    if args.render_only:
        res = load_run(args.out)
        command = "python scripts/gen_results.py" + (f" --n {res['n']}" if res["n"] != 500 else "")
        paths = write_pictures(res, pictures)
        args.write.write_text(render(res, command))
        console.print(f"wrote {args.write} and {len(paths)} pictures under {pictures} (from {args.out})")
        return 0
    total = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console) as bar:
        job = bar.add_task("loading", total=None)
        state = {"desc": None, "done": 0, "t0": time.time()}

        def progress(desc: str, k: int) -> None:
            bar.update(job, description=desc, advance=k)
            state["done"] += k
            if not console.is_terminal and desc != state["desc"]:  # a log file gets one line per run and task
                state["desc"] = desc
                console.print(f"{time.time() - state['t0']:7.0f} s  {state['done']}/{total}  {desc}")

        def on_total(n: int) -> None:
            nonlocal total
            total = n
            bar.update(job, total=n)

        res = run_all(args.model, args.n, args.out, batch=args.batch, caveat=not args.no_caveat, progress=progress,
                      on_total=on_total)
    command = "python scripts/gen_results.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    paths = write_pictures(res, pictures)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.write_text(render(res, command))
    console.print(f"wrote {args.write} and {len(paths)} pictures under {pictures} "
                  f"({res['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
