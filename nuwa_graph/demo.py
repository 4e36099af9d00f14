"""`nuwa-graph run FILE` with no model, image or prompt: the pipeline against vanilla.

The README's main job. On the embedded model and the built-in shapes-world sample set it
answers every grounding and VQA question twice, unpruned and pruned, and prints accuracy,
visual tokens per LLM layer and prefill time side by side; the kept tokens of the first
sample are drawn over its image. About 15 seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import PipelineError, RunError
from .evaluate import EvalError, EvalRun, default_model, evaluate, load_data, sample_data
from .pipeline import Pipeline, load

VANILLA = Path(__file__).resolve().parent.parent / "pipelines" / "vanilla.yaml"
DEMO_SAMPLES = 40  # grounding and VQA samples each (the whole built-in sample set)


def _vanilla() -> Pipeline:
    if not VANILLA.is_file():
        raise RunError(f"the reference pipeline {VANILLA} is missing; pass --model/--prompt for a single run instead")
    return load(VANILLA)


def run_demo(pipeline: Pipeline, out: str | Path = "runs/run", samples: int = DEMO_SAMPLES, max_new_tokens: int = 6,
             seed: int | None = None, dtype: str = "float32", device: str = "cpu", as_json: bool = False,
             console=None, attn_implementation: str = "sdpa", device_map: str | None = None, batch: int = 20) -> int:
    """Evaluate vanilla and `pipeline` on the sample set; print the comparison; 0 on success."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from .adapters import load_adapter
    from .viz import draw_kept, safe_name

    err = Console(stderr=True, soft_wrap=True)
    console = console or Console()
    out = Path(out)
    try:
        model = default_model()
        adapter = load_adapter(model, dtype, device, attn_implementation=attn_implementation, device_map=device_map)
        tasks = load_data(sample_data(out / "sample_data"), limit=samples)
        runs = [EvalRun("vanilla", str(VANILLA), {}, _vanilla()), EvalRun(pipeline.name, pipeline.source, {}, pipeline)]
        if pipeline.name == "vanilla":
            runs = runs[1:]
        total = len(runs) * sum(len(t.samples) for t in tasks)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            job = bar.add_task("run", total=total)
            result = evaluate(adapter, runs, tasks, batch=batch, max_new_tokens=max_new_tokens, seed=seed,
                              progress=lambda d, k: bar.update(job, description=escape(d), advance=k))
    except (EvalError, RunError, PipelineError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 2 if isinstance(exc, PipelineError) else 1
    mine = result["results"][-1]
    picture = None
    if mine.get("sample_image") and mine.get("grid"):
        picture = draw_kept(mine["sample_image"], mine.get("sample_kept") or {}, mine["grid"],
                            out / f"{safe_name(mine['label'])}_kept.png",
                            title=f"{mine['label']}: {mine.get('sample_prompt', '')}")
    if as_json:
        slim = {**result, "results": [{k: v for k, v in r.items() if k != "predictions"} for r in result["results"]],
                "picture": str(picture) if picture else None}
        sys.stdout.write(json.dumps(slim, indent=2, default=str) + "\n")
        return 0
    n = {d["task"]: d["n"] for d in result["data"]}
    from .embedded import WEIGHTS_DIR

    shown = "the embedded model" if Path(model).resolve() == WEIGHTS_DIR.resolve() else Path(model).name
    t = Table(title=f"{escape(mine['label'])} vs vanilla on {escape(shown)} "
                    f"(built-in sample set: {n.get('grounding', 0)} grounding + {n.get('vqa', 0)} VQA)")
    t.add_column("run")
    t.add_column("grounding Acc@0.5", justify="right")
    t.add_column("VQA EM", justify="right")
    t.add_column("avg visual tokens", justify="right")
    t.add_column("tokens per LLM layer")
    t.add_column("prefill ms", justify="right")
    for r in result["results"]:
        g, v = r["tasks"]["grounding"], r["tasks"]["vqa"]
        rel = "" if r is result["results"][0] or g["relative_pct"] is None else f" ({g['relative_pct']:.0f}%)"
        relv = "" if r is result["results"][0] or v["relative_pct"] is None else f" ({v['relative_pct']:.0f}%)"
        t.add_row(escape(r["label"]), f"{100 * g['accuracy']:.1f}%{rel}", f"{100 * v['accuracy']:.1f}%{relv}",
                  f"{r['visual_tokens_avg']:.1f}/{r['visual_tokens_full']}",
                  " ".join(f"{c:g}" for c in r["visual_tokens_per_layer"]), f"{r['prefill_ms_median']:.1f}")
    console.print(t)
    console.print("(% of vanilla in brackets; the full comparison of every pipeline is docs/results.md)")
    if picture:
        console.print(f"kept tokens of the first sample: {escape(str(picture))}")
    return 0
