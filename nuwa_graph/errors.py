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
    """A budget larger than what there is, as data: the node asked for `asked` (its param
    `param`, e.g. k) where only `limit` tokens are; `node` and `site` are set once the
    executor has seen it (`at`). A node raises it instead of a bare ValueError so that the CLI
    can name the pipeline variable to lower from these fields, not from the message text."""

    def __init__(self, message: str, asked: int, limit: int, param: str = "k", node: str | None = None,
                 site: str | None = None):
        super().__init__(message)
        self.message, self.asked, self.limit, self.param, self.node, self.site = message, asked, limit, param, node, site

    def at(self, node: str, site: str, prefix: str) -> BudgetError:
        """The same error located at `node` and `site`, its message after `prefix`."""
        return BudgetError(prefix + self.message, self.asked, self.limit, self.param, node, site)
