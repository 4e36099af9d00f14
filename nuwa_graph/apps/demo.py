"""`nuwa-graph run FILE` with no model, image or prompt: the pipeline against vanilla and two baselines.

The README's main job. On the embedded model and the built-in shapes-world sample set it
answers every grounding and VQA question with vanilla, the pipeline, and - when the pipeline
has an integer `budget` - VisionZip and FastV at that same budget (the methods it is most
often compared with: a vision-side and an LLM-side pruner). It prints accuracy, % of
vanilla, average visual tokens per LLM layer and prefill time side by side, the schedule
each file used on this model (layer schedules are scaled to its depth, docs/pipelines.md),
and draws the pipeline's kept tokens of the first sample over its image. About 12 s on 2
idle CPU cores with the committed 16-layer model (docs/cli.md); nothing here depends on its
depth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import PipelineError, RunError
from ..pipeline import Pipeline, load
from ..resources import pipelines_dir
from .errors import EvalError
from .evaluate import EvalRun, evaluate
from .models import default_model
from .scoring import tokens_runs
from .tasks import load_data, sample_data

PIPELINES = pipelines_dir()  # the shipped pipelines (installed, or the checkout's pipelines/)
VANILLA = PIPELINES / "vanilla.yaml"
BASELINES = ("visionzip", "fastv")  # shown beside the pipeline at its budget
DEMO_SAMPLES = 40  # grounding and VQA samples each (the whole built-in sample set)


def _shipped(name: str) -> Path:
    path = PIPELINES / f"{name}.yaml"
    if not path.is_file():
        raise RunError(f"the reference pipeline {path} is missing; pass --model/--prompt for a single run instead")
    return path


def _shown(path: Path) -> str:
    """The path relative to the working directory when it lies below it (as the user would type it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def demo_runs(pipeline: Pipeline) -> list[EvalRun]:
    """vanilla, the pipeline, then each baseline at the pipeline's budget (if it has an integer one)."""
    runs = [EvalRun("vanilla", _shown(VANILLA), {}, load(_shipped("vanilla")))]
    if pipeline.name != "vanilla":
        runs.append(EvalRun(pipeline.name, pipeline.source, {}, pipeline))
    budget = pipeline.variables.get("budget")
    if isinstance(budget, int) and not isinstance(budget, bool):
        for name in BASELINES:
            if name != pipeline.name:
                path = _shown(_shipped(name))
                runs.append(EvalRun(f"{name} budget={budget}", path, {"budget": budget}, load(path, {"budget": budget})))
    return runs


def run_demo(pipeline: Pipeline, out: str | Path = "runs/run", samples: int = DEMO_SAMPLES, max_new_tokens: int = 6,
             seed: int | None = None, dtype: str = "float32", device: str = "cpu", as_json: bool = False,
             console=None, attn_implementation: str = "sdpa", device_map: str | None = None, batch: int = 20) -> int:
    """Evaluate vanilla, `pipeline` and the baselines on the sample set; print the comparison; 0 on success."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from ..adapters import load_adapter
    from .runner import describe_schedule
    from .viz import draw_kept, safe_name

    err = Console(stderr=True, soft_wrap=True)
    console = console or Console()
    out = Path(out)
    try:
        model = default_model()
        adapter = load_adapter(model, dtype, device, attn_implementation=attn_implementation, device_map=device_map)
        tasks = load_data(sample_data(out / "sample_data"), limit=samples)
        runs = demo_runs(pipeline)
        total = len(runs) * sum(len(t.samples) for t in tasks)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            job = bar.add_task("run", total=total)
            result = evaluate(adapter, runs, tasks, batch=batch, max_new_tokens=max_new_tokens, seed=seed,
                              progress=lambda d, k: bar.update(job, description=escape(d), advance=k))
    except (EvalError, RunError, PipelineError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 2 if isinstance(exc, PipelineError) else 1
    mine = next((r for r in result["results"] if r["label"] == pipeline.name), result["results"][0])
    picture = None
    if mine.get("sample_image") and (mine.get("grid") or mine.get("views")):
        picture = draw_kept(mine["sample_image"], mine.get("sample_kept") or {}, mine.get("grid"),
                            out / f"{safe_name(mine['label'])}_kept.png",
                            title=f"{mine['label']}: {mine.get('sample_prompt', '')}", views=mine.get("views"))
    if as_json:
        slim = {**result, "results": [{k: v for k, v in r.items() if k != "predictions"} for r in result["results"]],
                "picture": str(picture) if picture else None}
        sys.stdout.write(json.dumps(slim, indent=2, default=str) + "\n")
        return 0
    n = {d["task"]: d["n"] for d in result["data"]}
    from ..embedded import WEIGHTS_DIR

    shown = "the embedded model" if Path(model).resolve() == WEIGHTS_DIR.resolve() else Path(model).name
    layers = len(result["results"][0]["visual_tokens_per_layer"])
    t = Table(title=f"{escape(mine['label'])} beside vanilla and the baselines on {escape(shown)} ({layers} LLM "
                    f"layers); built-in sample set: {n.get('grounding', 0)} grounding + {n.get('vqa', 0)} VQA")
    t.add_column("run")
    t.add_column("budget", justify="right")
    t.add_column("grounding Acc@0.5 (% vanilla)", justify="right")
    t.add_column("VQA EM (% vanilla)", justify="right")
    t.add_column("avg visual tokens/layer", justify="right")
    t.add_column("per LLM layer")
    t.add_column("prefill ms", justify="right")
    for r in result["results"]:
        g, v = r["tasks"]["grounding"], r["tasks"]["vqa"]
        rel = "" if r is result["results"][0] or g["relative_pct"] is None else f" ({g['relative_pct']:.0f}%)"
        relv = "" if r is result["results"][0] or v["relative_pct"] is None else f" ({v['relative_pct']:.0f}%)"
        budget = ((r.get("schedule") or {}).get("variables") or {}).get("budget", {}).get("value", "-")
        t.add_row(escape(r["pipeline"]), escape(str(budget)), f"{100 * g['accuracy']:.1f}%{rel}",
                  f"{100 * v['accuracy']:.1f}%{relv}", f"{r['visual_tokens_avg']:.1f} of {r['visual_tokens_full']}",
                  tokens_runs(r["visual_tokens_per_layer"]), f"{r['prefill_ms_median']:.0f}")
    console.print(t)
    console.print("(% of vanilla in brackets; the same `budget` for every pruned run, counted as each method "
                  "counts it - the average column is what the LLM really processed; 16x15 = 16 tokens on 15 layers; every "
                  "pipeline at 64/128/192: docs/results.md)")
    for r in result["results"][1:]:
        if r.get("schedule"):
            console.print(f"schedule: {escape(describe_schedule(r['schedule']))}")
    if picture:
        console.print(f"kept tokens of the first sample: {escape(str(picture))}")
    return 0
