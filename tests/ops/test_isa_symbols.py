"""The per-instruction-set builds of the CPU kernels share no weak symbol (scripts/check_isa_symbols.py):
a header function emitted out of line in every build would be merged into one copy by the linker."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")  # the repository


def test_isa_objects_share_no_weak_symbols():
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    if not glob.glob(os.path.join(ROOT, "build", "*", "CMakeFiles", "decodekit_cpu_baseline.dir")):
        pytest.skip("no local build under build/ (the package was installed from elsewhere)")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "check_isa_symbols.py")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
