"""What a model family provides, with its defaults, and the checks of a pipeline against it.

Extension points (what a family subclass implements; LLaVA in llava.py is the example):

- class attributes `family`, `model_types` (config.model_type values handled),
  `family_group` (the group of families sharing a token stream and its signals, e.g. `qwen-vl`;
  `family_files` keys may name it), `has_cls` (the vision tower has a CLS token),
  `supported_signals` (the SIGNAL_KINDS this family can give) and `official_dtype` /
  `official_dtype_source` (what its official code runs on a GPU: `--dtype auto` on CUDA);
  decorate the class with `@register_adapter` so `load_adapter` finds it by model_type.
- `from_pretrained(cls, id_or_path, dtype, device)`: load model + processor (real hub
  code path; tests use tiny presets).
- `text_model()`, `decoder_layers()`, `lm_head()`, `embed(ids)`; `rotary(h, pos)` if the
  text model's rotary embedding is not `text_model().rotary_emb(h, pos)`.
- `vision_attention_modules()`: attention modules of the vision tower (they get the
  registered attention function; `on_vision_attention` is called for them).
- `encode(images, prompts) -> Encoded` (processor, left padding) and
  `split_sample(enc, b) -> SampleLayout` (where the image block sits, full positions;
  the default finds the run of `image_token_id` and numbers 1-D positions from 0).
- `vision_forward(run) -> VisionOut`: run the vision tower (with the captures the
  requests need), give per-sample vision-space tokens and the full projected tokens.
- `project(x)`: vision space -> LLM space (for merged vision-space tokens and CLS).
- `read_vision_signal(run, req, b)`: the `vision.*` signals; `check_request(req)` checks
  one request's arguments, `unavailable_signal(req)` says why a signal cannot be given
  and `refusal_hint(ex)` adds advice to a refused pipeline.
- `visual_positions(layout, ids, plan)`: absolute position ids (P, k) of the kept visual
  tokens for a PositionPlan (1-D default: image_start + offsets; None = contiguous).
  Position tensors are always (P, n) per sample (P = 1 for LLaVA, 3 for M-RoPE) and
  (P, B, L) for a batch; `llm_position_ids` turns them into what the text model takes.
- `llm_position_ids(pos)`: (P, B, L) -> the text model's `position_ids` (default: pos[0]).
- `geometry(run, b)`: the sample's `Geometry` (grid the pipeline sees, image_start);
  `image_geometries(run, b)`: one per image of a prompt of several (default: `geometry`),
  `image_runs(ids)`: where each image's placeholders sit (default: each run of
  `image_token_id`); a prompt of several images is several visual blocks with text between
  them (layout.py `SampleLayout`, prompt_geometry.py, docs/multi-image.md).
- `post_layers()` / `on_layer_output(run, layer, seg, hidden)`: decoder layers whose OUTPUT
  the family changes during prefill, and the change (Qwen3-VL's DeepStack adds vision rows
  to the visual positions still present after layers 0..2); the session hooks them.
- `turn_text(question)` / `turn_end_id()`: a later user turn of a conversation in the
  family's chat format, and the token that ends an answer (adapters/conversation.py).
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

from ..errors import RunError
from ..executor import Executor
from ..pipeline import Pipeline
from ..prompt_geometry import PromptGeometry, prompt_geometry
from ..signals import SignalRequest
from ..sites import Site
from ..types import Geometry, PositionPlan
from .image_runs import image_runs
from .layout import Encoded, SampleLayout, Segment, VisionOut
from .state import AdapterRun

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a question (chat_prompt), on every family
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
BUDGETS_TRIED = (160, 320, 640, 1280)  # variables_hint: LLaVA-NeXT papers' budgets (5 crops x 32/64/128), and more
LLM_SIGNALS = frozenset({"external", "pre_llm.visual", "pre_llm.text", "llm.attention", "llm.hidden", "llm.keys",
                         "llm.token_hidden"})
_counter = itertools.count()


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise RunError(f"unknown attention implementation {name!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name.startswith("flash"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise RunError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install "
                           "flash-attn, CUDA only); use sdpa")
    return name


def indexed_device(device: str | torch.device) -> torch.device:
    """`device` with its index: plain "cuda" is the current GPU (tensors on it say cuda:N)."""
    d = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


def layer_variable_hint(pipe: Pipeline, site: Site) -> str:
    """'change K (now 40), e.g. --set K=...': the pipeline variables that put a node at `site`."""
    from ..validation import layer_variable_hint as hint

    return hint(pipe.spec, {n for n, s in pipe.sites.items() if s == site}, pipe.variables)


class FamilyHooks:
    """The family extension points with their defaults (see the module docstring)."""

    family: ClassVar[str] = ""
    family_group: ClassVar[str] = ""  # "" = the family is its own group
    has_cls: ClassVar[bool] = False
    model_types: ClassVar[tuple[str, ...]] = ()
    supported_signals: ClassVar[frozenset[str]] = LLM_SIGNALS
    #: the dtype the family's official code runs on a GPU (`--dtype auto` picks it on CUDA), and
    #: where that is said
    official_dtype: ClassVar[str] = "bfloat16"
    official_dtype_source: ClassVar[str] = "the family's official code"

    def __init__(self, model: nn.Module, processor: Any, name: str = "", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
        self.model = model.eval()
        self.processor = processor
        self.name = name or self.family
        self.dtype = dtype
        self.device = indexed_device(device)
        # layers no scorer reads run this implementation (sdpa | flash_attention_2 | eager)
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.attn_name = f"nuwa_rows_{self.family}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
        self._run: AdapterRun | None = None
        self._attn_index: dict[int, tuple[str, int]] = {}
        self._layer_hooks: list[Any] = []  # the session's decoder-layer hook handles
        self._runnable: list[tuple[str, str | None]] | None = None  # runnable_shipped(), once
        # pipeline object -> (that pipeline, bound to this model, and its executor); see Generation._bind
        self._bound: OrderedDict[int, tuple[Pipeline, Executor]] = OrderedDict()

    # ---- family hooks (override) -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, id_or_path: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                        device_map: str | dict | None = None) -> Self:
        raise NotImplementedError

    def set_attn_implementation(self, name: str) -> Self:
        """Run the model's own attention with `name` (sdpa | flash_attention_2 | eager)."""
        self.attn_implementation = check_attn_implementation(name)
        self.model.set_attn_implementation(name)
        return self

    def text_model(self) -> nn.Module:
        raise NotImplementedError

    def auxiliary_modules(self) -> list[nn.Module]:
        """Models the adapter runs next to the VLM (CDPruner's CLIP text tower), loaded on the
        adapter's device: a device_map covers the VLM only, these stay where the adapter is."""
        return []

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model().embed_tokens(ids.to(self.device))

    def rotary(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for position ids `pos` as the text model takes them."""
        return self.text_model().rotary_emb(h, pos)

    def llm_position_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """(P, B, L) -> the text model's position_ids (1-D RoPE: (B, L))."""
        return pos[0]

    def vision_attention_modules(self) -> list[nn.Module]:
        return []

    def on_vision_attention(self, run: AdapterRun, layer: int, module: nn.Module, query: torch.Tensor,
                            key: torch.Tensor, kwargs: dict) -> None:
        """Called (in the vision pass) for each vision attention module; capture rows/keys."""

    def encode(self, images: list, prompts: list[str]) -> Encoded:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def split_sample(self, enc: Encoded, b: int) -> SampleLayout:
        """Default: one contiguous run of `image_token_id`; 1-D positions from 0."""
        ids = enc.input_ids[b][enc.attention_mask[b].bool()]
        pos = torch.arange(ids.numel())[None]
        return SampleLayout.of(ids, pos, self.image_runs(ids, self.image_token_counts(enc, b)))

    def image_token_counts(self, enc: Encoded, b: int) -> list[int] | None:
        """Placeholder tokens of each image of sample b, when the family knows them before the
        vision pass (they split images whose placeholders touch); None: unknown."""
        return None

    def image_runs(self, ids: torch.Tensor, counts: list[int] | None = None) -> list[tuple[int, int]]:
        """[(start, end), ...] of each image's placeholder run in a sample's ids: each maximal run
        of `image_token_id`, cut by `counts` (tokens per image) where images touch."""
        return image_runs(ids == self.image_token_id, counts)

    def vision_forward(self, run: AdapterRun) -> VisionOut:
        raise NotImplementedError

    def chat_prompt(self, question: str, images: int = 1) -> str:
        """A question about `images` images: each `<image>` (one per image) in the family's chat
        template (`with_placeholders`); none: as it is (encode puts the images before it)."""
        n = question.count(IMAGE_PLACEHOLDER)
        if n == 0:
            return question
        if n != images:
            raise RunError(f"the prompt holds {n} image placeholders {IMAGE_PLACEHOLDER!r} for {images} image"
                           f"{'s' if images != 1 else ''}; give one per image (where it goes), or none (the images "
                           f"then go before the question, in order)")
        return self.with_placeholders(question)

    def with_placeholders(self, question: str) -> str:
        """The chat prompt around a question whose `<image>`s say where the images go."""
        raise RunError(f"the {self.family} adapter does not place images at '<image>' placeholders; write the "
                       f"question without them (the images go before it)")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def read_vision_signal(self, run: AdapterRun, req: SignalRequest, b: int) -> torch.Tensor:
        raise RunError(f"{self.family} adapter cannot give signal {req.kind}")

    def check_request(self, req: SignalRequest) -> str | None:
        """Family checks of one request's arguments (e.g. layer range); a message or None."""
        return None

    def unavailable_signal(self, req: SignalRequest) -> str | None:
        """Why this family cannot give `req`'s signal kind at all (None: it can)."""
        if req.kind in self.supported_signals:
            return None
        return (f"signal {req.kind!r} (read at {req.site}) is not available for the {self.family} "
                f"family; it gives: {', '.join(sorted(self.supported_signals))}")

    def refusal_hint(self, ex: Executor) -> str:
        """Advice appended to the refusal of a pipeline this model cannot run ('' = none): when
        it reads a signal this family cannot give, or a node says it cannot work on this model
        (`Node.check_model`), the shipped files that do run here."""
        if (not any(self.unavailable_signal(req) for req in ex.requests())
                and not ex.model_problems(self.model_variables())):
            return ""
        return f"\nhint: {self.runnable_hint()}"

    def runnable_shipped(self) -> list[tuple[str, str | None]]:
        """The shipped pipeline files this model runs unchanged, as (name, the file its
        `family_files` runs instead or None), each bound to this model and checked as
        `check_pipeline` checks a run (signals, arguments, sites); worked out once per adapter."""
        if self._runnable is None:
            from ..errors import PipelineError
            from ..pipeline import load
            from ..resources import shipped_names, shipped_pipeline

            found: list[tuple[str, str | None]] = []
            for name in shipped_names():
                try:
                    bound = load(shipped_pipeline(name)).bind_model(self.model_variables())
                    if not self.check_pipeline(Executor(bound)):
                        found.append((name, Path(bound.source).stem if bound.chosen_from else None))
                except (PipelineError, RunError):
                    continue
            self._runnable = found
        return self._runnable

    def runnable_hint(self) -> str:
        """'shipped files that run on this model (qwen3_vl): pipelines/nuwa.yaml (runs nuwa_qwen.yaml
        here), pipelines/fastv.yaml, ...' (the routing and checks of `runnable_shipped`)."""
        files = [f"pipelines/{name}.yaml" + (f" (runs {chosen}.yaml here)" if chosen else "")
                 for name, chosen in self.runnable_shipped()]
        return (f"shipped files that run on this model ({self.family}): {', '.join(files)}" if files
                else f"no shipped file runs on this model ({self.family})")

    def variables_hint(self, pipeline: Pipeline) -> str:
        """Advice appended when `pipeline`'s expressions do not fit this model's variables ('' = none):
        on a model of several crops, the smallest of the budgets papers report on tiled models
        (BUDGETS_TRIED) with which the file does fit, when a per-crop budget came out too small."""
        from ..errors import PipelineError

        model_vars = self.model_variables()
        crops = model_vars.get("crops", 1)
        if crops <= 1 or "budget" not in pipeline.variables:
            return ""
        for budget in BUDGETS_TRIED:
            if budget <= pipeline.variables["budget"]:
                continue
            try:
                pipeline.with_overrides({"budget": budget}).bind_model(model_vars)
            except PipelineError:
                continue
            return (f"\nhint: this model cuts an image into up to {crops} crops and files that count a budget per "
                    f"crop divide it by {crops} (LLaVA-NeXT papers: 160 / 320 / 640 = 5 x 32 / 64 / 128): raise it, "
                    f"e.g. --set budget={budget} (the smallest of {', '.join(map(str, BUDGETS_TRIED))} that fits)")
        return ""

    def geometry(self, run: AdapterRun, b: int) -> Geometry:
        raise NotImplementedError

    @staticmethod
    def image_indices(run: AdapterRun, b: int) -> list[int]:
        """Indices of sample b's images among the batch's images, in prompt order (encode stores
        `images_per_sample` when a prompt has several)."""
        counts = run.enc.extras.get("images_per_sample")
        if counts is None:
            return [b]
        start = sum(counts[:b])
        return list(range(start, start + counts[b]))

    def image_geometries(self, run: AdapterRun, b: int) -> list[Geometry]:
        """The Geometry of each image of sample b, in prompt order (default: one image)."""
        return [self.geometry(run, b)]

    def prompt_geometry(self, run: AdapterRun, b: int) -> Geometry:
        """Sample b's geometry: its one image's, or its images' composed in one id space
        (prompt_geometry.py); the layout learns which image each id belongs to."""
        geoms = self.image_geometries(run, b)
        lay = run.layouts[b]
        if len(geoms) != len(lay.images):
            raise RunError(f"sample {b}: the prompt has {len(lay.images)} image blocks but {len(geoms)} images were "
                           f"encoded for it")
        for i, (g, im) in enumerate(zip(geoms, lay.images)):
            if g.n_tokens != im.n:
                raise RunError(f"sample {b}: image {i + 1} has {im.n} placeholder tokens in the prompt but its "
                               f"geometry gives {g.n_tokens} ({g.describe()})")
        geom = prompt_geometry(geoms)
        if isinstance(geom, PromptGeometry):
            lay.id_blocks = geom.block_table()
        return geom

    def post_layers(self) -> frozenset[int]:
        """Decoder layers whose output `on_layer_output` changes during prefill (default none)."""
        return frozenset()

    def on_layer_output(self, run: AdapterRun, layer: int, seg: Segment, hidden: torch.Tensor) -> torch.Tensor | None:
        """The output of decoder `layer` at prefill, changed (None: unchanged); `seg` is the layout
        that layer saw (its visual tokens `seg.img_ids` at `seg.img_idx`, after any Keep there)."""
        return None

    def visual_positions(self, layout: SampleLayout, ids: torch.Tensor, plan: PositionPlan | None) -> torch.Tensor:
        """Absolute positions (P, k) for kept visual tokens `ids` (1-D default)."""
        s = layout.images[0].pos[:, :1]
        if plan is None:
            return s + torch.arange(ids.numel())[None]
        if plan.offsets.numel() != ids.numel():
            raise RunError("the position plan does not match the kept tokens")
        return s + plan.offsets.reshape(1, -1).long()

    # ---- conversations (adapters/conversation.py) ---------------------------------------
    def turn_text(self, question: str) -> str:
        """The text of a later user turn, right after a finished answer, in the chat format."""
        raise RunError(f"multi-turn conversations are not available for the {self.family} family (no turn_text)")

    def _tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def turn_end_id(self) -> int:
        """The token that ends an answer in the chat format (default: the tokenizer's EOS)."""
        eos = self._tokenizer().eos_token_id
        if eos is None:
            raise RunError(f"{self.name}: the tokenizer has no EOS token to end an answer with")
        return int(eos)

    def turn_ids(self, question: str) -> list[int]:
        """`turn_text(question)` as token ids (no BOS)."""
        return list(self._tokenizer()(self.turn_text(question), add_special_tokens=False)["input_ids"])

    def pad_id(self) -> int:
        tok = self._tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad or 0)

    # ---- checks --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers())

    def model_variables(self) -> dict[str, Any]:
        """Values of the pipeline model variables (pipeline.MODEL_VARIABLES) for this model."""
        vc = getattr(self.model.config, "vision_config", None)
        depth = getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", None)
        out: dict[str, Any] = {"family": self.family, "family_group": self.family_group or self.family,
                               "has_cls": self.has_cls, "llm_layers": self.n_layers, "clip_text": False}
        if depth:
            out["vision_layers"] = int(depth)
        return out

    def check_pipeline(self, ex: Executor) -> list[str]:
        """What this model cannot do of a bound pipeline, found before any forward pass
        (one line per problem; an empty list: it can run)."""
        problems = []
        for site in ex.sites():
            if site.layer is not None and site.layer >= self.n_layers:
                problems.append(f"site {site} is past the last LLM layer ({self.n_layers - 1}); "
                                + layer_variable_hint(ex.pipeline, site))
        problems += ex.model_problems(self.model_variables())
        for req in ex.requests():
            missing = self.unavailable_signal(req)
            if missing:
                problems.append(missing)
                continue
            msg = self.check_request(req)
            if msg:
                problems.append(msg)
        return problems
