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
