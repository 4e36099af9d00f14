"""Instruction relevance of each visual token (CDPruner, NeurIPS'25, arXiv 2506.10967;
Theia-4869/CDPruner @ 9541616c, llava/model/llava_arch.py:155-166 and
llava/model/multimodal_encoder/clip_encoder.py:62-98).

Two sources, a declared parameter (`source`), both said in the run's `signals` row:
- `clip` (the official code): the cosine between each patch's CLIP image embedding
  (`vision.clip_embeds`: the tower's post-LayerNorm + the checkpoint's visual projection on
  hidden_states[-2]) and the CLIP text embeddings of the question (`vision.clip_text_embeds`,
  one row per 77-token chunk), NEGATED (patches least similar to the question score highest:
  the sign is in the code), averaged over the text rows. Needs the CLIP text tower of the
  vision checkpoint (LLaVA-1.5).
- `llm` (the variant OpenVINO GenAI ships for towers without a text tower, e.g. Qwen-VL):
  the cosine between each projected visual token (`pre_llm.visual`) and the LLM input
  embedding of each prompt token after the image (`pre_llm.text`), averaged, NOT negated
  (OpenVINO GenAI negates only for CLIP-based models). Our implementation of that idea, not
  its C++ code.
Then min-max: r = (r - min + 1e-6) / (max - min), as the official code. A constant relevance
divides by zero there (NaN: the official DPP loop then keeps 2 tokens); here it becomes 1 for
every token (the DPP then selects by diversity alone). Optional `theta`: the paper's
r -> exp(theta / (2 (1 - theta)) r) re-weighting (commented out in the official code: off).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from nuwa_graph.node import Node, NodeParams, Port
from nuwa_graph.registry import register
from nuwa_graph.signals import SignalRequest
from nuwa_graph.sites import Site
from nuwa_graph.types import Scores


class RelevanceParams(NodeParams):
    source: Literal["clip", "llm"] = Field(
        "clip", description="clip: CLIP patch vs CLIP text embeddings of the question (official; needs the vision "
        "checkpoint's text tower); llm: projected visual tokens vs the LLM's embeddings of the text after the image "
        "(OpenVINO GenAI's variant for towers without a text tower)")
    negate: bool | None = Field(None, description="negate the cosine before averaging; default: true for clip (the "
                                "official sign), false for llm (OpenVINO GenAI's default outside CLIP models)")
    layer: int = Field(-2, description="vision hidden_states index of the patches (clip source; official -2)")
    theta: float | None = Field(None, gt=0, lt=1, description="the paper's optional re-weighting r -> exp(alpha r), "
                                "alpha = theta / (2 (1 - theta)); off in the official code")


def instruction_relevance(image: torch.Tensor, text: torch.Tensor, negate: bool, theta: float | None = None
                          ) -> torch.Tensor:
    """(n,) float32 relevance of n image rows to M text rows, min-maxed as the official code
    (+1e-6 in the numerator only); a constant relevance gives 1 everywhere instead of NaN."""
    e = image.float()
    t = text.float()
    e = e / e.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    rel = torch.matmul(e, t.t())
    r = (-rel).mean(dim=-1) if negate else rel.mean(dim=-1)
    lo, hi = r.min(), r.max()
    r = torch.where(hi > lo, (r - lo + 1e-6) / (hi - lo), torch.ones_like(r))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


@register
class InstructionRelevance(Node[RelevanceParams]):
    """How relevant each visual token is to the instruction (CDPruner's conditional
    relevance), from CLIP embeddings (official) or from the LLM's own embeddings."""

    type_name = "scorer.instruction-relevance"
    paper = "https://arxiv.org/abs/2506.10967"
    outputs = {"scores": Port(Scores, "relevance in [0, 1] per visual token")}

    def site(self) -> Site:
        return Site("vision" if self.params.source == "clip" else "pre_llm")

    def requests(self):
        if self.params.source == "clip":
            return [SignalRequest.make("vision.clip_embeds", "vision", layer=self.params.layer),
                    SignalRequest.make("vision.clip_text_embeds", "vision")]
        return [SignalRequest.make("pre_llm.visual", "pre_llm"), SignalRequest.make("pre_llm.text", "pre_llm")]

    def run(self, ctx):
        image_req, text_req = self.requests()
        image, text = ctx.signal(image_req), ctx.signal(text_req)
        if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} embeddings must be (n, c) "
                             f"and (M, c) of the same width")
        if text.shape[0] == 0:
            raise ValueError("the instruction has no tokens to compare the image with")
        negate = self.params.negate if self.params.negate is not None else self.params.source == "clip"
        r = instruction_relevance(image, text, negate, self.params.theta)
        if self.params.source == "clip":
            ids = torch.arange(r.numel(), device=r.device)
        else:
            ids = ctx.present.clone()
        if ids.numel() != r.numel():
            raise ValueError(f"{r.numel()} relevance values for {ids.numel()} visual tokens")
        return {"scores": Scores(r, ids.to(r.device))}
