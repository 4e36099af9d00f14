"""Per-node time of chosen methods on the benchmark's random LLaVA: run by hand, not a test.

`bench_adapters.py` reports the nodes' share of the prefill; this script names the nodes
(RunReport.node_ms, median over `--repeats` after `--warmup`) and, with `--cprofile N`,
prints the N most expensive functions of one extra run (cumulative time), to see where a
slow node spends it. Same model flags as bench_adapters.py (docs/performance.md):

    PYTHONPATH=. python benchmarks/profile_nodes.py --methods sparsevlm,prumerge_plus --budgets 64,128 \\
        --vision-layers 2 --vision-hidden 128 --llm-layers 32 --llm-hidden 1024 --new-tokens 1
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_adapters import DTYPES, _median, _pipelines, add_model_args, apply_clock, random_llava  # noqa: E402

from nuwa_graph.adapters.tiny import synthetic_image  # noqa: E402

PROMPT = "What shapes are in the image, and what colour is each one?"  # bench_adapters' methods mode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", type=lambda s: s.split(","), required=True)
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=1)
    add_model_args(ap, vision_layers=2, vision_hidden=128, llm_layers=32, llm_hidden=1024)
    ap.add_argument("--cprofile", type=int, default=0, help="also profile one run; print this many functions")
    args = ap.parse_args(argv)
    apply_clock(ap, args)
    adapter = random_llava(DTYPES[args.dtype], args.device, args.attn_implementation, args)
    image = synthetic_image(336)
    for name, budget, pipe in _pipelines(args.methods, args.budgets, qwen=False):
        reps = []
        for i in range(args.warmup + args.repeats):
            rep = adapter.generate(pipe, [image], [PROMPT], max_new_tokens=args.new_tokens, stop_at_eos=False)
            if i >= args.warmup:
                reps.append(rep)
        total = _median([sum(r.node_ms.values()) for r in reps])
        prefill = _median([r.prefill_ms for r in reps])
        print(f"## {name} {budget}: prefill {prefill:.0f} ms, nodes {total:.2f} ms ({100 * total / prefill:.2f} %)")
        for node in reps[0].node_ms:
            print(f"    {node:<24} {_median([r.node_ms[node] for r in reps]):8.2f} ms")
        if args.cprofile:
            prof = cProfile.Profile()
            with torch.no_grad():
                prof.enable()
                adapter.generate(pipe, [image], [PROMPT], max_new_tokens=args.new_tokens, stop_at_eos=False)
                prof.disable()
            pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(r"nodes/", args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
