"""`nuwa-graph run`: load a model, run a pipeline on one image and prompt, print the report.

`run_command` is what the CLI calls; it returns an exit code (0 ok, 1 run error, 2 pipeline
error) and prints every problem as one clear message, never a traceback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import BudgetError, PipelineError, RunError
from ..pipeline import Pipeline, load
from ..preflight import check_context, check_prompt_text
from ..safe_io import open_image

DEFAULT_PROMPT = "What shapes are in the image, and what colour is each one?"


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | None, device: str) -> str:
    """`auto` (or nothing) stays `auto`, for load_adapter to resolve per family and device:
    float32 off CUDA, on CUDA the dtype the family's official code runs (float16 for LLaVA,
    bfloat16 for Qwen2.5-VL); the run report says which and why."""
    if dtype in (None, "", "auto"):
        return "auto"
    return str(dtype)


def load_image(image: Any):
    """A PIL image from a path (or a PIL image as is); None = the built-in synthetic picture."""
    from PIL import Image

    from ..adapters.tiny import synthetic_image

    if image is None:
        return synthetic_image()
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    p = Path(str(image)).expanduser()
    if not p.is_file():
        raise RunError(f"image {str(image)!r} does not exist; pass --image with a PNG/JPEG file (or leave it out "
                       f"for the built-in sample)")
    return open_image(p, "--image")


def _explain(exc: RunError, pipe: Pipeline | None = None) -> str:
    """Add advice to a node's budget error: name the pipeline variable to lower."""
    msg = str(exc)
    if not isinstance(exc, BudgetError):
        return msg
    limit = f" (at most {exc.limit})"
    names: list[str] = []
    if exc.node is not None and pipe is not None:
        for ns in pipe.spec.nodes:
            if ns.name == exc.node:
                names = sorted(set(_VARIABLE.findall(str(ns.params))))
    if names and pipe is not None:
        shown = ", ".join(f"{n}={pipe.variables.get(n)!r}" for n in names)
        msg += (f"\nhint: the budget is larger than the visual tokens present; lower "
                f"{' or '.join(repr(n) for n in names)} (now {shown}){limit}, e.g. --set {names[0]}=<smaller>")
    else:
        msg += f"\nhint: the budget is larger than the visual tokens present; lower it{limit} in the pipeline file"
    return msg


_VARIABLE = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)")  # a `${name}` in a node's params text


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def describe_schedule(schedule: dict[str, Any]) -> str:
    """One line: the file run (and why), each variable with where its value came from, the sites."""
    head = schedule["file"]
    if schedule.get("instead_of"):
        head += f" (for {schedule['chosen_for_family']} models, instead of {schedule['instead_of']})"
    parts = [f"{k}={v['value']!r} ({v['from']})" for k, v in schedule.get("variables", {}).items()]
    line = head + (": " + ", ".join(parts) if parts else "") + "; sites " + " ".join(schedule.get("sites", []))
    per = {n: v for n, v in schedule.get("resolved", {}).items() if "per" in v}
    if per:  # budgets counted per crop or part: what they resolved to
        line += "; " + ", ".join(f"{n} per {v['per']}: " + ", ".join(f"{k}={x}" for k, x in v.items() if k != "per")
                                 for n, v in per.items())
    return line


def print_report(rep, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    for b, ans in enumerate(rep.answers):
        label = "answer" if len(rep.answers) == 1 else f"answer[{b}]"
        console.print(f"[bold]{label}:[/] {escape(ans)}")
    t = Table(title=f"{escape(rep.pipeline)} on {escape(rep.model)} ({rep.device}, {rep.dtype})", show_header=True)
    t.add_column("measure")
    t.add_column("value", overflow="fold")
    for b, counts in enumerate(rep.visual_tokens_per_layer):
        suffix = "" if len(rep.visual_tokens_per_layer) == 1 else f" [{b}]"
        t.add_row(f"visual tokens per LLM layer{suffix}", " ".join(str(c) for c in counts))
        t.add_row(f"average visual tokens{suffix}", f"{rep.visual_tokens_avg[b]:.2f} (of {rep.visual_tokens_full})")
        geometry = getattr(rep, "geometry", None)
        if geometry and "," in geometry[b]:  # an image made of parts
            t.add_row(f"image parts{suffix}", escape(geometry[b]))
    if rep.dtype_reason:
        t.add_row("dtype", f"{rep.dtype} ({escape(rep.dtype_reason)})")
    if len(rep.devices) > 1:
        t.add_row("devices", ", ".join(rep.devices))
    t.add_row("prefill", f"{rep.prefill_ms:.1f} ms")
    t.add_row("decode", f"{rep.decode_ms_per_token:.1f} ms/token ({rep.decode_steps} steps)")
    t.add_row("peak memory", f"{_fmt_bytes(rep.peak_memory_bytes)} ({rep.peak_memory_source})")
    if rep.peak_memory_above_start_bytes is not None:
        t.add_row("peak memory above the weights", _fmt_bytes(rep.peak_memory_above_start_bytes))
    for _b, fl in enumerate(rep.flops[:1]):
        if "prefill" in fl:
            t.add_row("FLOPs (prefill)", f"{fl['prefill'] / 1e9:.3f} G ({100 * fl['prefill_ratio']:.1f} % of vanilla; "
                                         f"vision {fl['vision'] / 1e9:.3f} G, LLM {fl['llm_prefill'] / 1e9:.3f} G)")
            t.add_row("FLOPs (decode step)", f"{fl['decode_step'] / 1e9:.4f} G (vanilla "
                                             f"{fl['vanilla_decode_step'] / 1e9:.4f} G)")
    t.add_row("KV cache", _fmt_bytes(rep.kv_cache_bytes))
    if rep.node_ms:
        t.add_row("node time", ", ".join(f"{k} {v:.2f} ms" for k, v in rep.node_ms.items()))
    if rep.schedule:
        t.add_row("schedule", escape(describe_schedule(rep.schedule)))
    if rep.signals:
        t.add_row("signals", escape("; ".join(rep.signals)))
    for b, acts in enumerate(rep.actions):
        for a in acts:
            t.add_row("kept" + ("" if len(rep.actions) == 1 else f" [{b}]"),
                      f"{a['kept']} at {a['site']} by {escape(a['node'])}"
                      + (f", positions {a['positions']}" if a["positions"] else "")
                      + (", merged" if a["merged"] else ""))
    console.print(t)


def run_command(pipeline: Pipeline | str | Path, model: str | None = None, image: Any = None, prompt: str | None = None,
                max_new_tokens: int = 16, dtype: str = "float32", device: str = "cpu", seed: int | None = None,
                as_json: bool = False, attn_implementation: str = "sdpa", device_map: str | None = None,
                batch: int = 1) -> int:
    """Run `pipeline` on `model` (default: the embedded model) with one image and prompt; print the report.

    `batch` repeats the image and prompt in one generate call (batched timings on a GPU).
    Returns 0 on success, 1 for an error in an input (an invalid pipeline file, a bad model,
    image or budget, an unsupported signal), as `nuwa-graph run` and docs/cli.md say.
    """
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, soft_wrap=True)
    pipe = None
    try:
        pipe = pipeline if isinstance(pipeline, Pipeline) else load(pipeline)
        if max_new_tokens < 1:
            raise RunError(f"max_new_tokens={max_new_tokens}; it must be at least 1")
        check_prompt_text(prompt)
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        if batch < 1:
            raise RunError(f"--batch {batch}: it must be at least 1")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        img = load_image(image)
        from ..adapters import load_adapter
        from .models import default_model

        adapter = load_adapter(model or default_model(), dt, dev, attn_implementation=attn_implementation,
                               device_map=device_map)
        check_context(adapter, img, prompt, max_new_tokens)
        rep = adapter.generate(pipe, [img] * batch, [prompt] * batch, max_new_tokens=max_new_tokens, seed=seed)
    except PipelineError as exc:  # an input error, as in docs/cli.md "Exit codes" (2 is for usage errors)
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    except RunError as exc:
        err.print(f"[bold red]error:[/] {escape(_explain(exc, pipe))}")
        return 1
    if as_json:
        data = rep.to_dict()
        data["visual_tokens_per_layer"] = rep.visual_tokens_per_layer
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        sys.stdout.flush()
    else:
        print_report(rep)
    return 0
