"""Sites: the points on the token stream where signals are read and the token set can change.

In stream order: `vision` (after the vision encoder, before the projector), `pre_llm`
(projected tokens and text embeddings, before LLM layer 0), `llm.K` (input of LLM layer K).
"""

from __future__ import annotations

import re
from functools import total_ordering

_LLM = re.compile(r"^llm\.(\d{1,9})$")
# No supported model is deeper than this: without a model (validate, draw) an `llm.K` site must
# have K below it; with a model, below the model's `llm_layers`.
MAX_LLM_LAYERS = 128
VALID_SITES = "'vision', 'pre_llm' or 'llm.K' with K >= 0 (e.g. 'llm.2')"


@total_ordering
class Site:
    """A parsed, ordered site name."""

    __slots__ = ("name", "rank")

    def __init__(self, name: str):
        name = str(name).strip()
        if name == "vision":
            rank = 0
        elif name == "pre_llm":
            rank = 1
        else:
            m = _LLM.match(name)
            if not m:
                raise ValueError(f"unknown site {name!r}; valid: {VALID_SITES}")
            rank = 2 + int(m.group(1))
        self.name = name
        self.rank = rank

    @classmethod
    def llm(cls, layer: int) -> Site:
        return cls(f"llm.{int(layer)}")

    @property
    def layer(self) -> int | None:
        """LLM layer index for `llm.K`, else None."""
        return self.rank - 2 if self.rank >= 2 else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Site) and other.rank == self.rank

    def __lt__(self, other: Site) -> bool:
        return self.rank < other.rank

    def __hash__(self) -> int:
        return hash(self.rank)

    def __repr__(self) -> str:
        return f"Site({self.name!r})"

    def __str__(self) -> str:
        return self.name
