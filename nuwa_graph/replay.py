"""Replaying a run's pruning on another prompt: question-agnostic pruning and multi-turn reuse.

A run's decisions are its Keep actions (context.Keep: ids, replacement features, positions).
`ReplayExecutor` stands in for the Executor of a pipeline and, at each site, issues the Keeps
recorded in another run of the same images instead of running the nodes. What that means
per site (docs/evaluation.md, "Question-agnostic pruning"):

- `vision` / `pre_llm`: the Keep is applied as recorded: the same ids, the same positions,
  and merged tokens with the recorded features (vision-space tokens come from the vision
  tower, which never sees the text; LLM-space tokens before the LLM are projected visual
  tokens). This is exactly what a cache of an image's pruned tokens holds.
- `llm.K`, a Keep of ids: the same ids (and position plan) are kept; their hidden states
  are the replaying run's own.
- `llm.K`, merged LLM-space rows (SparseVLM's recycling): rows computed from the recorded
  run's hidden states are never reused. Where the merger said how it made them (`Tokens.mix`)
  they are recomputed from the replaying run's hidden states at that site; without a mix
  the replay is refused with a RunError naming the node.

`prompt_signals(pipeline)` lists what a pipeline reads that depends on the prompt's text (what
a question-agnostic run lets see a neutral prompt instead of the question).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .context import Keep
from .errors import RunError
from .executor import Executor, RunState
from .pipeline import Pipeline
from .signals import KINDS, PreLLMVisual, SignalRequest, _VisionLayer, _VisionRange
from .sites import Site
from .types import Tokens

#: how the signal kinds of signals.py depend on the prompt's text (docs/evaluation.md)
PROMPT_SIGNALS: dict[str, str] = {
    "pre_llm.text": "the embeddings of the text after the image",
    "llm.attention": "attention rows of the prompt's text tokens (the last one, or all after the image)",
    "llm.hidden": "hidden states inside the LLM (they see the prompt's text before the image, e.g. a system line)",
    "external": "values the caller passes in (unknown origin)",
}


def reads_prompt(kind: str) -> bool:
    """Whether a signal kind may depend on the prompt's text. Only the vision tower's signals
    (the vision-layer kinds) and the projected visual tokens (`pre_llm.visual`) are known to
    read the image alone; every other kind, one added later included, counts as reading the
    prompt (a question-agnostic twin then runs: never a wrong 'question-agnostic by construction')."""
    cls = KINDS.get(kind)
    return cls is None or not issubclass(cls, (_VisionLayer, _VisionRange, PreLLMVisual))


def prompt_signals(pipeline: Pipeline) -> list[str]:
    """'kind(args) at site' for every signal of `pipeline` that may depend on the prompt's text
    (empty: its pruning is question-agnostic by construction: it reads the image only)."""
    out: list[str] = []
    for node in pipeline.nodes.values():
        for req in node.requests():
            what = f"{req.key} at {req.site}"
            if reads_prompt(req.kind) and what not in out:
                out.append(what)
    return out


def recorded_keeps(state: RunState) -> list[list[Keep]]:
    """The Keep actions of a finished run, per sample, in stream order (ready to replay)."""
    return [list(acts) for acts in state.actions]


def _merged_in_llm(act: Keep) -> bool:
    return act.tokens is not None and act.tokens.space == "llm" and Site(act.site).layer is not None


class ReplayExecutor(Executor):
    """An Executor that issues recorded Keep actions instead of running the nodes.

    `actions[b]`: sample b's recorded Keeps (from `recorded_keeps` of a run on the same
    images, in the same batch order). It reads one signal: the hidden states at an `llm.K`
    site where a merged row has to be recomputed (`llm.hidden`)."""

    def __init__(self, ex: Executor, actions: list[list[Keep]], source: str = "another prompt"):
        super().__init__(ex.pipeline)
        self.inner = ex
        self.actions = actions
        self.source = source
        for acts in actions:
            for a in acts:
                if _merged_in_llm(a) and a.tokens is not None and a.tokens.mix is None:
                    raise RunError(
                        f"node {a.node!r} merges LLM hidden states at {a.site} without saying how each merged row is "
                        f"made (no Tokens.mix), so its rows cannot be recomputed from this prompt's hidden states and "
                        f"reusing the rows of {source} would silently change the result; this pipeline cannot be "
                        f"replayed (question-agnostic or multi-turn reuse): give the merger a Mix, or run it "
                        f"without the replay")

    def sites(self) -> list[Site]:
        return sorted({Site(a.site) for acts in self.actions for a in acts})

    def requests(self) -> list[SignalRequest]:
        need = sorted({Site(a.site) for acts in self.actions for a in acts if _merged_in_llm(a)})
        return [SignalRequest.make("llm.hidden", s.name, layer=s.layer) for s in need]

    def start(self, geometries, present=None, device: torch.device | str = "cpu", keys=None) -> RunState:
        if len(geometries) != len(self.actions):
            raise RunError(f"the replay holds the pruning of {len(self.actions)} samples; this batch has "
                           f"{len(geometries)} (replay on the same images, in the same order)")
        return self.inner.start(geometries, present, device, keys)

    def run_site(self, state: RunState, site: Site, reader: Callable[[SignalRequest, int], torch.Tensor] | None,
                 seed: int | None = None) -> list[list[Keep]]:
        if state.sync is not None:  # timed as the executor times a node (every GPU synchronised)
            state.sync()
        t0 = time.perf_counter()
        issued: list[list[Keep]] = []
        for b, acts in enumerate(self.actions):
            here = [a for a in acts if Site(a.site) == site]
            issued.append([self._recompute(a, state.present[b], reader, b) if _merged_in_llm(a) else a
                           for a in here])
        if state.sync is not None:
            state.sync()
        state.timings["replay"] += time.perf_counter() - t0
        state.record(site, issued)
        return issued

    @staticmethod
    def _recompute(act: Keep, present: torch.Tensor, reader, b: int) -> Keep:
        """The merged rows of `act` from this run's hidden states at its site (its Mix)."""
        assert act.tokens is not None and act.tokens.mix is not None
        site = Site(act.site)
        if reader is None:
            raise RunError(f"replaying {act.node!r} at {act.site} needs the model's hidden states")
        hidden = reader(SignalRequest.make("llm.hidden", site.name, layer=site.layer), b)  # (n_present, d)
        mix = act.tokens.mix
        where = {int(t): j for j, t in enumerate(present.tolist())}
        missing = [int(t) for t in mix.sources.tolist() if int(t) not in where]
        if missing:
            raise RunError(f"replaying {act.node!r} at {act.site}: tokens {missing[:8]} it merged are not present "
                           f"in this run")
        cols = torch.tensor([where[int(t)] for t in mix.sources.tolist()], device=hidden.device)
        values = mix.weights.to(hidden.device, hidden.dtype) @ hidden[cols]
        return Keep(act.site, act.ids, Tokens(values, act.ids, "llm", mix), act.positions, act.node)



NEUTRAL_PROMPT = ""  # the default neutral instruction: the question removed, the chat template kept


def generate_question_agnostic(adapter, pipeline: Pipeline, images, prompts: list[str], neutral_prompts: list[str],
                               **kwargs):
    """Prune from `neutral_prompts` (the same images without the question), then answer
    `prompts` over the tokens that run kept: -> (report of the answering run, report of the
    neutral run). `kwargs` go to the answering `generate` (max_new_tokens, seed, ...).

    The neutral run prefills and picks one token (its Keeps are what a cache of each image's
    pruned tokens would hold); the answering run replays them (ReplayExecutor)."""
    seed = kwargs.get("seed")
    neutral = adapter.generate(pipeline, images, neutral_prompts, max_new_tokens=1, seed=seed,
                               external=kwargs.get("external"))
    rep = adapter.generate(pipeline, images, prompts, replay=neutral.keeps, **kwargs)
    return rep, neutral
