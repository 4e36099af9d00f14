"""A request from start to answer: bind the pipeline, run the vision pass and the sites
before the LLM, assemble the LLM input, prefill, and decode with a KV cache.

The LLM input is left padded with explicit position ids; the image block of each sample is
what the `vision` and `pre_llm` sites left of the projected tokens (`Block`). A pipeline is
bound to the model (`bind_model`, an Executor, the checks) once per pipeline object.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from ..context import Keep, sample_key
from ..errors import PipelineError, RunError
from ..executor import Executor
from ..loader import family_file_of
from ..pipeline import Pipeline
from ..replay import ReplayExecutor, recorded_keeps
from ..sites import Site
from .layout import Block, Segment, VisionOut, columns, decode_mask, host_keeps
from .report import PeakMemory, RunReport, build_report, kv_cache_bytes, model_devices, sync
from .runs import by_image, image_positions, place_runs
from .sampling import GREEDY, Sampling
from .session import HookSession
from .state import AdapterRun

#: bound pipelines an adapter keeps (the most recently used)
BOUND_CACHE_SIZE = 32


class Generation(HookSession):
    """Adapter layer: the run life cycle (`generate`, `forward_logits`)."""

    #: on CUDA, synchronise every device of the model around each node, so `RunReport.node_ms`
    #: is the nodes' own time (their GPU work included); False: no sync, host time only
    sync_node_timing: bool = True
    #: why the model runs in its dtype (set by load_adapter; shown in the run report)
    dtype_reason: str = ""

    def _bind(self, pipeline: Pipeline) -> Executor:
        """An Executor for `pipeline` bound to this model, checked against it; made once per
        pipeline object (the last BOUND_CACHE_SIZE are kept), not on every call."""
        hit = self._bound.get(id(pipeline))
        if hit is not None and hit[0] is pipeline:
            self._bound.move_to_end(id(pipeline))
            return hit[1]
        model_vars = self.model_variables()
        try:
            bound = pipeline.bind_model(model_vars)
        except PipelineError as exc:
            if family_file_of(pipeline.spec.family_files, model_vars) is None:
                self._refuse(Executor(pipeline), signals_only=True)  # what it reads can never be had here: say that
            raise RunError(f"pipeline {pipeline.name!r} does not fit this model "
                           f"({model_vars}):\n{exc}{self.variables_hint(pipeline)}") from None
        ex = Executor(bound)
        self._refuse(ex)
        self._bound[id(pipeline)] = (pipeline, ex)  # the pipeline is held, so its id is not reused
        while len(self._bound) > BOUND_CACHE_SIZE:
            self._bound.popitem(last=False)
        return ex

    def _refuse(self, ex: Executor, signals_only: bool = False) -> None:
        """RunError 'cannot run' with the problems `check_pipeline` finds and the family's hint;
        `signals_only`: only signals this family can never give (for a pipeline not yet bound)."""
        problems = ([m for m in (self.unavailable_signal(r) for r in ex.requests()) if m] if signals_only
                    else self.check_pipeline(ex))
        if problems:
            raise RunError(f"pipeline {ex.pipeline.name!r} cannot run on {self.name}:\n  - " + "\n  - ".join(problems)
                           + self.refusal_hint(ex))

    def _pre_llm(self, r: AdapterRun, vis: VisionOut) -> None:
        """Vision and pre_llm sites; leaves r.blocks."""
        reader = self._reader(r)
        vis_site, pre_site = Site("vision"), Site("pre_llm")
        for s in r.sites:
            if s.layer is None and s not in (vis_site, pre_site):
                raise RunError(f"unsupported site {s}")
        r.vision_out = vis
        r.blocks = [None] * r.B  # built from the projected tokens when first needed
        for site in (vis_site, pre_site):
            if site not in r.sites:
                continue
            assert r.state is not None
            if site == pre_site and any(q.kind == "pre_llm.visual" for q in r.ex.requests()):
                for b in range(r.B):  # the projector is the model's work, not the nodes' (node time)
                    self._visual_block(r, b)
            on_device = r.ex.run_site(r.state, site, reader, r.seed)
            acts = host_keeps(on_device)
            for b in range(r.B):
                for act, dev_act in zip(acts[b], on_device[b]):
                    r.blocks[b] = self._apply_pre_keep(r, b, act, vis, dev_act.ids)
        for b in range(r.B):
            self._visual_block(r, b)

    def _apply_pre_keep(self, r: AdapterRun, b: int, act: Keep, vis: VisionOut,
                        dev_ids: torch.Tensor | None = None) -> Block:
        """The block after a Keep before the LLM. `act.ids` are on the host (checked there);
        `dev_ids` are the same ids where the node made them, to gather the rows without a
        copy of an index from the host (one gather, not one copy per kept token)."""
        ids = act.ids.long()
        if act.tokens is not None:  # new rows: the tokens present before are not needed
            vals = act.tokens.values
            if act.tokens.space == "vision":
                rows = self.project(vals.to(self.device, self.dtype)[None])[0]
            elif act.tokens.space == "llm":
                rows = vals.to(self.device, self.dtype)
            else:
                raise RunError(f"node {act.node!r}: unknown token space {act.tokens.space!r} (vision or llm)")
            return self._block(r, b, act, ids, rows, dev_ids)
        block = self._visual_block(r, b)
        cls = vis.cls[b]
        ok = torch.isin(ids, block.ids) | ((ids == -1) & (cls is not None))
        if not bool(ok.all()):  # on the host: no sync
            bad = ids[~ok][0].item()
            raise RunError(f"node {act.node!r} keeps token {bad} at {act.site}, which is not present there")
        dev = block.rows.device
        dev_ids = dev_ids.to(dev).long() if dev_ids is not None else ids.to(dev)
        if block.dev_ids is None and torch.equal(block.ids, torch.arange(block.ids.numel())):
            at = dev_ids.clamp(min=0)  # the full block in raster order: a token's id is its row
        else:
            known = block.dev_ids if block.dev_ids is not None else block.ids.to(dev)
            at = columns(known, dev_ids.clamp(min=0), check=False)
            assert at is not None
        rows = block.rows.index_select(0, at.clamp(max=max(block.rows.shape[0] - 1, 0))) if ids.numel() \
            else block.rows[:0]
        if cls is not None and bool((ids == -1).any()):  # the kept CLS row (id -1), projected
            cls_row = self.project(cls.to(self.device, self.dtype)[None, None])[0, 0]
            rows = torch.where((dev_ids == -1)[:, None], cls_row.to(rows), rows)
        return self._block(r, b, act, ids, rows, dev_ids)

    def _block(self, r: AdapterRun, b: int, act: Keep, ids: torch.Tensor, rows: torch.Tensor,
               dev_ids: torch.Tensor | None) -> Block:
        layout = r.layouts[b]
        if act.positions is not None:
            per_image = image_positions(layout, ids, act.positions, self.visual_positions)
            return Block(ids, rows, torch.cat(per_image, dim=1) if len(per_image) > 1 else per_image[0],
                         act.positions.text_follows, dev_ids)
        return Block(ids, rows, None, "compact", dev_ids)

    def _assemble(self, r: AdapterRun) -> tuple[torch.Tensor, torch.Tensor, Segment]:
        """inputs_embeds (B, L, d), 2-D mask, and segment 0 for the LLM: each sample's text runs
        with each image's block between them (`place_runs` numbers them)."""
        blocks = [self._visual_block(r, b) for b in range(r.B)]
        embs, poss, lens, img_idx, img_ids, runs_at, n_text = [], [], [], [], [], [], []
        text_ids = [torch.cat(lay.texts) for lay in r.layouts]
        text_rows = self.embed(torch.cat(text_ids)).split([t.numel() for t in text_ids])  # one copy of the ids
        for b in range(r.B):
            lay, blk = r.layouts[b], blocks[b]
            sels = by_image(lay, blk.ids)
            if blk.positions is not None:
                vis = [blk.positions[:, sel] for sel in sels] if len(sels) > 1 else [blk.positions]
            else:
                vis = image_positions(lay, blk.ids, None, self.visual_positions)
            follows = blk.text_follows if blk.positions is not None else "compact"
            top = lay.pos_pre.max() if lay.pos_pre.numel() else -1
            def visual(i: int, shift: torch.Tensor, _moved: torch.Tensor, vis=vis, lay=lay) -> torch.Tensor:
                return vis[i].to(lay.pos_pre) + shift

            texts, vpos = place_runs(lay, lay.pos_texts, visual, follows, top)
            e = text_rows[b].split([t.numel() for t in lay.texts])
            pieces, pos_pieces, runs, at = [e[0]], [texts[0]], [], e[0].shape[0]
            # every run's rows in one gather (one index copy to the device, not one per run)
            parts = [blk.rows] if len(sels) == 1 else list(
                blk.rows.index_select(0, torch.cat(sels).to(blk.rows.device)).split([x.numel() for x in sels]))
            for i, sel in enumerate(sels):
                rows = parts[i]
                pieces += [rows.to(e[0]), e[i + 1]]
                pos_pieces += [vpos[i], texts[i + 1]]
                runs.append((at, sel.numel()))
                at += sel.numel() + e[i + 1].shape[0]
            embs.append(torch.cat(pieces))
            poss.append(torch.cat(pos_pieces, dim=1))
            lens.append(embs[-1].shape[0])
            img_ids.append(blk.ids if len(sels) == 1 else blk.ids[torch.cat(sels)])
            runs_at.append(runs)
            n_text.append(text_ids[b].numel())
        L = max(lens)
        d = embs[0].shape[-1]
        P = poss[0].shape[0]
        x = torch.zeros(r.B, L, d, dtype=embs[0].dtype, device=self.device)
        am = torch.zeros(r.B, L, dtype=torch.long)
        pos = torch.ones(P, r.B, L, dtype=torch.long)
        post_start, seg_runs = [], []
        for b in range(r.B):
            sh = L - lens[b]
            x[b, sh:] = embs[b]
            am[b, sh:] = 1
            pos[:, b, sh:] = poss[b]
            seg_runs.append([(s + sh, k) for s, k in runs_at[b]])
            img_idx.append(torch.cat([torch.arange(s, s + k) for s, k in seg_runs[b]]))
            post_start.append(seg_runs[b][-1][0] + seg_runs[b][-1][1])
        seg = Segment(0, am.bool(), pos, img_idx, img_ids, post_start, n_text,
                      [r.layouts[b].n_extra for b in range(r.B)], runs=seg_runs)
        return x, am, seg

    def _start(self, pipeline: Pipeline, images, prompts, external, seed, extra_ids=None, replay=None,
               extra_in_prompt: bool = False) -> AdapterRun:
        """`replay`: recorded Keep actions issued instead of running the nodes (nuwa_graph/replay.py);
        `extra_ids` are appended after each prompt, as prompt tokens when `extra_in_prompt`."""
        ex: Executor = self._bind(pipeline)
        if replay is not None:
            ex = ReplayExecutor(ex, replay)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(prompts):
            raise RunError(f"{len(images)} images for {len(prompts)} prompts; give one image (or one list of "
                           f"images) per prompt")
        images = [list(im) if isinstance(im, (list, tuple)) else im for im in images]
        if any(isinstance(im, list) and not im for im in images):
            raise RunError("a prompt was given an empty list of images; give at least one image per prompt")
        try:
            enc = self.encode(list(images), list(prompts))
        except ValueError as exc:  # the processor's own check (e.g. placeholders vs images)
            raise RunError(f"{self.name}'s processor refused the input: {exc}; a prompt holds one image placeholder "
                           f"per image given for it, or none (the family's template then puts them before the "
                           f"question)") from None
        r = AdapterRun(self, ex, enc, external, seed)
        r.keys = [sample_key(image, prompt) for image, prompt in zip(images, prompts)]  # seeded draws follow content
        r.layouts = [self.split_sample(enc, b) for b in range(r.B)]
        if extra_ids is not None:
            for b in range(r.B):
                r.layouts[b].extend(torch.as_tensor(extra_ids[b]))
                if extra_in_prompt:
                    r.layouts[b].n_extra = 0
        r.counts = [[] for _ in range(r.B)]
        return r

    @torch.no_grad()
    def _prefill(self, r: AdapterRun, use_cache: bool, all_logits: bool = False):
        from transformers import DynamicCache

        r.phase = "vision"
        vis = self.vision_forward(r)
        geoms = [self.prompt_geometry(r, b) for b in range(r.B)]
        r.state = r.ex.start(geoms, device=self.device, keys=r.keys)
        devices = model_devices(self.model, self.device)
        if self.sync_node_timing and any(d.type == "cuda" for d in devices):
            r.state.sync = partial(sync, devices)
        self._pre_llm(r, vis)
        x, _, seg0 = self._assemble(r)
        r.segments = [seg0]
        cache = DynamicCache(config=self.text_model().config) if use_cache else None
        r.phase = "prefill"
        on = seg0.on(self.device)  # mask and positions in one copy from the host
        # unpadded and cached: no mask, which the stock model ends up with too (it skips an all-ones one
        # after reading it: a host sync); without a cache the mask must stay, or transformers reads
        # gapped position ids (PESP) as packed sequences
        mask = None if cache is not None and not seg0.padded else on.valid.long()
        out = self.text_model()(inputs_embeds=x, attention_mask=mask, position_ids=self.llm_position_ids(on.pos),
                                cache=cache, use_cache=use_cache)
        hs = out.last_hidden_state
        logits = self.lm_head()(hs if all_logits else hs[:, -1:])
        return logits, cache

    def forward_logits(self, pipeline: Pipeline, images, prompts, external: dict | None = None,
                       seed: int | None = None, extra_ids=None, replay=None) -> tuple[torch.Tensor, AdapterRun]:
        """Cache-free prefill; logits for every position of the (pruned) sequence.
        `extra_ids[b]` are appended after the prompt (recompute of generated tokens); `replay`
        issues recorded Keep actions instead of running the nodes."""
        r = self._start(pipeline, images, prompts, external, seed, extra_ids, replay)
        with self.session(r):
            logits, _ = self._prefill(r, use_cache=False, all_logits=True)
        r.phase = "idle"
        return logits, r

    @torch.no_grad()
    def generate(self, pipeline: Pipeline, images, prompts, max_new_tokens: int = 16, external: dict | None = None,
                 seed: int | None = None, stop_at_eos: bool = True, return_logits: bool = False,
                 sampling: Sampling | None = None, replay=None, prompt_ids=None, conversation=None) -> RunReport:
        """Decoding with a KV cache over a left-padded batch, greedy unless `sampling` says
        otherwise; returns a RunReport (with `.step_logits`, a list of (B, V) tensors, when
        return_logits).

        `replay`: Keep actions recorded in another run of the same images (`RunReport.keeps`),
        issued instead of running the nodes (question-agnostic pruning; nuwa_graph/replay.py).
        `prompt_ids[b]`: token ids appended to prompt b as prompt tokens (a conversation's later
        turns). `conversation` (adapters/conversation.py): its first call prefills as usual and
        keeps the KV cache; each later call feeds `prompts` (the next turn's questions) to that
        cache and decodes, without pruning again."""
        t_call = time.perf_counter()
        resume = conversation is not None and conversation.active
        r = conversation.run if resume else self._start(pipeline, images, prompts, external, seed, prompt_ids, replay,
                                                        extra_in_prompt=True)
        pick = (sampling or GREEDY).picker(self.device, pipeline.spec.seed if seed is None else seed)
        eos = self._eos_ids()
        step_logits = []
        new_tokens: list[list[int]] = [[] for _ in range(r.B)]
        finished = torch.zeros(r.B, dtype=torch.bool)
        decode_s = 0.0
        ttft_s = 0.0
        steps = 0
        devices = model_devices(self.model, self.device)  # under a device_map: every GPU of the model
        mem = PeakMemory(devices)
        with self.session(r), mem:
            sync(devices)
            t0 = time.perf_counter()
            logits, cache = (conversation.extend(self, r, prompts, pipeline) if resume
                             else self._prefill(r, use_cache=True))
            sync(devices)
            prefill_s = time.perf_counter() - t0
            r.phase = "decode"
            for seg in r.segments:  # decoding state lives on the device: no per-step copies
                on = seg.on(self.device)
                seg.key_valid = on.valid.clone()
                seg.last_pos = on.pos[:, :, -1].clone()
            # an unpadded first segment needs no mask in the steps (the stock model skips an
            # all-ones one after reading it, a sync per step on a GPU); a padded one gets its
            # 4-D mask in the implementation's form, built on the device (the stock model would
            # read the 2-D one to decide whether to skip it: a sync per step); one segment alone
            # (no llm.K prune) needs no layer hooks: the steps then run as the stock model's
            unpadded = not r.segments[0].padded  # on the host: no sync
            growing = r.segments[1:] if unpadded else r.segments
            if len(r.segments) == 1:
                self._release_layer_hooks()
            grow = torch.ones(r.B, 1, dtype=torch.bool, device=self.device)
            out_dtype = self.dtype
            last_logits = logits[:, -1].float()
            for step in range(max_new_tokens):
                if return_logits:
                    step_logits.append(last_logits.cpu())
                nxt_dev = pick(last_logits)
                nxt = nxt_dev.cpu()  # the one host copy per step: the token ids
                if step == 0:
                    ttft_s = time.perf_counter() - t_call
                for b in range(r.B):
                    if not finished[b]:
                        new_tokens[b].append(int(nxt[b]))
                        if stop_at_eos and int(nxt[b]) in eos:
                            finished[b] = True
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                t1 = time.perf_counter()
                for seg in growing:
                    seg.key_valid = torch.cat([seg.key_valid, grow], dim=1)
                seg0 = r.segments[0]
                assert seg0.key_valid is not None and seg0.last_pos is not None
                pos0 = seg0.last_pos[:, :, None] + 1
                r.step = step
                mask0 = None if unpadded else self._impl_mask(decode_mask(seg0.key_valid, 1), seg0.key_valid,
                                                              out_dtype, True)
                out = self.text_model()(inputs_embeds=self.embed(nxt_dev[:, None]), attention_mask=mask0,
                                        position_ids=self.llm_position_ids(pos0), cache=cache, use_cache=True)
                for seg in r.segments:
                    assert seg.last_pos is not None
                    seg.last_pos = seg.last_pos + 1
                last_logits = self.lm_head()(out.last_hidden_state[:, -1]).float()
                sync(devices)
                decode_s += time.perf_counter() - t1
                steps += 1
            r.phase = "idle"
        rep = build_report(self, r, new_tokens, prefill_s, decode_s, steps, mem, kv_cache_bytes(cache))
        rep.schedule = r.ex.pipeline.schedule()
        rep.signals = [f"{q.key} at {q.site}" for q in r.ex.requests()]
        rep.ttft_ms = ttft_s * 1e3
        rep.keeps = recorded_keeps(r.state)  # type: ignore[arg-type]
        if conversation is not None:
            conversation.keep(r, cache, new_tokens, steps, rep, pipeline.name)
        if return_logits:
            rep.step_logits = step_logits  # type: ignore[attr-defined]
        return rep

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config,
                    getattr(self.model.config, "text_config", None)):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids

    def decode_text(self, ids: list[int]) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return tok.decode(ids, skip_special_tokens=True)
