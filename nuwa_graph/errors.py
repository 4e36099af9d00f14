"""Problems found in a pipeline, collected and reported together (Hamilton-style)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline file, located as precisely as we can."""

    file: str
    message: str
    node: str | None = None
    field: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        parts = [where]
        if self.node:
            parts.append(f"node {self.node!r}")
        if self.field:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts) + ": " + self.message


class PipelineError(ValueError):
    """Raised with every problem of a file at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in {self.problems[0].file}" if n else "invalid pipeline"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class RunError(RuntimeError):
    """A run-time problem the user can fix (bad model id, budget too large, ...)."""


class BudgetError(RunError, ValueError):
    """A node was asked to keep more tokens than it has: the data a hint needs, not just text.

    `asked` is the count the node computed from its params, `limit` the most it can keep and
    `param` the params field that asked (`k`, `keep`); `node` is the node's name in the
    pipeline, filled in by the executor (a node does not know its own name).
    """

    def __init__(self, asked: int, limit: int, *, param: str = "k", what: str = "tokens present",
                 advice: str = "", node: str | None = None):
        self.asked, self.limit, self.param, self.what = int(asked), int(limit), param, what
        self.advice, self.node = advice, node
        super().__init__(self.text())

    def text(self) -> str:
        """The node's own message: `k=6 is larger than the 5 tokens present; <advice>`."""
        out = f"{self.param}={self.asked} is larger than the {self.limit} {self.what}"
        return f"{out}; {self.advice}" if self.advice else out

    def at(self, node: str, where: str) -> BudgetError:
        """The same error naming the node; `where` (which node, sample and site) leads the message."""
        out = BudgetError(self.asked, self.limit, param=self.param, what=self.what, advice=self.advice, node=node)
        out.args = (f"{where}: {type(self).__name__}: {self.text()}",)
        return out
