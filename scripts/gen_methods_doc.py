"""Regenerate docs/methods.md from the shipped pipelines.

For every method pipeline: its description (which says how the budget is counted), the
visual tokens per LLM layer at budgets 64/128/192 on LLaVA-1.5-7B geometry (24x24 grid,
32 layers; computed by running the pipeline on synthetic signals of the right shapes, see
nuwa_graph/simulate.py), and its drawing (mermaid, from `nuwa-graph draw`). The notes on
where paper and code differ are hand-written in docs/methods_vision.md and
docs/methods_llm.md and linked from each section.

    python scripts/gen_methods_doc.py          # rewrite docs/methods.md
    python scripts/gen_methods_doc.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nuwa_graph.draw import to_mermaid  # noqa: E402
from nuwa_graph.pipeline import load  # noqa: E402
from nuwa_graph.simulate import LLAVA_15, QWEN25_VL, simulate  # noqa: E402

METHODS = [  # (file, title, notes file)
    ("vanilla", "Vanilla (no pruning)", "methods_vision.md"),
    ("random", "Random keep", "methods_vision.md"),
    ("downsample", "Uniform downsampling", "methods_vision.md"),
    ("fastv", "FastV", "methods_llm.md"),
    ("fastv_fix", "FastV-fix (PESP -> RPME)", "methods_llm.md"),
    ("pdrop", "PDrop (PyramidDrop)", "methods_llm.md"),
    ("sparsevlm", "SparseVLM v1.5", "methods_llm.md"),
    ("sparsevlm_v2", "SparseVLM v2", "methods_llm.md"),
    ("visionzip", "VisionZip", "methods_vision.md"),
    ("visionzip_fix", "VisionZip-fix (PERC -> RPME)", "methods_vision.md"),
    ("prumerge_plus", "PruMerge+ (adaptive)", "methods_vision.md"),
    ("feather", "FEATHER", "methods_llm.md"),
    ("nuwa", "Nüwa", "methods_vision.md"),
]
BUDGETS = (64, 128, 192)


def _runs(path: Path, geom=LLAVA_15, var: str = "budget", values=BUDGETS) -> list[tuple[str, list[int]]]:
    """(label, tokens per layer) at each value of `var`, or once when the file lacks it."""
    base = load(path)
    model_vars = {"llm_layers": geom.n_layers}
    if var not in base.variables:
        _, counts = simulate(base.bind_model(model_vars), geom)
        return [("-", counts)]
    out = []
    for v in values:
        _, counts = simulate(load(path, {var: v}).bind_model(model_vars), geom)
        out.append((str(v), counts))
    return out


def _section(path: Path, title: str, note: str, runs) -> list[str]:
    p = load(path)
    rel = path.relative_to(ROOT).as_posix()
    lines = [f"## {title}", "", f"`{rel}`" + (f" — notes: [{note}]({note})" if note else ""), ""]
    lines += [" ".join(p.spec.description.split()), ""]
    lines += ["| budget | visual tokens per layer | average |", "| --- | --- | --- |"]
    for label, counts in runs:
        lines.append(f"| {label} | {_compress(counts)} | {sum(counts) / len(counts):.2f} |")
    return lines + ["", "```mermaid", to_mermaid(p).rstrip(), "```", ""]


def _compress(counts: list[int]) -> str:
    """`576 x2, 64 x30`: runs of equal counts."""
    parts, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        parts.append(f"{counts[i]} x{j - i}")
        i = j
    return ", ".join(parts)


TIES = """## Ties and degenerate inputs

Every selection breaks ties as the official code does: the same tensors go through the same
calls (`torch.topk` on CPU orders equal values by its own rule, not by index), and the scores
that decide near-ties are computed with the official arithmetic. Tested with tied, uniform
and near-tied inputs against the official op sequences in `tests/test_ties.py`.

- Nüwa stage 1: each region is one row `[top-left, top-right, bottom-left, bottom-right]`,
  ranked by `torch.topk(k=n)`; the candidates stay in region order and the alignment's top-k
  runs over that vector (four equal values, k = 2: cells 2 and 3, as the official code).
  Qwen2.5-VL (`pad: zero`): the zero-padded cells of an odd grid compete in both top-ks and
  are dropped after the global one, so an all-zero salience keeps fewer than ceil(N * s1)
  tokens, as the official code.
- PruMerge+: the CLS attention comes from the full `q @ k^T` product (577 x 577 on CLIP-L,
  vision side only), as the official code; on a uniform image it is exactly uniform.
- LLM side (FastV, PDrop, Nüwa stage 2, SparseVLM): the official codes average whole
  attention maps over heads; on CPU the last bit of such a mean depends on whether a column
  falls in the vectorised body of the map or in its tail. The node pads the image columns so
  they are reduced in the body, which is where the official map has them whenever the text
  after the image is at least 64 tokens long (32 with AVX2); with a shorter text the last
  image columns can differ by one ulp (near-ties only; exact ties are unaffected).
  FEATHER's softmax covers the image keys only, so its map ends at the image columns and is
  reduced as it is; SparseVLM's mean over raters runs on the image slice, as its code.
- VisionZip: the key mean runs on a contiguous (heads, n + 1, d) tensor, the similarity as a
  batched product (the official `bmm`), the assignment by first maximum (argmax).
- The rows an adapter computes for a real model (q and k of the needed rows only) are not
  the official eager attention maps; fidelity to the bit holds for the same rows, as the
  golden tests feed them.

| input | official code | here |
| --- | --- | --- |
| PruMerge+, no outlier (uniform attention) | divides by zero (`int(1/0)`) | error from node `adaptive` (`selector.iqr-outliers`): lower `whisker` or use a fixed count with `selector.top-k` |
| PruMerge+, fewer than 32 other tokens | topk fails | error from `merger.prumerge`: lower `neighbours` |
| VisionZip, fewer remaining tokens than contextual | shape error | error from `merger.visionzip`: lower `contextual` or the dominant count |
| Nüwa, cohesion distance 0 | NaN (0/0) | each collector keeps its own feature |
| Nüwa Qwen, all-zero salience | padded cells picked, then dropped | the same (fewer tokens kept) |
| uniform scores, any top-k | `torch.topk`'s order | the same call, the same order |
| SparseVLM, equal cluster densities | unseeded noise decides | seeded noise (`tie_break`), or the recorded noise (`signal`) |
"""


def render() -> str:
    lines = [
        "# Methods",
        "",
        "Generated by `python scripts/gen_methods_doc.py` from the files in `pipelines/`; do not edit",
        "by hand. Each section gives the pipeline's own description (how its budget is counted),",
        "the visual tokens each LLM layer sees at each budget on LLaVA-1.5-7B geometry (576 tokens,",
        "32 layers), and the graph as `nuwa-graph draw` makes it. Counts come from running the",
        "pipeline on synthetic signals of the right shapes (`nuwa_graph/simulate.py`): exact for",
        "fixed-budget methods, an example for adaptive ones (PruMerge+ keeps a per-image count).",
        "Notes on each method's graph and on where paper and official code differ:",
        "[vision-side methods](methods_vision.md), [LLM-side methods](methods_llm.md).",
        "",
    ]
    for stem, title, notes in METHODS:
        path = ROOT / "pipelines" / f"{stem}.yaml"
        if path.exists():
            lines += _section(path, title, notes, _runs(path))
    qwen = ROOT / "pipelines" / "nuwa_qwen.yaml"
    if qwen.exists():
        lines += _section(qwen, "Nüwa on Qwen2.5-VL (keep 25/50/75 %, counts on a 28x28 merged grid, 28 layers)",
                          "methods_vision.md", _runs(qwen, QWEN25_VL, "keep", (25, 50, 75)))
    for folder, what in (("ablations", "Ablation"), ("variants", "Variant")):
        for path in sorted((ROOT / "pipelines" / folder).glob("*.yaml")):
            lines += _section(path, f"{what}: {path.stem}", "", _runs(path))
    lines += TIES.splitlines()
    return "\n".join(lines)


def main() -> int:
    target = ROOT / "docs" / "methods.md"
    text = render()
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != text:
            print("docs/methods.md is out of date: run python scripts/gen_methods_doc.py")
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
