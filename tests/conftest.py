"""Shared test set-up: never reach the Hugging Face hub from tests."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture
def sample_path() -> Path:
    """A model-free pipeline over three sites (vision, pre_llm, llm.2)."""
    return DATA / "sample.yaml"


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model runs: they gain nothing from intra-op
    threads, and on a shared CPU idle threads spinning for their turn cost more than the work
    (tests/test_virtual_devices.py: 6 min instead of 40 s under load 7)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llava():
    """The `tiny-llava` preset adapter (fp32, CPU, seed 0), built once per test session."""
    from nuwa_graph.adapters import load_adapter

    return load_adapter("tiny-llava", "float32", "cpu")


@pytest.fixture(scope="session")
def tiny_image():
    """The built-in synthetic picture (deterministic)."""
    from nuwa_graph.adapters.tiny import synthetic_image

    return synthetic_image()
