"""Signal requests: what a node asks the model for at a site.

A node that reads the model declares its requests before the forward pass (so the adapter
installs only the hooks a pipeline needs) and reads the values with `ctx.signal(request)`.
Each kind below documents the tensor the adapter returns for ONE sample.
"""

from __future__ import annotations

from dataclasses import dataclass

# kind -> (site kind, description of the per-sample tensor)
SIGNAL_KINDS: dict[str, str] = {
    "vision.hidden": "vision hidden_states[layer] without CLS: (n, d_vision)",
    "vision.hidden_mean": "mean of vision hidden_states[start:stop] without CLS: (n, d_vision)",
    "vision.cls_hidden": "CLS row of vision hidden_states[layer]: (d_vision,)",
    "vision.cls_attention": "post-softmax CLS->patch attention of vision layer `layer`: (heads, n)",
    "vision.attention_received": "attention each patch receives at vision layer `layer` "
    "(mean over heads, sum over queries), per merged token: (n,)",
    "vision.keys": "key states of vision layer `layer`: (heads, n + cls, head_dim), CLS first where the model has one",
    "vision.qk_single_head": "q and k of vision layer `layer` as one head over the full width, "
    "after its LayerNorm: (2, n + cls, d) (PruMerge+)",
    "vision.merged_hidden_mean": "Qwen2.5-VL: the patch merger applied to the mean of the outputs of vision "
    "blocks start..stop-1 (Nüwa's Qwen code: blocks 7..23), one row per merged token in raster order "
    "(window order undone): (n, d_llm)",
    "external": "a tensor given by the caller under `name` (model-free runs, tests, user scores): (n,) or (n, d)",
    "pre_llm.visual": "projected visual tokens: (n, d_llm)",
    "pre_llm.text": "input embeddings of the tokens after the image: (t, d_llm)",
    "llm.attention": "post-softmax attention rows of LLM layer `layer` for the chosen queries "
    "over the image keys present: (heads, q, n_present)",
    "llm.hidden": "hidden states of the image tokens present at the input of LLM layer `layer`: (n_present, d)",
}


@dataclass(frozen=True)
class SignalRequest:
    """One signal: its kind, the site where it is read, and its hashable arguments."""

    kind: str
    site: str
    args: tuple[tuple[str, object], ...] = ()

    def arg(self, name: str, default=None):
        return dict(self.args).get(name, default)

    @property
    def key(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.args)
        return f"{self.kind}({inner})"

    @classmethod
    def make(cls, kind: str, site: str, **args) -> SignalRequest:
        if kind not in SIGNAL_KINDS:
            raise ValueError(f"unknown signal kind {kind!r}; known: {', '.join(sorted(SIGNAL_KINDS))}")
        return cls(kind, site, tuple(sorted(args.items())))
