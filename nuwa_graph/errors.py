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
