"""Generic contracts of every ``torch.ops.decodekit`` op, run over the rows of ``op_db.py``:

* the op matches its float64 reference on the sample inputs (where the row has one);
* ``torch.library.opcheck`` (schema, fake/Meta kernel, dispatcher registrations);
* Meta shapes and dtypes equal the CPU result's;
* batch invariance in deterministic mode: each batch row alone gives the same bits;
* the same bits on every CPU instruction set (DECODEKIT_CPU_ISA, one process each);
* ``torch.compile(fullgraph=True, backend="aot_eager")`` of the validated wrapper with
  ``validate=False`` gives the eager result;
* CPU == CUDA, through the ``device`` fixture (skipped without a GPU), for every op whose
  CUDA kernel the dispatcher has.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from op_db import BY_NAME, OPS, run

ROWS = [pytest.param(row, id=row.name) for row in OPS]
HERE = os.path.dirname(os.path.abspath(__file__))


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def test_every_op_has_a_row():
    ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("decodekit::")}
    assert ops == set(BY_NAME), (
        f"rows missing for {sorted(ops - set(BY_NAME))}, stale rows {sorted(set(BY_NAME) - ops)}"
    )


@pytest.mark.parametrize("row", ROWS)
def test_matches_reference(row):
    if row.check is None:
        pytest.skip(f"{row.name}: checked statistically in its family's tests (no exact reference)")
    for args in row.sample_inputs("cpu"):
        row.check(args, run(row, args))


@pytest.mark.parametrize("row", ROWS)
def test_opcheck(row):
    if not row.opcheck:
        pytest.skip(f"{row.name} is not opchecked (see op_db)")
    for args in row.sample_inputs("cpu"):
        torch.library.opcheck(row.op, args)


@pytest.mark.parametrize("row", ROWS)
def test_meta_shapes(row):
    if not row.opcheck:
        pytest.skip(f"{row.name} has no Meta kernel")
    for args in row.sample_inputs("cpu"):
        real = _flat(run(row, args))
        fake = _flat(run(row, tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)))
        assert len(real) == len(fake)
        for r, f in zip(real, fake):
            assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype, (row.name, f, r)


@pytest.mark.parametrize("row", ROWS)
def test_batch_invariance(row):
    if not row.batch_args:
        pytest.skip(f"{row.name} has no batch dimension")
    for args in row.sample_inputs("cpu"):
        B = next(args[i].size(0) for i in row.batch_args if isinstance(args[i], torch.Tensor))
        whole = _flat(run(row, args))
        for b in (B - 1, 0):
            alone = tuple(
                a[b : b + 1] if i in row.batch_args and isinstance(a, torch.Tensor) else a for i, a in enumerate(args)
            )
            part = _flat(run(row, alone))
            for w, p in zip(whole, part):
                if w.dim() and w.size(0) == B:
                    assert torch.equal(w[b : b + 1], p), (row.name, b)


_ISA_SCRIPT = r"""
import hashlib, sys, torch
sys.path[:0] = [{here!r}, {tests!r}]
from op_db import OPS, run
import decodekit
h = hashlib.sha256()
for row in OPS:
    for args in row.sample_inputs("cpu"):
        for t in run(row, args) if isinstance(run(row, args), tuple) else (run(row, args),):
            if isinstance(t, torch.Tensor):
                h.update(t.float().numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
print(decodekit.cpu_isa(), h.hexdigest())
"""


@pytest.mark.slow
def test_same_bits_on_every_instruction_set():
    digests = {}
    script = _ISA_SCRIPT.format(here=HERE, tests=os.path.dirname(HERE))
    for isa in ("avx512", "avx2", "baseline"):
        env = dict(os.environ, DECODEKIT_CPU_ISA=isa)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        ran, digest = r.stdout.split()
        digests[ran] = digest
    assert "baseline" in digests
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("row", ROWS)
def test_compile_fullgraph_with_validate_false(row):
    if row.wrapper is None:
        pytest.skip(f"{row.name} has no public wrapper")
    torch._dynamo.reset()
    for args in row.sample_inputs("cpu"):
        tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def call(*tensors):
            full = list(args)  # noqa: B023 (compiled and called in this iteration)
            for i, t in zip(tensor_at, tensors):  # noqa: B023
                full[i] = t
            return row.wrapper(tuple(full))

        tensors = [args[i] for i in tensor_at]
        eager = _flat(call(*tensors))
        compiled = _flat(torch.compile(call, fullgraph=True, backend="aot_eager")(*tensors))
        assert len(eager) == len(compiled)
        for e, c in zip(eager, compiled):
            assert torch.equal(e, c), row.name


@pytest.mark.parametrize("row", ROWS)
def test_cpu_equals_cuda(row, device):
    if device == "cpu":
        pytest.skip("compares CUDA with the CPU")
    if "cuda" not in row.devices:
        pytest.skip(f"no CUDA kernel registered for {row.name}")
    for cpu_args, dev_args in zip(row.sample_inputs("cpu"), row.sample_inputs(device)):
        for c, d in zip(_flat(run(row, cpu_args)), _flat(run(row, dev_args))):
            d = d.cpu()
            if c.is_floating_point():
                # Same splits and order by contract; float results allowed 1 ulp-level slack.
                torch.testing.assert_close(d, c, rtol=2e-6, atol=1e-7, equal_nan=True)
            else:
                assert torch.equal(d, c), row.name
