"""Property tests: random byte strings and random YAML documents never crash `validate` with
anything but a named error (PipelineError), and each load stays within a time and memory bound."""

from __future__ import annotations

import time
import tracemalloc

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nuwa_graph.apps import cli
from nuwa_graph.errors import PipelineError
from nuwa_graph.pipeline import Pipeline, load_text

SECONDS = 2.0           # one load
PEAK_BYTES = 64 << 20   # Python allocations during one load

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bounded_load(data: bytes | str) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = load_text(data, "random.yaml")
        assert isinstance(out, Pipeline)
    except PipelineError as exc:
        assert exc.problems and all(p.file == "random.yaml" for p in exc.problems)
        str(exc)  # the message can be built
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"peak {peak >> 20} MiB"


@PROPS
@given(st.binary(max_size=4000))
def test_random_bytes(data):
    bounded_load(data)


# YAML-looking text: the characters that make anchors, aliases, flow collections, tags and ${...}
YAMLISH = st.lists(st.sampled_from(list("[]{}:,&*!-|>'\"#$%. \n\tabkn019") + ["${", "**", "nodes:", "name:", "params:",
                                                                            "<<:", "&a ", "*a", "!!python/"]),
                   max_size=150).map("".join)


@PROPS
@given(YAMLISH)
def test_random_yamlish_text(text):
    bounded_load(text)


# expressions built from the pieces that make them dangerous
EXPR_PIECE = st.sampled_from(["budget", "a", "10", "2", "9999", "'ab'", "[1]", "**", "*", "+", "-", "//", "%",
                              "(", ")", "[", "]", "{", "}", ":", ",", "if", "else", "min(", "max(", "round(",
                              "int(", "__import__", ".", "1e308", "llm_layers"])
EXPR = st.lists(EXPR_PIECE, min_size=1, max_size=25).map(lambda xs: "${" + " ".join(xs) + "}")
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                   st.text(max_size=30), EXPR)
VALUE = st.recursive(SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=30)
NODE_TYPES = ["selector.top-k", "scorer.external", "applier.keep", "selector.uniform-grid", "region.grid-cells",
              "nonsense.type"]
NODE = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c", "a.b", ""]), "type": st.sampled_from(NODE_TYPES)},
    optional={"params": st.dictionaries(st.sampled_from(["k", "site", "name", "stride", "cell", "ratio", "x"]),
                                        VALUE, max_size=3),
              "inputs": st.dictionaries(st.sampled_from(["scores", "selection", "regions"]),
                                        st.sampled_from(["a.scores", "b.selection", "c", "a.b.c"]), max_size=2)})
DOC = st.fixed_dictionaries(
    {"name": st.text(max_size=10), "nodes": st.lists(NODE, max_size=4)},
    optional={"variables": st.dictionaries(st.sampled_from(["budget", "a", "K", "llm_layers"]), VALUE, max_size=3),
              "seed": SCALAR, "description": VALUE, "extra": VALUE})


@PROPS
@given(st.one_of(DOC, VALUE))
def test_random_yaml_documents(doc):
    bounded_load(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=500), DOC.map(lambda d: yaml.safe_dump(d).encode())))
def test_validate_command_never_crashes(tmp_path, data):
    f = tmp_path / "random.yaml"
    f.write_bytes(data)
    r = CliRunner().invoke(cli.app, ["validate", str(f)])
    assert r.exit_code in (0, 1), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
