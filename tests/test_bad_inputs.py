"""Hostile and broken inputs: every one gets a named error (file, record, option), the right exit
code and no traceback; nothing hangs, nothing is lost, no payload runs.

The corpus is tests/bad_inputs/ (MANIFEST.yaml holds each case's expected message fragment);
inputs that must be generated (large files, decompression bombs, model folders) are built here.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from nuwa_graph import safe_yaml
from nuwa_graph.apps import cli
from nuwa_graph.errors import PipelineError
from nuwa_graph.pipeline import load, load_text, parse_override

CORPUS = Path(__file__).parent / "bad_inputs"
MANIFEST = yaml.safe_load((CORPUS / "MANIFEST.yaml").read_text())
PIPELINES = Path(__file__).parent.parent / "pipelines"
SAMPLE = Path(__file__).parent / "data" / "sample.yaml"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output with rich's boxes and line wrapping removed (a long message may be wrapped)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def has(r, fragment: str) -> bool:
    return " ".join(fragment.split()) in flat(r.output)


def no_traceback(r) -> None:
    assert "Traceback" not in r.output, r.output
    # an unexpected exception inside a command would be kept by CliRunner, not printed
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)


@pytest.mark.parametrize("case", MANIFEST["pipelines"], ids=lambda c: c["file"])
def test_bad_pipeline_corpus(case):
    t0 = time.perf_counter()
    r = invoke("validate", CORPUS / "pipelines" / case["file"])
    assert time.perf_counter() - t0 < 10
    no_traceback(r)
    assert r.exit_code == case["exit"], r.output
    assert has(r, case["expect"]), r.output


@pytest.mark.parametrize("case", MANIFEST["data"], ids=lambda c: c["file"])
def test_bad_data_corpus(case, tmp_path):
    r = invoke("eval", PIPELINES / "vanilla.yaml", "--data", CORPUS / "data" / case["file"], "-o", tmp_path / "ev")
    no_traceback(r)
    assert r.exit_code == case["exit"], r.output
    assert case["expect"] in r.output, r.output
    assert not (tmp_path / "ev" / "results.json").exists()


def test_every_corpus_file_has_a_case():
    listed = {c["file"] for c in MANIFEST["pipelines"]} | {c["file"] for c in MANIFEST["data"]}
    on_disk = {p.name for p in (CORPUS / "pipelines").iterdir()}
    on_disk |= {p.name for p in (CORPUS / "data").iterdir() if p.suffix in (".json", ".jsonl")}
    assert on_disk == listed


# --- payloads stay refused ---------------------------------------------------------------------
def test_no_payload_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    for text in (f"name: !!python/object/apply:os.system ['touch {marker}']\nnodes: []\n",
                 (f"name: x\nnodes: [{{name: a, type: selector.top-k, params: {{k: \"${{__import__('os')"
                  f".system('touch {marker}')}}\"}}}}]\n"),
                 "name: !!python/name:os.system\nnodes: []\n"):
        with pytest.raises(PipelineError):
            load_text(text)
    assert not marker.exists()


# --- generated inputs ---------------------------------------------------------------------------
def test_pipeline_file_over_the_size_limit_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("w") as fh:
        fh.write("name: big\nnodes: []\n# " + "x" * (safe_yaml.MAX_FILE_BYTES + 10) + "\n")
    r = invoke("validate", big)
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "a pipeline file may have at most 1000000 bytes (limit MAX_FILE_BYTES)")


def test_folder_or_device_as_pipeline_file(tmp_path):
    r = invoke("validate", tmp_path)
    assert r.exit_code == 1 and has(r, "is a folder, not a pipeline file")
    t0 = time.perf_counter()
    r = invoke("validate", "/dev/zero")  # endless: never read
    assert r.exit_code == 1 and has(r, "not a regular file") and time.perf_counter() - t0 < 5


def test_set_value_cannot_be_a_bomb():
    _, value = parse_override("budget=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]")
    assert isinstance(value, str)  # too deep to be YAML: kept as text, then refused by the node's type
    with pytest.raises(ValueError, match="--set budget: a value of"):
        parse_override("budget=" + "x" * (safe_yaml.MAX_SCALAR_CHARS + 1))


def test_merge_keys_still_work_and_override():
    data = safe_yaml.load_yaml("base: &b {k: 1, order: index}\nnode: {<<: *b, k: 2}\n")
    assert data["node"] == {"k": 2, "order": "index"}


def _draw_cases(tmp_path):
    f = tmp_path / "p.yaml"
    shutil.copy(SAMPLE, f)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    return f, [
        (["-o", f], "would overwrite the input file"),
        (["-o", tmp_path], "is a folder; give a file path"),
        (["-o", blocker / "sub" / "out.mmd"], "which is a file, not a folder"),
    ]


def test_draw_output_paths_checked_first_and_input_kept(tmp_path):
    f, cases = _draw_cases(tmp_path)
    before = f.read_bytes()
    for args, expect in cases:
        r = invoke("draw", f, *args)
        no_traceback(r)
        assert r.exit_code == 2 and has(r, expect), r.output
    assert f.read_bytes() == before
    r = invoke("draw", f, "-o", tmp_path / "new" / "drawing.mmd")  # a missing folder is created
    assert r.exit_code == 0 and "flowchart" in (tmp_path / "new" / "drawing.mmd").read_text()
    assert not list((tmp_path / "new").glob(".*.tmp"))


def test_eval_and_sweep_check_outputs_before_loading_anything(tmp_path, monkeypatch):
    from nuwa_graph import adapters

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(adapters, "load_adapter", boom)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    (tmp_path / "res.json").mkdir()  # sweep -o res writes res.json and res.csv
    vanilla = PIPELINES / "vanilla.yaml"
    for args, expect in (
        (["eval", vanilla, "-o", blocker], "is a file; give a folder path"),
        (["eval", vanilla, "-o", blocker / "x"], "which is a file, not a folder"),
        (["sweep", PIPELINES / "fastv.yaml", "--set", "budget=64", "-o", blocker / "x"], "which is a file"),
        (["sweep", PIPELINES / "fastv.yaml", "--set", "budget=64", "-o", tmp_path / "res"], "is a folder"),
        (["run", vanilla, "-o", blocker], "is a file; give a folder path"),
    ):
        r = invoke(*args)
        no_traceback(r)
        assert r.exit_code == 2 and has(r, expect), (args, r.output)


def test_eval_output_never_overwrites_a_data_file(tmp_path):
    data = tmp_path / "results.json"
    shutil.copy(CORPUS / "data" / "box_zero_size.json", data)
    r = invoke("eval", PIPELINES / "vanilla.yaml", "--data", data, "-o", tmp_path)
    assert r.exit_code == 2 and has(r, "would overwrite the input file")


@pytest.mark.parametrize("args,expect", [
    (["--prompt", ""], "--prompt: is empty; give the question text"),
    (["--prompt", "   "], "--prompt: is empty"),
    (["--prompt", "<image> and <image>: what?"], "holds 2 image placeholders '<image>'"),
])
def test_run_prompt_checked_up_front(args, expect):
    r = invoke("run", PIPELINES / "vanilla.yaml", *args)
    no_traceback(r)
    assert r.exit_code == 2 and has(r, expect), r.output


@pytest.mark.parametrize("args,expect", [
    (["--grounding-prompt", "where is it?"], "has no {expression}"),
    (["--grounding-prompt", "where is {expression} {"], "Single '{' encountered"),
    (["--grounding-prompt", "where is {thing}"], "unknown field {thing}"),
    (["--vqa-prompt", "{question} }"], "Single '}' encountered"),
    (["--vqa-prompt", "answer briefly"], "has no {question}"),
])
def test_eval_prompt_templates_checked_up_front(args, expect, tmp_path):
    r = invoke("eval", PIPELINES / "vanilla.yaml", *args, "-o", tmp_path / "ev")
    no_traceback(r)
    assert r.exit_code == 2 and has(r, expect), r.output


def _bomb(path: Path) -> Path:
    Image.new("1", (8000, 8000)).save(path)  # 64 M pixels, a few KB on disk
    return path


def test_decompression_bomb_image(tmp_path):
    bomb = _bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    r = invoke("run", PIPELINES / "vanilla.yaml", "--image", bomb, "--model", "tiny-llava")
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "8000x8000 pixels; at most 50000000 pixels"), r.output
    data = tmp_path / "g.json"
    data.write_text(json.dumps([{"image": "bomb.png", "answer": "x", "bbox": [1, 1, 5, 5]}]))
    r = invoke("eval", PIPELINES / "vanilla.yaml", "--data", data, "-o", tmp_path / "ev")
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "record 0, field 'image': image is 8000x8000 pixels"), r.output


def test_not_an_image(tmp_path):
    r = invoke("run", PIPELINES / "vanilla.yaml", "--image", CORPUS / "data" / "not_an_image.png",
               "--model", "tiny-llava")
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "could not be read as an image")


def test_skip_bad_records_reports_the_count(tmp_path, monkeypatch):
    from nuwa_graph.apps.evaluate import load_data

    (task,) = load_data([CORPUS / "data" / "many_bad.json"], skip_bad=True)
    assert task.skipped == 3 and [s.record for s in task.samples] == [0, 3]

    from nuwa_graph import adapters
    from nuwa_graph.errors import RunError

    def stop(*a, **k):
        raise RunError("stopped at the model")

    monkeypatch.setattr(adapters, "load_adapter", stop)
    r = invoke("eval", PIPELINES / "vanilla.yaml", "--data", CORPUS / "data" / "many_bad.json",
               "--skip-bad-records", "-o", tmp_path / "ev")
    no_traceback(r)
    assert has(r, "skipped 3 bad records of") and has(r, "stopped at the model"), r.output


@pytest.fixture
def model_folder(tmp_path):
    from nuwa_graph.embedded import WEIGHTS_DIR

    def make(name, mutate):
        d = tmp_path / name
        shutil.copytree(WEIGHTS_DIR, d, ignore=shutil.ignore_patterns("training_log.json"))
        mutate(d)
        return d
    return make


def _set_config(d: Path, **changes):
    c = json.loads((d / "config.json").read_text())
    c.update(changes)
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("name,mutate,expect", [
    ("broken_json", lambda d: (d / "config.json").write_text('{"model_type": '), "is not a model config"),
    ("list_config", lambda d: (d / "config.json").write_text("[1, 2]"), "is not a model config"),
    ("no_weights", lambda d: (d / "model.safetensors").unlink(), "could not be loaded (OSError"),
    ("corrupt_weights", lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage}"),
     "could not be loaded (SafetensorError"),
    ("unknown_family", lambda d: _set_config(d, model_type="gpt2"), "no adapter for model_type 'gpt2'"),
])
def test_broken_model_folders(model_folder, name, mutate, expect):
    d = model_folder(name, mutate)
    r = invoke("run", PIPELINES / "vanilla.yaml", "--model", d, "--prompt", "what?")
    no_traceback(r)
    assert r.exit_code == 1 and has(r, expect), r.output


def test_pickled_weights_and_remote_code_are_refused(model_folder, tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def pickled(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))

    r = invoke("run", PIPELINES / "vanilla.yaml", "--model", model_folder("pickle", pickled), "--prompt", "what?")
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "pickled weights are refused"), r.output

    def remote(d):
        _set_config(d, auto_map={"AutoConfig": "evil.Config", "AutoModel": "evil.Model"})
        (d / "evil.py").write_text(f"import os\nos.system('touch {marker}')\n")

    invoke("run", PIPELINES / "vanilla.yaml", "--model", model_folder("remote", remote), "--prompt", "what?",
           "--max-new-tokens", "1")
    assert not marker.exists()


def test_context_overflow_is_an_error_before_any_work(monkeypatch):
    from nuwa_graph.adapters.base import VLMAdapter

    def no_generate(*a, **k):
        raise AssertionError("generate ran")

    monkeypatch.setattr(VLMAdapter, "generate", no_generate)
    r = invoke("run", PIPELINES / "vanilla.yaml", "--model", "tiny-llava", "--prompt", "what?",
               "--max-new-tokens", "100000")
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "--max-new-tokens 100000 does not fit the model's context of 512")
    r = invoke("run", PIPELINES / "vanilla.yaml", "--model", "tiny-llava", "--prompt", "red " * 600)
    no_traceback(r)
    assert r.exit_code == 1 and has(r, "beyond the model's context of 512"), r.output


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, sample_path):
    import nuwa_graph.apps.cli_common as c
    import nuwa_graph.apps.cli_inspect as inspect_commands

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspect_commands, "load", broken)
    r = invoke("validate", sample_path)
    assert r.exit_code == 1 and has(r, "ZeroDivisionError: a bug (unexpected; run again with --debug")
    assert "Traceback" not in r.output
    r = runner.invoke(cli.app, ["--debug", "validate", str(sample_path)])
    assert isinstance(r.exception, ZeroDivisionError)
    c._STATE["debug"] = False


def test_validate_keeps_going_after_a_hostile_file(sample_path):
    r = invoke("validate", CORPUS / "pipelines" / "alias_bomb.yaml", sample_path)
    assert r.exit_code == 1 and has(r, f"OK {sample_path}") and has(r, "1 of 2 files invalid")


def test_load_is_bounded_in_time_for_every_corpus_file():
    for case in MANIFEST["pipelines"]:
        t0 = time.perf_counter()
        with pytest.raises(PipelineError):
            load(CORPUS / "pipelines" / case["file"])
        assert time.perf_counter() - t0 < 5, case["file"]


def test_a_data_file_past_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    from nuwa_graph.apps.evaluate import EvalError, load_data

    big = tmp_path / "vqa.jsonl"
    big.write_text('{"question_id": 1, "image": "x.png", "question": "q ?", "answer": "a"}\n' * 50)
    monkeypatch.setenv("NUWA_GRAPH_MAX_DATA_BYTES", "100")
    with pytest.raises(EvalError, match=r"bytes; at most 100 are read \(limit MAX_DATA_BYTES"):
        load_data([f"vqa:{big}"])
