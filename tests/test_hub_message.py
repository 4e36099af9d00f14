"""The model-loading error says offline only when the hub is switched off, and why otherwise."""

from __future__ import annotations

import pytest

from nuwa_graph import RunError
from nuwa_graph.adapters import load_adapter


def _fail_with(monkeypatch, exc):
    import transformers

    def boom(*a, **kw):
        raise exc

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)


def test_offline_is_named_when_it_is_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fail_with(monkeypatch, OSError("not in the cache"))
    with pytest.raises(RunError, match="HF_HUB_OFFLINE is set"):
        load_adapter("someone/missing-model")


def test_online_machine_is_not_called_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    _fail_with(monkeypatch, OSError("someone/missing-model is not a valid model identifier"))
    with pytest.raises(RunError) as info:
        load_adapter("someone/missing-model")
    msg = str(info.value)
    assert "offline" not in msg.lower() and "HF_HUB_OFFLINE" not in msg
    assert "not a valid model identifier" in msg and "check the spelling" in msg


def test_an_unreachable_hub_is_named(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    class ConnectError(Exception):
        pass

    try:
        raise ConnectError("name resolution failed")
    except ConnectError as cause:
        exc = OSError("We couldn't connect to 'https://huggingface.co'")
        exc.__cause__ = cause
    _fail_with(monkeypatch, exc)
    with pytest.raises(RunError, match="could not be reached"):
        load_adapter("someone/missing-model")
