#!/usr/bin/env python3
"""Check that the per-instruction-set builds of the CPU kernels share no weak symbols.

Each kernel file is compiled once per instruction set (AVX-512, AVX2, baseline). A function
defined in a header outside namespace DK_ISA (an inline function of decodekit/math.h, a member of
std::vector<float>, ...) that the compiler emits out of line becomes a weak symbol of the same
name in every build, and the linker keeps one copy, possibly the AVX-512 one, for all of them
(an ODR violation that crashes or changes bits on another CPU). This lists the defined weak
symbols (nm types W, V, u) of each build's object files and fails if any name appears in more
than one build.

Usage: check_isa_symbols.py [BUILD_DIR]   (default: every build/*/ holding the per-ISA objects)
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

IGNORED = {"DW.ref.__gxx_personality_v0"}  # the C++ personality routine's reference, identical everywhere
WEAK_TYPES = {"W", "V", "u"}


def weak_symbols(objects: list[str]) -> set[str]:
    out = subprocess.run(["nm", "--defined-only", *objects], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in WEAK_TYPES and parts[2] not in IGNORED:
            names.add(parts[2])
    return names


def check(build_dir: str) -> int:
    dirs = sorted(glob.glob(os.path.join(build_dir, "**", "CMakeFiles", "decodekit_cpu_*.dir"), recursive=True))
    dirs = [d for d in dirs if not d.endswith("decodekit_cpu_kernels.dir")]
    if not dirs:
        print(f"{build_dir}: no per-ISA object directories (decodekit_cpu_<isa>.dir)", file=sys.stderr)
        return 2
    per_isa = {}
    for d in dirs:
        objects = sorted(glob.glob(os.path.join(d, "**", "*.o"), recursive=True))
        per_isa[os.path.basename(d)[len("decodekit_cpu_") : -len(".dir")]] = weak_symbols(objects) if objects else set()
    seen: dict[str, list[str]] = {}
    for isa, names in per_isa.items():
        for n in names:
            seen.setdefault(n, []).append(isa)
    shared = {n: isas for n, isas in seen.items() if len(isas) > 1}
    counts = ", ".join(f"{isa}: {len(names)}" for isa, names in per_isa.items())
    if shared:
        print(f"{build_dir}: weak symbols shared between instruction-set builds ({len(shared)}):")
        for n in sorted(shared)[:50]:
            demangled = subprocess.run(["c++filt", n], capture_output=True, text=True).stdout.strip()
            print(f"  {demangled}  [{', '.join(shared[n])}]")
        return 1
    print(f"{build_dir}: no weak symbol shared between the instruction-set builds (weak symbols per build: {counts})")
    return 0


def main() -> int:
    if len(sys.argv) > 1:
        return check(sys.argv[1])
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build")
    builds = sorted(
        {
            p.split("/CMakeFiles/")[0]
            for p in glob.glob(os.path.join(root, "*", "CMakeFiles", "decodekit_cpu_baseline.dir"))
        }
    )
    if not builds:
        print("no build found under build/: run `make setup` first", file=sys.stderr)
        return 2
    return max(check(b) for b in builds)


if __name__ == "__main__":
    sys.exit(main())
