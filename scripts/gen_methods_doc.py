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
    # the field's baselines (issue 22)
    ("dart", "DART", "methods_baselines.md"),
    ("divprune", "DivPrune", "methods_baselines.md"),
    ("vispruner", "VisPruner", "methods_baselines.md"),
    ("fastervlm", "FasterVLM", "methods_baselines.md"),
    ("hiprune", "HiPrune", "methods_baselines.md"),
    ("cdpruner", "CDPruner", "methods_baselines.md"),
    ("gprune", "G-Prune", "methods_baselines.md"),
    ("vtw", "VTW (Visual Tokens Withdrawal)", "methods_baselines.md"),
]
# the baselines' own Qwen2.5-VL files (the authors' Qwen code), drawn on Qwen2.5-VL-7B geometry
QWEN_FILES = [("dart_qwen", "DART on Qwen2.5-VL"), ("hiprune_qwen", "HiPrune on Qwen2.5-VL")]
BASELINES = ["dart", "divprune", "vispruner", "fastervlm", "hiprune", "cdpruner", "gprune", "vtw"]
# node types added or extended for the baselines (docs/methods_baselines.md)
ADDED = {"selector.greedy-max-min", "selector.pivot-dissimilarity", "selector.bipartite-dedup", "selector.dpp-map",
         "selector.neighbours", "scorer.graph-propagation", "scorer.instruction-relevance", "scorer.llm-key-norm",
         "applier.withdraw"}
EXTENDED = {"selector.top-k", "scorer.attention-received", "signal.llm-hidden"}
# fidelity of each baseline against its official code (tests/test_golden_baselines.py)
FIDELITY = {
    "dart": "golden `dart_b{64,128,192}`: key L1 norms bit for bit, pivots in topk order, the set-order visit, every "
            "pivot's picks, the kept set, keep indices, position ids and gathered rows exact.",
    "divprune": "golden `divprune_b{64,128,192}`, `divprune_official_r0.098`: the distance matrix bit for bit, every "
                "pick in greedy order, keep indices, PERC ids and the LLM input rows exact.",
    "vispruner": "golden `vispruner_b{64,128,192}`, `vispruner_b64_r0.75`: head-mean attention bit for bit, "
                 "important tokens in argsort order, diverse tokens in loop order, kept set exact, rows within 1e-5.",
    "fastervlm": "golden `fastervlm_b{64,128,192}`: head-mean attention bit for bit, topk order, kept set exact.",
    "hiprune": "golden `hiprune_b{64,128,192}`: column means from q/k within 1e-9, anchors and registers in topk "
               "order, buffers, kept set exact. Qwen file: the authors' code, with the buffer fault fixed (no "
               "golden file).",
    "cdpruner": "golden `cdpruner_b{64,128,192}`: relevance and kernel within 1e-6, the greedy DPP order on the "
                "official kernel and the kept set exact. The `llm` relevance (Qwen, embedded) is ours: no golden.",
    "gprune": "golden `gprune_b{64,128,192}`, `gprune_official_r0.5`: degrees exact, scores within 1e-5 relative, "
              "kept set and PESP ids exact, topk order where the file's gap is above float noise (both propagations).",
    "dart_qwen": "no golden file (the golden files are LLaVA-1.5's): the nodes of dart.yaml, checked there, with "
                 "the Qwen count rule; its M-RoPE keys and final-norm states on tiny Qwen2.5-VL in "
                 "tests/test_signals_baselines.py.",
    "hiprune_qwen": "no golden file: the nodes of hiprune.yaml, checked there, on Qwen's attention received (sum "
                    "over queries, per merge unit: the Nüwa-Qwen signal, tested against eager maps).",
    "vtw": "golden `vtw_b{64,128,192}`, `vtw_official_k16`: the layer K, kept rows, position ids, per-layer counts and "
           "decode ids exact; the lower layers' visual KV checked by cached = cache-free decoding on every family.",
}


def _extension(node, pipe) -> str | None:
    """How a node uses a parameter or input added for the baselines (None: as it was)."""
    p = node.params
    if node.type_name == "selector.top-k":
        used = [w for w, on in (("method: argsort", p.method == "argsort"), ("share", p.share is not None),
                                ("fill", p.fill)) if on]
        if any(dst == node.name and port == "exclude" for _, _, dst, port in pipe.edges):
            used.append("exclude")
        return ", ".join(used) or None
    if node.type_name == "scorer.attention-received":
        return "queries: mean" if p.queries == "mean" else None
    if node.type_name == "signal.llm-hidden":
        return f"tokens: {p.tokens}, norm: {p.norm}" if (p.tokens, p.norm) != ("image", "none") else None
    return None
BUDGETS = (64, 128, 192)


def _runs(path: Path, geom=LLAVA_15, var: str = "budget", values=BUDGETS,
          model_vars: dict | None = None) -> list[tuple[str, list[int]]]:
    """(label, tokens per layer) at each value of `var`, or once when the file lacks it."""
    base = load(path)
    model_vars = model_vars or {"llm_layers": geom.n_layers}
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
    if path.stem in FIDELITY:
        lines += [f"Fidelity: {FIDELITY[path.stem]}", ""]
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
- Baselines: DART visits its pivots in the iteration order of a CPython set of their
  sequence positions (`list(set(image + text))`, built the same way) and takes `topk` of the
  negated cosine over the pool in ascending position order; DivPrune takes `argmax` (first
  index) of the running column minimum, the matrix from one `mm`; VisPruner ranks with a
  descending `argsort` (not topk) and sorts each round's scores the same way; HiPrune, G-Prune
  and FasterVLM take `torch.topk` on the same (1, n) vectors as their codes; CDPruner's DPP
  takes `argmax` (lowest index on exact ties) with the official einsum.
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
| DivPrune, duplicated or constant tokens | the same token picked again (duplicates reach the LLM) | each token once (`repeat: true`: the official loop) |
| DivPrune, a zero embedding row | NaN (no eps) | the row normalises to zero |
| VisPruner, odd int(T * important_ratio) | shape mismatch | the even half of the list has one entry more |
| HiPrune on Qwen2.5-VL, a buffer strong in the last block | re-picked ("-1" on sum-scaled scores): fewer than T tokens | buffers masked: exactly T |
| CDPruner, constant relevance | NaN kernel, 2 tokens kept | relevance 1 everywhere: DPP on diversity alone |
| CDPruner, duplicates beyond the kernel's rank | sqrt of a negative gain, NaN picks | gain clamped: distinct picks |
| DART, fewer than 4 text tokens after the image | topk fails | text pivots clamped to the tokens there |
| G-Prune on LLaVA-1.5 | NameError (crop grid unset), prefix 46 | the base-image branch on the one grid, prefix from the layout |
| VTW with eager attention | mask size mismatch | every segment gets its own mask |
"""


def reuse_table() -> list[str]:
    """Per baseline: the node types its file(s) use, which were added for it, which extended."""
    lines = ["## Baselines: nodes reused and nodes added", "",
             "Which node types each baseline's graph uses (with its Qwen2.5-VL file, where it has one): "
             "reused as they were, extended (a parameter or an input added for these methods; the old files are "
             "unchanged), or added (a general operation, first needed here). Notes: "
             "[methods_baselines.md](methods_baselines.md).", "",
             "| method | node types | reused as they were | extended (what) | added |", "| --- | --- | --- | --- | --- |"]
    for stem in BASELINES:
        files = [stem] + [q for q, _ in QWEN_FILES if q.startswith(stem + "_")]
        types: list[str] = []
        ext: dict[str, list[str]] = {}
        for f in files:
            pipe = load(ROOT / "pipelines" / f"{f}.yaml")
            for node in pipe.nodes.values():
                if node.type_name not in types:
                    types.append(node.type_name)
                how = _extension(node, pipe) if node.type_name in EXTENDED else None
                if how and how not in ext.setdefault(node.type_name, []):
                    ext[node.type_name].append(how)
        added = [t for t in types if t in ADDED]
        extended = [t for t in types if ext.get(t)]
        reused = [t for t in types if t not in added and t not in extended]
        cells = [", ".join(f"`{t}`" for t in reused) or "-",
                 ", ".join(f"`{t}` ({'; '.join(ext[t])})" for t in extended) or "-",
                 ", ".join(f"`{t}`" for t in added) or "-"]
        names = ", ".join(f"`{f}.yaml`" for f in files)
        lines.append(f"| {stem} ({names}) | {len(types)} | " + " | ".join(cells) + " |")
    return lines + [""]


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
        "[vision-side methods](methods_vision.md), [LLM-side methods](methods_llm.md), [the field's baselines]"
        "(methods_baselines.md).",
        "",
    ]
    for stem, title, notes in METHODS:
        path = ROOT / "pipelines" / f"{stem}.yaml"
        if stem == BASELINES[0]:
            lines += reuse_table()
        if path.exists():
            lines += _section(path, title, notes, _runs(path))
    for stem, title in QWEN_FILES:
        path = ROOT / "pipelines" / f"{stem}.yaml"
        model = {"family": "qwen2_5_vl", "llm_layers": QWEN25_VL.n_layers, "vision_layers": 32, "clip_text": False}
        lines += _section(path, f"{title} (counts on a 28x28 merged grid, 28 layers)", "methods_baselines.md",
                          _runs(path, QWEN25_VL, model_vars=model))
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
