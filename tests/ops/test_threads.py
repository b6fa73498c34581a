"""The CPU kernels' thread pool and thread count: results equal to the float64 references and
bitwise equal across thread counts (the contract is thread-count invariance), the
set/get/environment settings, clear errors, concurrent and forked callers that do not hang,
and one OpenMP runtime in the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import decodekit
import reference as ref
from decodekit import _C

THREAD_COUNTS = (1, 2, 3, 4)  # 3 and 4 oversubscribe a 2-core machine: workers then often wait unscheduled


def _per_thread_count(fn):
    """fn() under decodekit.set_num_threads(nt) for each count; the setting is restored after."""
    saved = _C._num_threads_setting()
    try:
        outs = []
        for nt in THREAD_COUNTS:
            decodekit.set_num_threads(nt)
            assert decodekit.get_num_threads() == nt
            outs.append(fn())
        return outs
    finally:
        _C._set_num_threads(saved)


def _assert_all_equal(outs):
    for nt, o in zip(THREAD_COUNTS[1:], outs[1:]):
        if isinstance(o, tuple):
            assert all(torch.equal(a, b) for a, b in zip(o, outs[0])), nt
        else:
            assert torch.equal(o, outs[0]), nt


def test_sample_from_logits_matches_reference_and_is_thread_count_invariant():
    g = torch.Generator().manual_seed(15)
    B, V = 8, 6000
    logits = torch.randn(B, V, generator=g) * 3
    seeds = torch.randint(0, 2**40, (B,), generator=g)
    params = dict(temperature=0.8, top_k=50, top_p=0.9)
    outs = _per_thread_count(lambda: decodekit.sample_from_logits(logits, seed=seeds, offset=5, **params))
    _assert_all_equal(outs)
    expected = [ref.sample(logits[b], int(seeds[b]), 5, **params) for b in range(B)]
    assert outs[0].tolist() == expected


def test_softmax_matches_reference_and_is_thread_count_invariant():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(8, 10000, generator=g) * 4
    outs = _per_thread_count(lambda: decodekit.softmax(x, 0.7))
    _assert_all_equal(outs)
    want = torch.stack([ref.softmax(x[b], 0.7) for b in range(8)])
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("M", [1, 7])
def test_linear_matches_reference_and_is_thread_count_invariant(M):
    g = torch.Generator().manual_seed(17 + M)
    w = torch.randn(1536, 576, generator=g) / 24
    b = torch.randn(1536, generator=g)
    x = torch.randn(M, 576, generator=g)
    outs = _per_thread_count(lambda: decodekit.linear(x, w, b))
    _assert_all_equal(outs)
    torch.testing.assert_close(outs[0].double(), x.double() @ w.double().T + b.double(), rtol=1e-5, atol=1e-5)


def test_paged_attention_matches_reference_and_is_thread_count_invariant():
    g = torch.Generator().manual_seed(18)
    B, Q, Hq, Hkv, D, bs = 4, 2, 9, 3, 64, 16
    lens = [5, 40, 77, 130]
    nb = sum((n + bs - 1) // bs for n in lens) + 2
    k = torch.randn(nb, bs, Hkv, D, generator=g)
    v = torch.randn(nb, bs, Hkv, D, generator=g)
    tables = torch.full((B, 9), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        m = (n + bs - 1) // bs
        tables[i, :m] = torch.arange(used, used + m, dtype=torch.int32)
        used += m
    q = torch.randn(B, Q, Hq, D, generator=g)
    seq = torch.tensor(lens, dtype=torch.int32)
    outs = _per_thread_count(lambda: decodekit.paged_attention(q, k, v, tables, seq))
    _assert_all_equal(outs)
    want = ref.paged_attention(q, k, v, tables, seq)
    torch.testing.assert_close(outs[0], want, rtol=1e-4, atol=1e-5)


def test_many_small_regions_stay_exact():
    # Thousands of back-to-back regions (workers spinning, sleeping and waking in between):
    # a lost wake-up would hang, a claimed chunk run twice or skipped would change values.
    g = torch.Generator().manual_seed(19)
    x = torch.randn(6, 700, generator=g)
    w = torch.randn(96, 700, generator=g)
    saved = _C._num_threads_setting()
    try:
        decodekit.set_num_threads(1)
        p1, l1 = decodekit.softmax(x, 1.3), decodekit.linear(x, w)
        decodekit.set_num_threads(2)
        for _ in range(1500):
            assert torch.equal(decodekit.softmax(x, 1.3), p1)
            assert torch.equal(decodekit.linear(x, w), l1)
    finally:
        _C._set_num_threads(saved)


def test_concurrent_callers_get_the_same_bits():
    # Two Python threads calling ops at once: one region runs on the pool, the other runs
    # serially on its own thread (the pool takes one region at a time); both exact.
    g = torch.Generator().manual_seed(20)
    x = torch.randn(8, 20000, generator=g)
    w = torch.randn(512, 576, generator=g)
    xl = torch.randn(3, 576, generator=g)
    saved = _C._num_threads_setting()
    try:
        decodekit.set_num_threads(2)
        p_want, l_want = decodekit.softmax(x, 0.9), decodekit.linear(xl, w)
        bad = []

        def work(kind):
            for _ in range(200):
                if kind == 0 and not torch.equal(decodekit.softmax(x, 0.9), p_want):
                    bad.append("softmax")
                if kind == 1 and not torch.equal(decodekit.linear(xl, w), l_want):
                    bad.append("linear")

        ts = [threading.Thread(target=work, args=(i % 2,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in ts), "concurrent callers hung"
        assert not bad, bad
    finally:
        _C._set_num_threads(saved)


def test_set_get_round_trip_and_default():
    saved = _C._num_threads_setting()
    torch_threads = torch.get_num_threads()
    try:
        for n in (1, 2, 5, 1024):
            decodekit.set_num_threads(n)
            assert decodekit.get_num_threads() == n
        decodekit.set_num_threads(3)
        torch.set_num_threads(1)  # decodekit's own setting wins over torch's
        assert decodekit.get_num_threads() == 3
        if not os.environ.get("DECODEKIT_NUM_THREADS"):
            decodekit.set_num_threads(None)  # back to torch's count, read at each call
            assert decodekit.get_num_threads() == 1
            torch.set_num_threads(2)
            assert decodekit.get_num_threads() == 2
    finally:
        torch.set_num_threads(torch_threads)
        _C._set_num_threads(saved)


@pytest.mark.parametrize("bad", [0, -1, 1025, 1.5, 2.0, True, "2", torch.tensor(2)])
def test_bad_thread_counts_are_rejected(bad):
    before = decodekit.get_num_threads()
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 1024\]"):
        decodekit.set_num_threads(bad)
    assert decodekit.get_num_threads() == before
    # generate / speculative_generate check threads= before loading any model
    with pytest.raises(ValueError, match=r"generate: threads must be an int in \[1, 1024\]"):
        decodekit.generate([1, 2, 3], model="/nonexistent.gguf", threads=bad)
    with pytest.raises(ValueError, match=r"speculative_generate: threads must be an int"):
        decodekit.speculative_generate([1, 2, 3], model="/nonexistent.gguf", threads=bad)


def _run_python(code: str, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.pop("DECODEKIT_NUM_THREADS", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_environment_variable():
    r = _run_python(
        "import decodekit, torch; torch.set_num_threads(1); print(decodekit.get_num_threads())",
        {"DECODEKIT_NUM_THREADS": "3"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"
    for value in ("0", "two", "-4"):
        r = _run_python("import decodekit", {"DECODEKIT_NUM_THREADS": value})
        assert r.returncode != 0
        assert "DECODEKIT_NUM_THREADS" in r.stderr and "integer in [1, 1024]" in r.stderr, r.stderr


def test_fork_child_gets_a_working_pool():
    # The parent's workers do not exist in a forked child: the child must start a fresh pool
    # instead of waiting for them (a hang here is a bug in the pool, not in the test). The
    # child compares bytes with numpy and runs torch single-threaded: torch's own OpenMP
    # runtime (libgomp) can hang in a child forked after it ran a parallel region, which is
    # not what this tests.
    code = """
        import os, sys, torch, decodekit
        from decodekit import _C
        decodekit.set_num_threads(3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 30000, generator=g)
        w = torch.randn(300, 576, generator=g)
        xl = torch.randn(4, 576, generator=g)
        def results():
            return decodekit.softmax(x, 0.8).numpy().tobytes() + decodekit.linear(xl, w).numpy().tobytes()
        want = results()
        assert _C._pool_size() >= 2, _C._pool_size()
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                torch.set_num_threads(1)  # torch's threads; decodekit's stay at 3
                ok = decodekit.get_num_threads() == 3
                for _ in range(50):
                    ok = ok and results() == want
                ok = ok and _C._pool_size() >= 2
                os._exit(0 if ok else 3)
            pids.append(pid)
            assert results() == want
        codes = [os.waitpid(p, 0)[1] for p in pids]
        assert codes == [0, 0, 0], codes
        assert results() == want
        print("ok")
    """
    r = _run_python(code, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    code = """
        import re, torch
        def omp():
            libs = set()
            for line in open("/proc/self/maps"):
                path = line.split()[-1]
                if re.search(r"/lib(g|i)?omp[^/]*\\.so", path):
                    libs.add(path)
            return libs
        before = omp()
        import decodekit
        decodekit.softmax(torch.randn(4, 1000), 1.0)
        after = omp()
        assert after == before and len(after) <= 1, (before, after)
        print("ok")
    """
    r = _run_python(code)
    assert r.returncode == 0, r.stdout + r.stderr
