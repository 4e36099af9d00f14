"""nuwa-graph as an lmms-eval (0.7.x) model: `--model nuwa_graph`.

    python -m lmms_eval --model nuwa_graph \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pipeline=pipelines/nuwa.yaml,budget=64 \\
        --tasks gqa,refcoco_bbox_rec_val --batch_size 8 --output_path runs/lmms --log_samples

Registered through the entry-point group `lmms_eval.models` (pyproject.toml) as a
`ModelManifest` for the model id `nuwa_graph`; this module is imported only by lmms-eval.

model_args: `pretrained` (model id, local folder or preset; default the embedded model),
`pipeline` (a pipeline YAML; default pipelines/vanilla.yaml), `dtype`, `device`, `seed`,
`max_new_tokens` (when the task gives none; default 1024 as llava_hf), `chat_template` (LLaVA,
LLaVA-NeXT), `system_prompt` (the Qwen-VL line; default "You are a helpful assistant."),
`min_pixels` / `max_pixels` (the Qwen-VL line; the defaults of lmms-eval's model for the family,
QWEN_LMMS), `min_patches` / `max_patches` (InternVL; internvl_hf's 1 and 12),
`stats` (the per-sample side file, default
`nuwa_graph_stats/`), and any variable of the pipeline, its value read as
YAML like `--set` (`layers=[2,6,15]`, `budget=64`). An unknown name is an error naming the
pipeline's variables.

Prompts are the text lmms-eval's own model builds for the checkpoint (`prompts.chat_text`:
`llava_hf` for LLaVA and LLaVA-NeXT, `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` for the Qwen-VL
generations; the chat models `internvl_hf` (lmms_eval/models/chat/internvl_hf.py, the class that
loads InternVL3 / 3.5 `-hf` checkpoints) and `llava_hf` (lmms_eval/models/chat/llava_hf.py, what
`--model llava_hf` resolves to, loading LLaVA-OneVision `-hf` checkpoints) for InternVL and
LLaVA-OneVision: one user turn [image, text] through the processor's template, no system message);
Qwen-VL images are prepared as that model does (`qwen_image_as_lmms`: JPEG quality 85 for
qwen2_vl and qwen2_5_vl, the image as given for qwen3_vl, then resized into its pixel range
in multiples of patch x merge: 28 px, 32 px on Qwen3-VL), and its stop-string rule is kept
(qwen2_5_vl and qwen3_vl drop "\n\n" from the stops; qwen2_vl strips the answer). InternVL images
are tiled with internvl_hf's `min_patches` / `max_patches` (`prompts.internvl_tiles_as_lmms`);
OneVision images go to the processor as given, as llava_hf hands them. Neither `llava_hf` (LLaVA,
LLaVA-NeXT, OneVision) nor `internvl_hf` applies the task's `until`: their answers run to the
tokenizer's end token or `max_new_tokens`, decoded without special tokens and not stripped, and
so are the plugin's for these families. Decoding is
the adapter's KV-cached loop: greedy with temperature 0 (the tasks' default), sampled with
`temperature` > 0 or `do_sample` (with `top_k` / `top_p`, seeded by the run's seed:
`adapters.base.Sampling`); stop strings (`until`) cut the answer at their first occurrence on
the Qwen-VL line (not on the llava_hf / internvl_hf families, above).
Beam search, text-only, multi-image and video documents and `loglikelihood` are refused with a
clear error.

Under torchrun / accelerate (WORLD_SIZE > 1) the model binds to cuda:LOCAL_RANK when CUDA is
there and makes the process group (NCCL on GPUs, gloo on CPU) so that lmms-eval's evaluator
gathers the ranks' results itself.

Side file: one JSON line per sample in `STATS/rank{R}-of-{W}.jsonl`: task, split, doc_id,
pipeline, visual tokens per LLM layer, their average, the unpruned count, and what the sample's
generate call cost, as `nuwa-graph eval` measures it (apps/efficiency.py): the batch's prefill
ms, TTFT, decode ms per token, method (node) ms, peak memory, KV-cache bytes, and the sample's
counted FLOPs (vision + LLM; `flops_fn`, when set, replaces them). At the end of
`generate_until`, `STATS/efficiency-rank{R}-of-{W}.json` summarises them per task (medians,
with how each was measured).

`question_agnostic=true` prunes each image from `neutral_prompt` (default: empty, the question
removed, the chat template kept) and answers the task's prompt over the kept tokens
(nuwa_graph/replay.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..adapters.base import Sampling
from ..apps.efficiency import batch_costs
from ..apps.prompts import INTERNVL_LMMS_PATCHES, LMMS_CHAT_FAMILIES, LMMS_MODELS, internvl_tiles_as_lmms
from ..errors import RunError
from ..resources import resolve_pipeline, shipped_pipeline
from .qwen_images import QWEN_LMMS, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, QwenLmms, qwen_image_as_lmms  # noqa: F401

MODEL_ID = "nuwa_graph"
OWN_ARGS = {"pretrained", "pipeline", "dtype", "device", "seed", "max_new_tokens", "chat_template", "system_prompt",
            "stats", "batch_size", "max_batch_size", "min_pixels", "max_pixels", "min_patches", "max_patches",
            "question_agnostic", "neutral_prompt"}
# lmms-eval models that read a task's `until` and never apply it (their generate calls pass only the
# end token): llava_hf (lmms_eval/models/simple/llava_hf.py, generate_until) and internvl_hf
UNTIL_UNREAD = ("llava_hf", "internvl_hf")
DEFAULT_PIPELINE = shipped_pipeline("vanilla")  # installed, or the checkout's pipelines/vanilla.yaml


class PluginError(ValueError):
    """A request or argument the plugin cannot serve; the message says what would work."""


def manifest():
    """The entry point's payload: model id `nuwa_graph` -> NuwaGraph (a simple model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.NuwaGraph")


def _yaml_value(name: str, value: Any) -> Any:
    """A model_args value as `--set` reads it (lmms-eval already turned true/false/numbers)."""
    from ..pipeline import parse_override

    if not isinstance(value, str):
        return value
    try:
        return parse_override(f"{name}={value}")[1]
    except ValueError as exc:
        raise PluginError(f"model_args {name}={value!r}: {exc}") from None


def _whole(name: str, value: Any) -> int:
    """A model_args number lmms-eval may hand over as a string."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: give a whole number") from None


def _launch() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


class NuwaGraph(lmms):
    """A nuwa-graph pipeline on a Hugging Face VLM, served to lmms-eval."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, pipeline: str | None = None, dtype: str = "auto",
                 device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 seed: int | None = None, max_new_tokens: int = 1024, chat_template: str | None = None,
                 system_prompt: str | None = None, stats: str = "nuwa_graph_stats",
                 min_pixels: int | None = None, max_pixels: int | None = None, min_patches: int | None = None,
                 max_patches: int | None = None, question_agnostic: bool = False, neutral_prompt: str = "",
                 **variables: Any) -> None:
        super().__init__()
        import torch

        from ..adapters import load_adapter
        from ..apps.models import default_model
        from ..apps.runner import resolve_device, resolve_dtype
        from ..errors import PipelineError, RunError
        from ..pipeline import load

        rank, world, local = _launch()
        if world > 1 and torch.cuda.is_available() and device in (None, "", "auto", "cuda"):
            device = f"cuda:{local % torch.cuda.device_count()}"
        dev = resolve_device(device)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise PluginError(f"batch_size {batch_size!r}: give a number (auto batch sizes are not supported)") from None
        if self.batch_size_per_gpu < 1:
            raise PluginError(f"batch_size {batch_size!r}: it must be at least 1")
        path = resolve_pipeline(str(pipeline)) if pipeline else DEFAULT_PIPELINE  # a shipped name works too
        if not path.is_file():
            raise PluginError(f"pipeline {str(path)!r} does not exist; pass model_args pipeline=PATH to a pipeline "
                              f"YAML (e.g. pipelines/vanilla.yaml of the nuwa-graph repository)")
        overrides = {k: _yaml_value(k, v) for k, v in variables.items()}
        try:
            base = load(path)
            unknown = sorted(set(overrides) - set(base.variables))
            if unknown:
                known = ", ".join(sorted(base.variables)) or "none"
                raise PluginError(f"model_args {', '.join(unknown)}: not a model argument of nuwa_graph "
                                  f"({', '.join(sorted(OWN_ARGS))}) nor a variable of {path} (its variables: {known})")
            self.pipeline = load(path, overrides)
            self.adapter = load_adapter(str(pretrained) if pretrained else default_model(), resolve_dtype(dtype, dev),
                                        dev)
        except PipelineError as exc:
            raise PluginError(f"pipeline {path}: " + "; ".join(str(p) for p in exc.problems)) from None
        except RunError as exc:
            raise PluginError(str(exc)) from None
        if getattr(self.adapter, "family", "") not in LMMS_MODELS:
            raise PluginError(f"model family {getattr(self.adapter, 'family', '?')!r}: the plugin builds lmms-eval's "
                              f"prompts for " + ", ".join(f"{f} ({m})" for f, m in LMMS_MODELS.items()) + " only")
        family = self.adapter.family
        if family in LMMS_CHAT_FAMILIES:
            for name, given in (("system_prompt", system_prompt), ("chat_template", chat_template)):
                if given is not None:
                    raise PluginError(f"model_args {name}: lmms-eval's {LMMS_MODELS[family]} (a chat model) renders the "
                                      f"processor's own chat template with no system message of its own; leave "
                                      f"{name} out for {family}")
        elif system_prompt is not None and LMMS_MODELS.get(family) == "llava_hf":
            raise PluginError("model_args system_prompt: lmms-eval's llava_hf has none (the checkpoint's chat "
                              "template decides); leave it out for LLaVA, or pass chat_template")
        if family == "internvl":
            try:  # internvl_hf passes these to the processor on every call
                lo = INTERNVL_LMMS_PATCHES[0] if min_patches is None else _whole("min_patches", min_patches)
                hi = INTERNVL_LMMS_PATCHES[1] if max_patches is None else _whole("max_patches", max_patches)
                internvl_tiles_as_lmms(self.adapter, lo, hi)
            except ValueError as exc:
                raise PluginError(f"model_args {exc}") from None
        elif min_patches is not None or max_patches is not None:
            raise PluginError(f"model_args min_patches / max_patches: InternVL's tiling (internvl_hf); model family "
                              f"{family!r} does not tile that way")
        self._device = torch.device(dev)
        self.seed = seed
        self.default_max_new_tokens = int(max_new_tokens)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.pretrained = str(pretrained) if pretrained else "embedded"
        self.qwen = QWEN_LMMS.get(self.adapter.family)  # None: not a Qwen-VL model
        defaults = self.qwen or QwenLmms(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS, True, True, False)
        self.min_pixels = int(defaults.min_pixels if min_pixels is None else min_pixels)
        self.max_pixels = int(defaults.max_pixels if max_pixels is None else max_pixels)
        self._rank, self._world_size = rank, world
        if world > 1:
            import torch.distributed as dist

            if dist.is_available() and not dist.is_initialized():
                # lmms-eval's evaluator then takes its torchrun path: its gathers go through this group
                if self._device.type == "cuda":
                    torch.cuda.set_device(self._device)
                dist.init_process_group("nccl" if self._device.type == "cuda" else "gloo")
        self.stats_path = Path(stats) / f"rank{rank}-of-{world}.jsonl"
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        self.stats_path.write_text("")
        self.flops_fn: Callable[[Any, Any, int], Any] | None = None  # hook: (adapter, RunReport, b) -> FLOPs
        if isinstance(question_agnostic, str):
            question_agnostic = question_agnostic.strip().lower() in ("1", "true", "yes")
        self.question_agnostic = bool(question_agnostic)
        self.neutral_prompt = str(neutral_prompt)
        self.costs: dict[str, list[dict[str, Any]]] = {}  # task -> batch_costs of its generate calls
        self.flops_of: dict[str, list[dict[str, Any]]] = {}  # task -> counted FLOPs per sample

    # --- what lmms-eval reads ---------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def model(self):
        return self.adapter.model

    @property
    def tokenizer(self):
        return getattr(self.adapter.processor, "tokenizer", self.adapter.processor)

    # --- refusals ---------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]):
        raise PluginError("nuwa_graph serves generate_until only: loglikelihood (multiple-choice scoring by "
                          "likelihood) is not implemented; use the task's generation variant")

    def generate_until_multi_round(self, requests):
        raise PluginError("nuwa_graph serves single-round generate_until only (no multi-round tasks)")

    # --- generation -------------------------------------------------------------------------
    def _visual(self, visuals: list, task: str, doc_id) -> Any:

        where = f"task {task!r}, doc {doc_id}"
        if not visuals:
            raise PluginError(f"{where}: a text-only document; nuwa-graph prunes visual tokens and serves "
                              f"documents with images only")
        many = [self._one_visual(v, where) for v in visuals]  # several: one prompt of them, in order
        return many if len(many) > 1 else many[0]

    def _one_visual(self, v: Any, where: str) -> Any:
        from PIL import Image

        if isinstance(v, Image.Image):
            if self.qwen is not None:
                vc = self.adapter.model.config.vision_config
                return qwen_image_as_lmms(v, int(vc.patch_size) * int(vc.spatial_merge_size), self.min_pixels,
                                          self.max_pixels, jpeg=self.qwen.jpeg)
            return v.convert("RGB")
        what = "video or audio" if isinstance(v, (str, dict)) else "unknown"
        raise PluginError(f"{where}: a {type(v).__name__} visual ({what}); "
                          f"only images are served")

    def _options(self, gen_kwargs: dict) -> tuple[int, list[str], Sampling]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, list):
            raise PluginError(f"gen_kwargs until {until!r}: expected a string or a list of strings")
        if self.qwen is not None and self.qwen.drop_blank_line_stop:  # qwen2_5_vl, qwen3_vl drop "\n\n"
            until = [u for u in until if u != "\n\n"]
        if LMMS_MODELS.get(self.adapter.family) in UNTIL_UNREAD:  # llava_hf, internvl_hf: read, never applied
            until = []
        # as lmms-eval's llava_hf / Qwen models: temperature > 0 samples, 0 (the tasks' default) is greedy
        temperature = float(kw.get("temperature") or 0.0)
        do_sample = bool(kw.get("do_sample")) or temperature > 0
        try:
            sampling = Sampling(do_sample=do_sample, temperature=temperature if temperature > 0 else 1.0,
                                top_k=int(kw.get("top_k") or 0),
                                top_p=float(kw["top_p"]) if kw.get("top_p") is not None else 1.0)
        except RunError as exc:
            raise PluginError(f"gen_kwargs: {exc}") from None
        if int(kw.get("num_beams") or 1) != 1:
            raise PluginError(f"gen_kwargs num_beams={kw.get('num_beams')}: beam search is not supported")
        return int(kw.get("max_new_tokens") or self.default_max_new_tokens), [u for u in until if u], sampling

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        from ..apps.prompts import chat_text

        # batches of one task, split and generation options, in request order
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, _, task, split = req.args
            groups.setdefault((task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"nuwa_graph [{self.rank}/{self.world_size}]", position=self.rank)
        with self.stats_path.open("a") as stats:
            for idx in groups.values():
                for lo in range(0, len(idx), self.batch_size):
                    chunk = idx[lo:lo + self.batch_size]
                    args = [requests[i].args for i in chunk]
                    max_new, until, sampling = self._options(args[0][1])
                    images, prompts = [], []
                    for context, _, doc_to_visual, doc_id, task, split in args:
                        images.append(self._visual(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id))
                        n = len(images[-1]) if isinstance(images[-1], list) else 1
                        prompts.append(chat_text(self.adapter, context, self.system_prompt, self.chat_template, n))
                    rep = self._generate(images, prompts, max_new, sampling)
                    costs = batch_costs(rep)
                    self.costs.setdefault(args[0][4], []).append(costs)
                    self.flops_of.setdefault(args[0][4], []).extend(rep.flops or [])
                    full = getattr(rep, "visual_tokens_full_per_sample", None) or [rep.visual_tokens_full] * len(chunk)
                    for b, i in enumerate(chunk):
                        answer = rep.answers[b]
                        for stop in until:
                            answer = answer.split(stop)[0]
                        out[i] = answer.strip() if self.qwen is not None and self.qwen.strip else answer
                        _, _, _, doc_id, task, split = args[b]
                        stats.write(json.dumps({
                            "task": task, "split": split, "doc_id": doc_id, "pipeline": self.pipeline.name,
                            "visual_tokens_per_layer": rep.visual_tokens_per_layer[b],
                            "visual_tokens_avg": rep.visual_tokens_avg[b], "visual_tokens_full": full[b],
                            "prefill_ms_batch": round(rep.prefill_ms, 3), "batch_size": len(chunk),
                            "ttft_ms_batch": costs["ttft_ms"], "decode_ms_per_token_batch": costs["decode_ms_per_token"],
                            "method_ms_batch": costs["method_ms"], "peak_memory_bytes_batch": costs["peak_memory_bytes"],
                            "peak_memory_source": costs["peak_memory_source"],
                            "kv_cache_bytes_per_sample": costs["kv_cache_bytes"] / len(chunk),
                            "question_agnostic": self.question_agnostic,
                            "flops": self.flops_fn(self.adapter, rep, b) if self.flops_fn else
                            (rep.flops[b] if rep.flops else None)}) + "\n")
                        self.cache_hook.add_partial("generate_until", (args[b][0], args[b][1]), answer)
                    bar.update(len(chunk))
        bar.close()
        self._write_efficiency()
        return [a if a is not None else "" for a in out]

    def _generate(self, images: list, prompts: list[str], max_new: int, sampling: Sampling):
        if not self.question_agnostic:
            return self.adapter.generate(self.pipeline, images, prompts, max_new_tokens=max_new, seed=self.seed,
                                         sampling=sampling)
        from ..apps.prompts import chat_text
        from ..replay import generate_question_agnostic

        neutral = [chat_text(self.adapter, self.neutral_prompt, self.system_prompt, self.chat_template)] * len(prompts)
        rep, _ = generate_question_agnostic(self.adapter, self.pipeline, images, prompts, neutral,
                                            max_new_tokens=max_new, seed=self.seed, sampling=sampling)
        return rep

    def _write_efficiency(self) -> None:
        """STATS/efficiency-rank{R}-of-{W}.json: per task, the cost columns of `nuwa-graph eval`."""
        from ..apps.efficiency import summarize_costs
        from ..flops import mean_flops

        path = self.stats_path.with_name(f"efficiency-rank{self.rank}-of-{self.world_size}.json")
        path.write_text(json.dumps({"pipeline": self.pipeline.name, "question_agnostic": self.question_agnostic,
                                    "tasks": {t: summarize_costs(c, mean_flops(self.flops_of.get(t, [])))
                                              for t, c in self.costs.items()}}, indent=1) + "\n")


__all__ = ["MODEL_ID", "QWEN_LMMS", "NuwaGraph", "PluginError", "manifest", "qwen_image_as_lmms"]
