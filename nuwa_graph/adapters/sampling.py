"""How the next token is chosen while decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RunError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the default, every paper number), or sampled with
    `temperature`, then restricted to the `top_k` most likely tokens (0: all) and the smallest set
    whose probability reaches `top_p` (1.0: all), as transformers' samplers do. Draws come from a
    generator on the model's device seeded with the run's seed, so a seed repeats its answers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise RunError(f"temperature={self.temperature}: it must be a positive number (greedy: do_sample=False)")
        if self.top_k < 0:
            raise RunError(f"top_k={self.top_k}: it must be 0 (all tokens) or positive")
        if not 0 < self.top_p <= 1:
            raise RunError(f"top_p={self.top_p}: it must be in (0, 1]")

    def picker(self, device: torch.device, seed: int):
        """A function (B, V) float logits -> (B,) token ids on the logits' device."""
        if not self.do_sample:
            return lambda logits: logits.argmax(-1)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))

        def pick(logits: torch.Tensor) -> torch.Tensor:
            scores = logits / self.temperature
            if self.top_k > 0:
                kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if self.top_p < 1:
                sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
                cum = sorted_scores.softmax(-1).cumsum(-1)
                drop = cum - sorted_scores.softmax(-1) >= self.top_p  # keep up to the token that reaches top_p
                scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
            return torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0]

        return pick


GREEDY = Sampling()
