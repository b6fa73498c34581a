"""Shared helpers of the CUDA test files (tests/ops/test_*_cuda.py): the skip marker, graph
capture and the no-synchronisation guard."""

from __future__ import annotations

import contextlib

import pytest
import torch

import decodekit

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not decodekit.HAS_CUDA_OPS, reason="needs a GPU and a CUDA build of decodekit"
)


@contextlib.contextmanager
def no_sync():
    """Any host synchronisation inside the block raises (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def capture(fn):
    """Captures fn() (one warm-up call on a side stream first) in a CUDA graph; returns the graph
    and the outputs, which each replay rewrites."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out
