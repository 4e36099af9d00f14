"""Pipeline variables: `${expr}` in node params, evaluated with a small safe language.

A string that is exactly `${expr}` becomes the value of expr with its type (int, float,
list, ...); `${expr}` inside a longer string is interpolated as text. expr may use the
pipeline's variables, numbers, strings, lists, dicts, arithmetic, comparisons, `x if c
else y`, subscripts (`{64: 112, 128: 224}[budget]`), int, float, round, min, max, abs,
ceil, floor, and `scale32(...)`, which moves a layer schedule written for a 32-layer LLM to
the model's depth (`llm_layers`; the rule is `scale_layers` below, documented in
docs/pipelines.md, "Layer schedules on any depth").
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

_FULL = re.compile(r"^\$\{(.+)\}$", re.S)
_PART = re.compile(r"\$\{(.+?)\}")

_FUNCS = {"int": int, "float": float, "round": round, "min": min, "max": max, "abs": abs,
          "ceil": math.ceil, "floor": math.floor}
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b}


class ExpressionError(ValueError):
    pass


REFERENCE_DEPTH = 32  # LLM depth the shipped layer schedules are written for (LLaVA-1.5-7B)


def scale_layers(layers: int | list[int], llm_layers: int, lo: int = 1, hi: int | None = None) -> int | list[int]:
    """A layer (or an increasing schedule) written for a 32-layer LLM, on an `llm_layers`-deep one.

    Each layer k becomes floor(k * llm_layers / 32 + 0.5) (half up), clamped to [lo, hi]
    (default 1 .. llm_layers - 1: a layer before it to read attention from and the layer
    itself to prune at). A schedule stays strictly increasing: an entry that is not above
    the previous one moves up to previous + 1; if that passes hi, entries move down from
    the end. On 32 layers every legal schedule is returned unchanged.
    """
    hi = llm_layers - 1 if hi is None else hi
    single = not isinstance(layers, list)
    ks = [layers] if single else list(layers)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks) or not ks:
        raise ExpressionError(f"scale32 takes a layer or a non-empty list of layers (integers), got {layers!r}")
    if len(ks) > hi - lo + 1:
        raise ExpressionError(f"a {len(ks)}-stage schedule needs {len(ks)} distinct layers in {lo}..{hi}, and this "
                              f"{llm_layers}-layer LLM has {max(hi - lo + 1, 0)}")
    out = [min(max(math.floor(k * llm_layers / REFERENCE_DEPTH + 0.5), lo), hi) for k in ks]
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(len(out) - 1, -1, -1):
        cap = hi if i == len(out) - 1 else out[i + 1] - 1
        out[i] = min(out[i], cap)
    return out[0] if single else out


def _scale32(env: dict[str, Any], used: set[str], args: list[Any]) -> Any:
    if "llm_layers" not in env:
        raise ExpressionError("scale32 needs the model variable llm_layers")
    used.add("llm_layers")
    if not 1 <= len(args) <= 3:
        raise ExpressionError("scale32 takes (layers), (layers, lo) or (layers, lo, hi)")
    return scale_layers(args[0], int(env["llm_layers"]), *args[1:])


def _eval(node: ast.AST, env: dict[str, Any], used: set[str]) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env, used)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ExpressionError(f"undefined variable {node.id!r} (defined: {', '.join(sorted(env)) or 'none'})")
        used.add(node.id)
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        return _BIN[type(node.op)](_eval(node.left, env, used), _eval(node.right, env, used))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, env, used)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP:
        return _CMP[type(node.ops[0])](_eval(node.left, env, used), _eval(node.comparators[0], env, used))
    if isinstance(node, ast.IfExp):
        return _eval(node.body, env, used) if _eval(node.test, env, used) else _eval(node.orelse, env, used)
    if isinstance(node, ast.List):
        return [_eval(e, env, used) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return [_eval(e, env, used) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_eval(k, env, used): _eval(v, env, used) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Subscript):
        base = _eval(node.value, env, used)
        key = _eval(node.slice, env, used)
        try:
            return base[key]
        except (KeyError, IndexError, TypeError):
            keys = list(base) if isinstance(base, dict) else f"0..{len(base) - 1}" if hasattr(base, "__len__") else "?"
            raise ExpressionError(f"{key!r} is not in the table (valid: {keys})") from None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "scale32" and not node.keywords:
        return _scale32(env, used, [_eval(a, env, used) for a in node.args])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        return _FUNCS[node.func.id](*[_eval(a, env, used) for a in node.args])
    raise ExpressionError(f"unsupported expression element {type(node).__name__}")


def evaluate(expr: str, env: dict[str, Any], used: set[str]) -> Any:
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"bad expression ${{{expr}}}: {exc.msg}") from None
    try:
        return _eval(tree, env, used)
    except ExpressionError:
        raise
    except Exception as exc:  # arithmetic errors and the like
        raise ExpressionError(f"expression ${{{expr}}} failed: {exc}") from None


def substitute(value: Any, env: dict[str, Any], used: set[str]) -> Any:
    """Resolve every `${...}` in a (nested) params value."""
    if isinstance(value, str):
        m = _FULL.match(value.strip())
        if m and "${" not in m.group(1):
            return evaluate(m.group(1), env, used)
        return _PART.sub(lambda mm: str(evaluate(mm.group(1), env, used)), value)
    if isinstance(value, list):
        return [substitute(v, env, used) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env, used) for k, v in value.items()}
    return value
