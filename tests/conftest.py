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
