"""Pipeline variables: `${expr}` in node params, evaluated with a small safe language.

A string that is exactly `${expr}` becomes the value of expr with its type (int, float,
list, ...); `${expr}` inside a longer string is interpolated as text. expr may use the
pipeline's variables, numbers, strings, lists, dicts, arithmetic, comparisons, `x if c
else y`, subscripts (`{64: 112, 128: 224}[budget]`), int, float, round, min, max, abs,
ceil, floor, and `scale32(...)`, which moves a layer schedule written for a 32-layer LLM to
the model's depth (`llm_layers`; the rule is `scale_layers` below, documented in
docs/pipelines.md, "Layer schedules on any depth").

Evaluation is bounded so that a shared file cannot hang or exhaust memory: an expression has
at most MAX_EXPR_CHARS characters and MAX_EXPR_DEPTH levels of nesting, and no operation may
produce an integer of more than MAX_INT_BITS bits or a string / list longer than MAX_SEQ_LEN
(`10**10**10` or `'ab' * 2*10**9` are refused before they are computed).
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

MAX_EXPR_CHARS = 1_000    # one ${...}
MAX_EXPR_DEPTH = 40       # nesting of the expression's syntax tree
MAX_INT_BITS = 4_096      # an integer result (about 1233 decimal digits)
MAX_SEQ_LEN = 100_000     # a string, list or dict result
MAX_TEMPLATE_CHARS = 10_000  # a params string that holds ${...}

_FUNCS: dict[str, Any] = {"int": int, "float": float, "round": round, "min": min, "max": max, "abs": abs,
          "ceil": math.ceil, "floor": math.floor}
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b}


class ExpressionError(ValueError):
    """A `${...}` that cannot be evaluated: bad syntax, undefined variable, over a limit."""


def _size_of(v: Any) -> int:
    return len(v) if isinstance(v, (str, list, dict, tuple)) else 0


def _check_value(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
        raise ExpressionError(f"an integer of {v.bit_length()} bits; at most {MAX_INT_BITS} (limit MAX_INT_BITS)")
    if _size_of(v) > MAX_SEQ_LEN:
        raise ExpressionError(f"a value of length {_size_of(v)}; at most {MAX_SEQ_LEN} (limit MAX_SEQ_LEN)")
    return v


def _bits(v: Any) -> int:
    return abs(int(v)).bit_length() if isinstance(v, (int, bool)) else 0


def _short(v: Any) -> str:
    t = repr(v)
    return t if len(t) <= 30 else t[:20] + "..."


def _guard_binop(op: type, a: Any, b: Any) -> None:
    """Refuse an operation whose result would break a limit, before computing it."""
    ints = isinstance(a, int) and isinstance(b, int)
    if op is ast.Pow and ints and b > 0 and abs(a) > 1:
        if math.log2(abs(a)) * b > MAX_INT_BITS:
            raise ExpressionError(f"{_short(a)} ** {_short(b)} is too large (more than {MAX_INT_BITS} bits; "
                                  f"limit MAX_INT_BITS)")
    elif op is ast.Mod and isinstance(a, str):
        raise ExpressionError("'%' formatting of text is not supported")
    elif op is ast.Mult and ints and _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise ExpressionError(f"a product of more than {MAX_INT_BITS} bits (limit MAX_INT_BITS)")
    elif op is ast.Mult and (_size_of(a) and isinstance(b, int) or _size_of(b) and isinstance(a, int)):
        seq, n = (a, b) if _size_of(a) else (b, a)
        if _size_of(seq) * max(int(n), 0) > MAX_SEQ_LEN:
            raise ExpressionError(f"repeating a value of length {_size_of(seq)} {n} times is too long "
                                  f"(at most {MAX_SEQ_LEN}; limit MAX_SEQ_LEN)")
    elif op is ast.Add and _size_of(a) + _size_of(b) > MAX_SEQ_LEN:
        raise ExpressionError(f"a value longer than {MAX_SEQ_LEN} (limit MAX_SEQ_LEN)")


def _depth(tree: ast.AST) -> int:
    best, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        best = max(best, d)
        if best > MAX_EXPR_DEPTH:
            return best
        stack += [(c, d + 1) for c in ast.iter_child_nodes(node)]
    return best


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
    ks: list[int] = [layers] if isinstance(layers, int) else list(layers)
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
        a, b = _eval(node.left, env, used), _eval(node.right, env, used)
        _guard_binop(type(node.op), a, b)
        return _check_value(_BIN[type(node.op)](a, b))
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
        if any(k is None for k in node.keys):
            raise ExpressionError("'**' inside a table is not supported; write each key: value")
        return {_eval(k, env, used): _eval(v, env, used) for k, v in zip(node.keys, node.values) if k is not None}
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
        args = [_eval(a, env, used) for a in node.args]
        if node.func.id in ("int", "round", "ceil", "floor") and args and isinstance(args[0], str) \
                and len(args[0]) > 100:
            raise ExpressionError(f"{node.func.id}() of a string of {len(args[0])} characters (at most 100)")
        if node.func.id == "round" and len(args) == 2 and isinstance(args[1], int) and abs(args[1]) > 1000:
            raise ExpressionError(f"round() to {args[1]} digits (at most 1000)")
        return _check_value(_FUNCS[node.func.id](*args))
    raise ExpressionError(f"unsupported expression element {type(node).__name__}")


def _shown(expr: str) -> str:
    return expr if len(expr) <= 80 else expr[:60] + f"... ({len(expr)} characters)"


def evaluate(expr: str, env: dict[str, Any], used: set[str]) -> Any:
    if len(expr) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression ${{{_shown(expr)}}} is {len(expr)} characters long; at most "
                              f"{MAX_EXPR_CHARS} (limit MAX_EXPR_CHARS)")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"bad expression ${{{_shown(expr)}}}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ExpressionError(f"expression ${{{_shown(expr)}}} is nested too deeply (limit MAX_EXPR_DEPTH = "
                              f"{MAX_EXPR_DEPTH})") from None
    if _depth(tree) > MAX_EXPR_DEPTH:
        raise ExpressionError(f"expression ${{{_shown(expr)}}} is nested more than {MAX_EXPR_DEPTH} levels deep "
                              f"(limit MAX_EXPR_DEPTH)")
    try:
        return _eval(tree, env, used)
    except ExpressionError as exc:
        if "${" in str(exc):
            raise
        raise ExpressionError(f"expression ${{{_shown(expr)}}}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - arithmetic errors and the like
        raise ExpressionError(f"expression ${{{_shown(expr)}}} failed: {type(exc).__name__}: {exc}") from None


def _segments(text: str) -> list[tuple[bool, str]]:
    """`a ${x} b` -> [(False, 'a '), (True, 'x'), (False, ' b')], in one linear pass; braces
    inside an expression nest (`${ {64: 1}[budget] }`) and quoted text is skipped."""
    out: list[tuple[bool, str]] = []
    i = start = 0
    n = len(text)
    while True:
        j = text.find("${", i)
        if j < 0:
            break
        depth, k, quote = 1, j + 2, None
        while k < n and depth:
            ch = text[k]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            k += 1
        if depth:
            raise ExpressionError(f"unclosed ${{ in {_shown(text)!r}: write ${{expression}}")
        if j > start:
            out.append((False, text[start:j]))
        out.append((True, text[j + 2:k - 1]))
        i = start = k
    if start < n:
        out.append((False, text[start:]))
    return out


def substitute(value: Any, env: dict[str, Any], used: set[str]) -> Any:
    """Resolve every `${...}` in a (nested) params value."""
    if isinstance(value, str):
        if "${" not in value:
            return value
        if len(value) > MAX_TEMPLATE_CHARS:
            raise ExpressionError(f"a text with ${{...}} of {len(value)} characters; at most {MAX_TEMPLATE_CHARS} "
                                  f"(limit MAX_TEMPLATE_CHARS)")
        parts = _segments(value.strip())
        if len(parts) == 1 and parts[0][0]:
            return evaluate(parts[0][1], env, used)
        text = "".join(str(evaluate(e, env, used)) if is_expr else e for is_expr, e in _segments(value))
        return _check_value(text)
    if isinstance(value, list):
        return [substitute(v, env, used) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env, used) for k, v in value.items()}
    return value
