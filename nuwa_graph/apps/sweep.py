"""Sweeps: run one pipeline over the cross product of variable values, one results table.

`nuwa-graph sweep pipelines/nuwa.yaml --set budget=64,128,192 --set distance=18,280`
loads the pipeline once per combination (each load is fully validated, so a bad value is
reported with the variable named before anything runs), runs each with the same model,
inputs and seed, and writes one row per combination.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..pipeline import Pipeline, load, parse_override
from ..safe_io import atomic_write


def split_values(text: str) -> list[str]:
    """Split `a,b,[c,d]` at top-level commas (brackets and quotes protect commas)."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    quote: str | None = None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_sweep(sets: Iterable[str]) -> dict[str, list[Any]]:
    """`--set name=v1,v2` -> {name: [v1, v2]} (each value read as YAML)."""
    grid: dict[str, list[Any]] = {}
    for text in sets:
        name, _, raw = text.partition("=")
        if not _:
            raise ValueError(f"--set {text!r}: expected NAME=V1,V2,..., e.g. --set budget=64,128,192")
        values = [parse_override(f"{name}={v}")[1] for v in split_values(raw)]
        if not values:
            raise ValueError(f"--set {text!r}: no values given")
        grid[name.strip()] = values
    return grid


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def load_all(path: str | Path, grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], Pipeline]]:
    """Load (and so validate) every combination first; all problems of all combinations together."""
    loaded, problems = [], []
    for combo in combinations(grid):
        try:
            loaded.append((combo, load(path, combo)))
        except PipelineError as exc:
            for p in exc.problems:
                problems.append(type(p)(p.file, f"[{_label(combo)}] {p.message}", p.node, p.field, p.line))
    if problems:
        # the same problem in every combination is reported once
        seen, unique = set(), []
        for p in problems:
            key = (p.node, p.field, p.message.split("] ", 1)[-1])
            if key not in seen:
                seen.add(key)
                unique.append(p)
        raise PipelineError(unique)
    return loaded


def _label(combo: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in combo.items())


def write_rows(rows: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Write rows as JSON and CSV next to each other (out without suffix or with .json/.csv), atomically."""
    jpath, cpath = output_paths(out)
    atomic_write(jpath, json.dumps(rows, indent=2, default=str) + "\n")
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    atomic_write(cpath, buf.getvalue())
    return [jpath, cpath]


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """OUTPUT.json and OUTPUT.csv of `--output OUTPUT` (a .json / .csv suffix is dropped first)."""
    base = Path(out)
    if base.suffix in (".json", ".csv"):
        base = base.with_suffix("")
    return base.with_suffix(".json"), base.with_suffix(".csv")
