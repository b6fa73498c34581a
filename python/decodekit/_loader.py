"""Loads the compiled extension, refusing a torch other than the one it was built for."""

from __future__ import annotations

import torch

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - only in a source tree without a build
    raise ImportError(
        "decodekit's compiled extension is not built. Install the package with "
        "`pip install --no-build-isolation .` after installing torch."
    ) from exc


def _base_version(v: str) -> str:
    return v.split("+")[0]


def _check_torch_version() -> None:
    built = _build_info.TORCH_VERSION
    running = torch.__version__
    if built != running:
        raise ImportError(
            f"decodekit was built against torch {built} but torch {running} is installed; "
            "rebuild decodekit against the installed torch "
            "(pip install --no-build-isolation --force-reinstall --no-deps <decodekit source>)."
        )


_check_torch_version()
from . import _C  # noqa: E402  (registers torch.ops.decodekit.*)

ops = torch.ops.decodekit
BUILT_WITH_TORCH = _C.built_with_torch
HAS_CUDA_OPS = bool(_C.has_cuda_ops)
