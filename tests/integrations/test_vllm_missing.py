"""decodekit's vLLM plugin where vLLM is not installed (this project's CI): enabling it says
what is missing and how to fix it; left disabled, it does nothing."""

from __future__ import annotations

import importlib.util

import pytest

from decodekit.integrations import vllm as plugin

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")


def test_enabled_without_vllm_names_it(monkeypatch):
    monkeypatch.setenv("DECODEKIT_VLLM", "1")
    with pytest.raises(ModuleNotFoundError, match=r"decodekit's vLLM plugin needs vLLM .* or unset DECODEKIT_VLLM"):
        plugin.register()


def test_disabled_does_nothing(monkeypatch):
    monkeypatch.setenv("DECODEKIT_VLLM", "0")
    assert plugin.register() is None
