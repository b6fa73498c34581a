"""Loads the compiled extension, refusing a torch other than the one it was built for."""

from __future__ import annotations

import os

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


#: Values of the DECODEKIT_CPU_ISA environment variable (unset or empty: the best the CPU has).
CPU_ISAS = ("avx512", "avx2", "baseline")


def _check_cpu_isa_env() -> None:
    value = os.environ.get("DECODEKIT_CPU_ISA", "")
    if value and value not in CPU_ISAS:
        raise ImportError(
            f"decodekit: DECODEKIT_CPU_ISA={value!r} is not an instruction set decodekit knows; use one of "
            f"{', '.join(CPU_ISAS)} (a set the CPU lacks falls back to the best it has), or unset it"
        )


_check_torch_version()
_check_cpu_isa_env()
from . import _C  # noqa: E402  (registers torch.ops.decodekit.*)

BUILT_WITH_TORCH = _C.built_with_torch
HAS_CUDA_OPS = bool(_C.has_cuda_ops)


def cpu_isa() -> str:
    """The CPU instruction set the kernels run with: ``"avx512"``, ``"avx2"`` or ``"baseline"``
    (chosen once per process: the best the CPU supports, or ``DECODEKIT_CPU_ISA``)."""
    return _C.cpu_isa()
