"""Bounded YAML loading for pipeline files: a shared file cannot hang, exhaust memory or crash the tool.

One entry point, `load_yaml(data, source)`, used for every pipeline file and `--set` value:

- the input is bytes or text of at most MAX_FILE_BYTES; bytes must be UTF-8 (binary input is
  refused by name, with the offset of the first bad byte);
- a first, non-recursive pass over the parser's events bounds nesting (MAX_DEPTH), scalar
  length (MAX_SCALAR_CHARS) and aliases (MAX_ALIASES);
- the composed node graph is measured with aliases expanded (a "billion laughs" file is
  small on disk but huge once expanded): at most MAX_VALUES values, and recursive aliases
  are refused;
- only the safe YAML types are built (no tags that run code); a key given twice in one
  mapping is an error (PyYAML would silently keep the last one);
- every mapping remembers the line it starts on (`LineDict.line`).

Every refusal is a `YamlLimitError` naming the file, the line and the limit; pipeline.py turns
it into a PipelineError. The limits are far above any real pipeline file (the largest shipped
one is under 5 KB) and documented in docs/cli.md.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_FILE_BYTES = 1_000_000      # size of one pipeline file
MAX_DEPTH = 32                  # nesting of lists / mappings
MAX_SCALAR_CHARS = 100_000      # one string, number or key
MAX_ALIASES = 1_000             # `*anchor` references in one file
MAX_VALUES = 200_000            # values in the document once aliases are expanded


class YamlLimitError(ValueError):
    """YAML input refused: too large, too deep, binary, a duplicate key, bad syntax..."""

    def __init__(self, source: str, message: str, line: int | None = None):
        self.source, self.message, self.line = source, message, line
        super().__init__(f"{source}{f':{line}' if line else ''}: {message}")


class LineDict(dict):
    """A mapping that knows the line it starts on (1-based)."""

    line: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # explicit keys only: `<<: *base` merges may be overridden on purpose
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value, not a list "
                                                    "or mapping", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {seen[key]}); YAML would silently keep only "
                f"the last one: give each key once", key_node.start_mark)
        seen.setdefault(key, key_node.start_mark.line + 1)
    d = LineDict(loader.construct_mapping(node, deep=True))
    d.line = node.start_mark.line + 1
    return d


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line(mark) -> int | None:
    return mark.line + 1 if mark is not None else None


def decode(data: bytes | str, source: str) -> str:
    """Text of a pipeline file: size-checked, UTF-8, not binary."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_FILE_BYTES:
        raise YamlLimitError(source, f"file is {size} bytes; a pipeline file may have at most {MAX_FILE_BYTES} "
                             f"bytes (limit MAX_FILE_BYTES)")
    if isinstance(data, bytes):
        raw = data
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise YamlLimitError(source, f"not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}); "
                                 f"a pipeline file must be UTF-8 YAML", line) from None
    if "\x00" in data:
        raise YamlLimitError(source, "binary data (a NUL character); a pipeline file must be UTF-8 YAML text",
                             data[:data.index("\x00")].count("\n") + 1)
    return data.removeprefix("\ufeff")


def _check_events(text: str, source: str) -> None:
    """Depth, scalar size and alias count, from the event stream (no recursion, no objects built)."""
    depth = aliases = 0
    for ev in yaml.parse(text, Loader=_Loader):
        if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlLimitError(source, f"nesting deeper than {MAX_DEPTH} levels (limit MAX_DEPTH)",
                                     _line(ev.start_mark))
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        elif isinstance(ev, yaml.ScalarEvent):
            if len(ev.value) > MAX_SCALAR_CHARS:
                raise YamlLimitError(source, f"a value of {len(ev.value)} characters; at most {MAX_SCALAR_CHARS} "
                                     f"(limit MAX_SCALAR_CHARS)", _line(ev.start_mark))
        elif isinstance(ev, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise YamlLimitError(source, f"more than {MAX_ALIASES} aliases (*name) (limit MAX_ALIASES)",
                                     _line(ev.start_mark))


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Values in the document with aliases expanded; refuses recursive aliases. Iterative."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else [])
            total = 1 + sum(size[id(k)] for k in kids)
            if total > MAX_VALUES:
                raise YamlLimitError(source, f"the document expands to more than {MAX_VALUES} values once its "
                                     f"aliases (*name) are expanded (limit MAX_VALUES)", _line(node.start_mark))
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise YamlLimitError(source, "recursive alias: a node contains itself", _line(node.start_mark))
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.SequenceNode):
            stack += [(k, False) for k in node.value if id(k) not in size]
        elif isinstance(node, yaml.MappingNode):
            stack += [(k, False) for kv in node.value for k in kv if id(k) not in size]


def load_yaml(data: bytes | str, source: str = "<string>") -> Any:
    """The YAML document in `data`, within the limits above; YamlLimitError otherwise."""
    text = decode(data, source)
    try:
        _check_events(text, source)
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None
            _check_expansion(root, source)
            return loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if not isinstance(exc, yaml.constructor.ConstructorError):
            problem = f"YAML syntax error: {problem}"
        raise YamlLimitError(source, problem, _line(mark)) from None
    except (RecursionError, MemoryError) as exc:  # belt and braces: the limits above should prevent these
        raise YamlLimitError(source, f"YAML too complex to load ({type(exc).__name__})") from None
