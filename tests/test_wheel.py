"""The package as a new user gets it: a wheel installed into a fresh virtual environment, used
from an empty folder with the checkout nowhere on the path.

The new environment sees the running one's site-packages (torch, transformers, ...) through
a plain path entry, so nothing is downloaded; that entry does not run the running
environment's .pth files, so an editable install of this checkout is not importable there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "nuwa_graph", "nodes", "pipelines")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a clean copy: no build/ left-overs from earlier builds in the checkout
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    dist = tmp / "dist"
    # offline with the running environment's setuptools; where it has none (a fresh venv on 3.12+), pip
    # builds in isolation and fetches setuptools itself
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(src)], tmp, env)
    (wheel,) = dist.glob("nuwa_graph-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp, env)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp,
                        env).stdout.strip())
    # the running environment's packages (torch, ...), as plain path entries: its .pth files do not run.
    # Every site-packages folder on the path counts (a nested venv adds its parent's by a .pth line).
    outer = dict.fromkeys([*site.getsitepackages(), *(p for p in sys.path if Path(p).name in ("site-packages",
                                                                                               "dist-packages"))])
    (purelib / "_outer_env.pth").write_text("\n".join(p for p in outer if Path(p).is_dir()) + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp, env)
    empty = tmp / "elsewhere"
    empty.mkdir()
    return {"wheel": wheel, "venv": venv, "py": py, "exe": venv / "bin" / "nuwa-graph", "cwd": empty, "env": env,
            "purelib": purelib}


def test_wheel_holds_nodes_pipelines_and_weights_under_the_package(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"nuwa_graph", "nuwa_graph-0.1.0.dist-info"}, tops  # no top-level `nodes`
    for needed in ("nuwa_graph/nodes/__init__.py", "nuwa_graph/nodes/region_cohesion.py",
                   "nuwa_graph/pipelines/nuwa.yaml", "nuwa_graph/pipelines/ablations/nuwa_rpme.yaml",
                   "nuwa_graph/embedded/weights/model.safetensors", "nuwa_graph/embedded/weights/config.json"):
        assert needed in names, needed
    assert not (installed["purelib"] / "nodes").exists()


def test_pyproject_lists_every_subpackage():
    """pyproject names its packages one by one (for the package-dir mapping): none may be left out."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nuwa_graph").rglob("__init__.py")}
    assert found - listed == set(), f"subpackages missing from pyproject's [tool.setuptools] packages: {found - listed}"


def test_installed_package_is_the_one_imported(installed):
    code = ("import nuwa_graph, nuwa_graph.nodes, nuwa_graph.registry as r; "
            "print(nuwa_graph.__file__); print(nuwa_graph.nodes.__file__); print(len(r.all_types()))")
    out = _run([str(installed["py"]), "-c", code], installed["cwd"], installed["env"]).stdout.split()
    venv = installed["venv"].resolve()
    assert Path(out[0]).resolve().is_relative_to(venv), out[0]
    assert Path(out[1]).resolve().is_relative_to(venv), out[1]
    assert int(out[2]) >= 27


def test_validate_and_nodes_from_an_empty_folder(installed):
    exe, cwd, env = str(installed["exe"]), installed["cwd"], installed["env"]
    res = _run([exe, "validate", "pipelines/nuwa.yaml", "fastv", "ablations/nuwa_rpme"], cwd, env)
    assert res.stdout.count("OK") == 3, res.stdout
    res = _run([exe, "nodes"], cwd, env)
    assert "region-cohesion.nuwa" in res.stdout
    res = subprocess.run([exe, "validate", "pipelines/no_such_method.yaml"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "no such file" in res.stdout + res.stderr


def test_family_files_resolve_inside_the_installed_package(installed):
    code = ("from nuwa_graph import load; p = load('pipelines/nuwa.yaml', model_vars={'family': 'qwen3_vl', "
            "'family_group': 'qwen-vl'}); print(p.name); print(p.source)")
    out = _run([str(installed["py"]), "-c", code], installed["cwd"], installed["env"]).stdout.split()
    assert out[1].endswith("nuwa_qwen.yaml"), out
    assert Path(out[1]).resolve().is_relative_to(installed["venv"].resolve()), out[1]


def test_main_job_runs_from_an_empty_folder(installed):
    exe, cwd, env = str(installed["exe"]), installed["cwd"], installed["env"]
    res = _run([exe, "run", "pipelines/nuwa.yaml", "-o", "out"], cwd, env, timeout=900)
    assert "not trained" not in res.stdout + res.stderr
    assert "Acc@0.5" in res.stdout, res.stdout[-2000:]
    assert (cwd / "out" / "nuwa_kept.png").is_file()
