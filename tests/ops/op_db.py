"""One row per ``torch.ops.decodekit`` op (the OpInfo idea of PyTorch, in miniature).

A row gives the op's sample inputs (raw schema arguments, built on a given device), an
independent check against the float64 references of ``tests/reference/`` where one exists,
which arguments the op writes in place, which arguments carry the batch (dim 0, for batch
invariance), and a call of the validated wrapper with ``validate=False`` (for the
``torch.compile`` test). ``test_contracts.py`` runs the generic tests over every row; a new op,
or a new CUDA kernel, is covered by adding or editing one row here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

import decodekit
import reference as ref
from decodekit import QuantizedWeight
from decodekit._checks import has_kernel
from reference.layers import dequantize_blocks, random_blocks


@dataclass
class OpRow:
    name: str
    sample_inputs: Callable[[str], List[tuple]]  # device -> raw argument tuples
    check: Optional[Callable[[tuple, object], None]] = None  # (args, out): asserts against the reference
    mutates: Tuple[int, ...] = ()  # arguments written in place
    batch_args: Tuple[int, ...] = ()  # arguments whose dim 0 is the batch (empty: no batch-invariance test)
    wrapper: Optional[Callable[[tuple], object]] = None  # decodekit.<name>(..., validate=False) on the samples
    opcheck: bool = True

    @property
    def op(self):
        return getattr(torch.ops.decodekit, self.name).default

    @property
    def devices(self) -> Tuple[str, ...]:
        """The devices the dispatcher has a kernel for (CUDA as soon as one is registered)."""
        return ("cpu",) + (("cuda",) if has_kernel(self.name, "cuda") else ())


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(B=5, V=300, seed=0, dtype=torch.float32):
    return (torch.randn(B, V, generator=_g(seed)) * 3).to(dtype)


def _probs(B=5, V=300, seed=1):
    return torch.softmax(torch.randn(B, V, generator=_g(seed)) * 2, -1)


def _on(device, *xs):
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)


# ------------------------------------------------------------------ samples ----
def softmax_samples(d):
    t = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e-6])
    return [_on(d, _logits(), t, 1.0, 300, True), _on(d, _logits(dtype=torch.bfloat16), None, 0.7, 250, True)]


def softmax_check(args, out):
    logits, t, t_val, vs = args[:4]
    for b in range(logits.size(0)):
        T = float(t[b]) if t is not None else t_val
        expected = torch.zeros(logits.size(1), dtype=torch.float64)
        expected[:vs] = ref.softmax(logits[b, :vs].float(), T)
        torch.testing.assert_close(out[b].double(), expected, rtol=2e-6, atol=1e-7)


def argmax_samples(d):
    x = _logits(seed=2)
    x[1, 7] = x[1, 9] = 100.0  # a tie: the lowest index wins
    return [_on(d, x, 300), _on(d, x, 120)]


def argmax_check(args, out):
    x, vs = args
    ids, valid = out
    assert valid.all()
    assert ids.tolist() == [ref.argmax(x[b, :vs]) for b in range(x.size(0))]


def sample_from_logits_samples(d):
    B = 5
    t = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9])
    k = torch.tensor([0, 20, 0, 5, 50])
    p = torch.tensor([1.0, 0.9, 0.8, 1.0, 0.95], dtype=torch.float64)
    m = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.01])
    seed = torch.arange(B) * 7919 + 1
    offset = torch.arange(B) + 3
    return [
        _on(d, _logits(seed=3), t, 1.0, k, 0, p, 1.0, m, 0.0, seed, 0, offset, 0, 300, True, True, 3, False),
        _on(
            d,
            _logits(seed=4, dtype=torch.float16),
            None,
            0.8,
            None,
            10,
            None,
            0.9,
            None,
            0.0,
            seed,
            0,
            None,
            5,
            280,
            True,
            False,
            0,
            False,
        ),
    ]


def sample_from_logits_check(args, out):
    logits, t, t_val, k, k_val, p, p_val, m, m_val, seed, _, offset, o_val, vs = args[:14]
    ids = out[0]
    for b in range(logits.size(0)):
        params = dict(
            temperature=float(t[b]) if t is not None else t_val,
            top_k=int(k[b]) if k is not None else k_val,
            top_p=float(p[b]) if p is not None else p_val,
            min_p=float(m[b]) if m is not None else m_val,
        )
        off = int(offset[b]) if offset is not None else o_val
        assert int(ids[b]) == ref.sample(logits[b, :vs].float(), int(seed[b]), off, **params), b


def sample_from_probs_samples(d):
    B = 5
    seed = torch.arange(B) + 11
    return [
        _on(
            d,
            _probs(),
            torch.tensor([0, 3, 10, 0, 1]),
            0,
            None,
            0.9,
            None,
            0.0,
            seed,
            0,
            None,
            4,
            300,
            True,
            True,
            2,
            False,
        )
    ]


def filter_probs_samples(d):
    return [
        _on(
            d,
            _probs(seed=5),
            torch.tensor([0, 3, 10, 0, 1]),
            0,
            torch.tensor([1.0, 0.9, 0.5, 0.8, 1.0], dtype=torch.float64),
            1.0,
            None,
            0.02,
            300,
        )
    ]


def filter_probs_check(args, out):
    probs, k, _, p, _, _, m_val, vs = args
    filtered, valid = out
    assert valid.all()
    for b in range(probs.size(0)):
        expected = ref.filter_probs(probs[b], top_k=int(k[b]), top_p=float(p[b]), min_p=m_val)
        torch.testing.assert_close(filtered[b].double(), expected.double(), rtol=1e-6, atol=1e-7)


def top_k_mask_logits_samples(d):
    return [_on(d, _logits(seed=6), torch.tensor([0, 1, 5, 299, -3]), 0, 300)]


def top_k_mask_logits_check(args, out):
    x, k, _, _ = args
    masked, valid = out
    for b in range(x.size(0)):
        kb = int(k[b])
        keep = ref.rank_order(x[b])[:kb] if 0 < kb < x.size(1) else torch.arange(x.size(1))
        expected = torch.full_like(x[b], -math.inf)
        expected[keep] = x[b, keep]
        assert torch.equal(masked[b], expected), b


def apply_penalties_samples(d):
    B, V = 4, 300
    ids = torch.tensor([[1, 5, 5, -1], [7, 8, 9, 10], [-1, -1, -1, -1], [0, 299, 0, 0]])
    bias_ids = torch.tensor([[3, -1], [4, 5], [-1, -1], [6, -1]])
    bias_vals = torch.tensor([[1.5, 0.0], [-2.0, -math.inf], [0.0, 0.0], [0.25, 0.0]])
    return [
        _on(
            d,
            _logits(B, V, seed=7),
            torch.tensor([1.0, 1.3, 0.8, 2.0]),
            1.0,
            torch.tensor([0.0, 0.5, 0.1, 0.2]),
            0.0,
            torch.tensor([0.3, 0.0, 0.0, -0.1]),
            0.0,
            ids,
            None,
            None,
            bias_ids,
            bias_vals,
            None,
            False,
            V,
        )
    ]


def apply_penalties_check(args, out):
    x, r, _, f, _, p, _, ids, _, _, bias_ids, bias_vals = args[:12]
    for b in range(x.size(0)):
        bias = {int(t): float(v) for t, v in zip(bias_ids[b], bias_vals[b]) if int(t) >= 0}
        expected = ref.apply_penalties(x[b], float(r[b]), float(f[b]), float(p[b]), ids[b].tolist(), bias)
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-6, atol=1e-6)


def linear_samples(d):
    return [
        _on(
            d,
            torch.randn(6, 70, generator=_g(8)),
            torch.randn(33, 70, generator=_g(9)),
            torch.randn(33, generator=_g(10)),
        )
    ]


def linear_check(args, out):
    torch.testing.assert_close(out.double(), ref.linear(*args), rtol=1e-5, atol=1e-5)


def linear_quantized_samples(d):
    out = []
    for i, (block_type, M, N, K) in enumerate((("q4_1", 6, 33, 64), ("q8_0", 5, 19, 96))):
        x = torch.randn(M, K, generator=_g(40 + i))
        blocks = random_blocks(block_type, N, K, _g(42 + i))
        out.append((*_on(d, x, blocks), block_type, N, K, *_on(d, torch.randn(N, generator=_g(44 + i)))))
    return out


def linear_quantized_check(args, out):
    x, blocks, block_type, N, K, bias = args
    w = dequantize_blocks(blocks, block_type, N, K)
    torch.testing.assert_close(out.double(), ref.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def rms_norm_samples(d):
    return [_on(d, torch.randn(5, 96, generator=_g(11)), torch.rand(96, generator=_g(12)) + 0.5, 1e-5)]


def rms_norm_check(args, out):
    torch.testing.assert_close(out.double(), ref.rms_norm(*args), rtol=1e-6, atol=1e-6)


def silu_and_mul_samples(d):
    return [_on(d, torch.randn(5, 64, generator=_g(13)) * 4)]


def silu_and_mul_check(args, out):
    torch.testing.assert_close(out.double(), ref.silu_and_mul(args[0]), rtol=1e-6, atol=1e-6)


def _rope_tables(P=40, D=16):
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).double() / D))
    ang = torch.arange(P).double()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), -1)
    return ang.cos().float(), ang.sin().float()


def rope_samples(d):
    cos, sin = _rope_tables()
    return [_on(d, torch.randn(6, 3 * 16, generator=_g(14)), 2, cos, sin, torch.tensor([0, 5, 39, 7, 7, 1]))]


def rope_check(args, out):
    x_before, num_heads, cos, sin, pos = args
    torch.testing.assert_close(out.double(), ref.rope(x_before, num_heads, cos, sin, pos), rtol=1e-6, atol=1e-6)


def chain_speculative_sampling_samples(d):
    B, K, V = 4, 3, 50
    target = torch.softmax(torch.randn(B, K + 1, V, generator=_g(15)), -1)
    draft = torch.softmax(torch.randn(B, K, V, generator=_g(16)), -1)
    ids = torch.tensor([[1, 2, 3], [4, -1, -1], [target[2, 0].argmax().item(), 5, 6], [7, 8, 9]])
    seed = torch.arange(B) + 100
    return [_on(d, draft, ids, target, seed, 0, None, 2, V), _on(d, None, ids, target, seed, 0, None, 9, V)]


def paged_attention_samples(d):
    k = torch.randn(10, 16, 2, 32, generator=_g(17))
    v = torch.randn(10, 16, 2, 32, generator=_g(18))
    tables = torch.tensor([[3, 1, 0, -1], [2, 4, 5, 6], [9, -1, -1, -1]])
    lens = torch.tensor([40, 61, 5])
    q = torch.randn(3, 2, 4, 32, generator=_g(19))
    q5 = torch.randn(3, 5, 4, 32, generator=_g(40))
    parents = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3], [-1, -1, 0, 1, 1]])
    mask = decodekit.tree_mask_from_parents(parents)
    return [_on(d, q, k, v, tables, lens, 1.0 / math.sqrt(32), "NHD"), _on(d, q5, k, v, tables, lens, 0.2, "NHD", mask)]


def paged_attention_check(args, out):
    q, k, v, tables, lens, scale, layout = args[:7]
    mask = args[7] if len(args) > 7 else None
    torch.testing.assert_close(
        out.double(),
        ref.paged_attention(q, k, v, tables, lens, scale=scale, kv_layout=layout, tree_mask=mask).double(),
        rtol=1e-5,
        atol=1e-5,
    )


def append_kv_cache_samples(d):
    B, S, H, D = 3, 10, 2, 8
    k, v = torch.zeros(B, S, H, D), torch.zeros(B, S, H, D)
    key, value = torch.randn(B, 2, H, D, generator=_g(20)), torch.randn(B, 2, H, D, generator=_g(21))
    return [_on(d, k, v, key, value, torch.tensor([0, 4, 8]), "NHD")]


def append_kv_cache_check(args, out):
    ek, ev = ref.append_kv_cache(*args)
    assert torch.equal(out[0], ek) and torch.equal(out[1], ev)


def append_paged_kv_cache_samples(d):
    NB, bs, H, D = 4, 4, 2, 8
    k, v = torch.zeros(NB, bs, H, D), torch.zeros(NB, bs, H, D)
    key, value = torch.randn(5, H, D, generator=_g(22)), torch.randn(5, H, D, generator=_g(23))
    return [_on(d, k, v, key, value, torch.tensor([0, 5, -1, 15, 9]), "NHD")]


def append_paged_kv_cache_check(args, out):
    ek, ev = ref.append_paged_kv_cache(*args)
    assert torch.equal(out[0], ek) and torch.equal(out[1], ev)


def compact_kv_cache_samples(d):
    B, S, H, D = 3, 12, 2, 8
    k, v = torch.randn(B, S, H, D, generator=_g(41)), torch.randn(B, S, H, D, generator=_g(42))
    acc = torch.tensor([[0, 2, 5, -1], [-1, -1, -1, -1], [1, 2, 3, 7]])
    return [_on(d, k, v, torch.tensor([3, 0, 4]), acc, "NHD")]


def compact_kv_cache_check(args, out):
    ek, ev = ref.compact_kv_cache(*args)
    assert torch.equal(out[0], ek) and torch.equal(out[1], ev)


def compact_paged_kv_cache_samples(d):
    NB, bs, H, D = 7, 4, 2, 8
    k, v = torch.randn(NB, H, bs, D, generator=_g(43)), torch.randn(NB, H, bs, D, generator=_g(44))
    tables = torch.tensor([[5, 1, 3], [0, 6, -1]])
    acc = torch.tensor([[0, 3, 4, 6], [1, -1, -1, -1]])
    return [_on(d, k, v, tables, torch.tensor([2, 3]), acc, "HND")]


def compact_paged_kv_cache_check(args, out):
    ek, ev = ref.compact_paged_kv_cache(*args)
    assert torch.equal(out[0], ek) and torch.equal(out[1], ev)


# decoder_layer: a small Llama block (every K = H, Hq * D, I a multiple of 32 for the block formats)
HQ, HKV, D, H, I = 4, 2, 16, 64, 96  # every K (H, Hq * D, I) a multiple of 32 for the block formats
BS, NB, P = 4, 24, 64  # block size, blocks in the pool, RoPE table length
EPS = 1e-5
SCALE = 1.0 / math.sqrt(D)
# wqkv, wo, w_gate_up, w_down
WEIGHT_TYPES = {
    "f32": ("f32", "f32", "f32", "f32"),
    "gguf": ("q4_1", "q4_1", "q4_1", "q8_0"),  # the default GGUF's mix
    "mixed": ("q8_0", "f32", "q4_1", "q4_1"),
}


def _decoder_rope_tables(D=D, P=P, theta=10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2).double() / D))
    ang = torch.arange(P).double()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), -1)
    return ang.cos().float(), ang.sin().float()


def _layer_weight(kind, N, K, g):
    if kind == "f32":
        return torch.randn(N, K, generator=g) * 0.15
    return QuantizedWeight(random_blocks(kind, N, K, g), kind, (N, K))


def dense_weight(w):
    return dequantize_blocks(w.blocks, w.block_type, *w.shape) if isinstance(w, QuantizedWeight) else w


def decoder_layer_case(B, T, layout="NHD", weights="f32", seed=0, cached=(0, 9, 3)):
    """Arguments of one decoder_layer call: row b has cached[b] tokens already in the cache (its
    blocks a random choice from the pool, every pool entry random), T new ones."""
    g = _g(seed)
    cached = [cached[b % len(cached)] for b in range(B)]
    shape = (NB, BS, HKV, D) if layout == "NHD" else (NB, HKV, BS, D)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    perm = torch.randperm(NB, generator=g).tolist()
    need = [-(-(n + T) // BS) for n in cached]
    width = max(need)
    tables = torch.full((B, width), -1, dtype=torch.int64)
    slots = torch.empty(B, T, dtype=torch.int64)
    for b in range(B):
        own = [perm.pop() for _ in range(need[b])]
        tables[b, : need[b]] = torch.tensor(own)
        for t in range(T):
            p = cached[b] + t
            slots[b, t] = own[p // BS] * BS + p % BS
    positions = torch.tensor(cached)[:, None] + torch.arange(T)[None, :]
    seq_lens = torch.tensor(cached) + T
    cos, sin = _decoder_rope_tables()
    types = WEIGHT_TYPES[weights]
    w = (
        1 + 0.1 * torch.randn(H, generator=g),
        _layer_weight(types[0], (HQ + 2 * HKV) * D, H, g),
        _layer_weight(types[1], H, HQ * D, g),
        1 + 0.1 * torch.randn(H, generator=g),
        _layer_weight(types[2], 2 * I, H, g),
        _layer_weight(types[3], H, I, g),
    )
    x = torch.randn(B, T, H, generator=g)
    return dict(
        x=x,
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=seq_lens,
        positions=positions,
        cos_table=cos,
        sin_table=sin,
        weights=w,
        kv_layout=layout,
    )


def decoder_layer_samples(d):
    out = []
    for B, T, layout, weights, seed in ((3, 2, "NHD", "f32", 50), (2, 3, "HND", "gguf", 51)):
        c = decoder_layer_case(B, T, layout, weights, seed)
        w = [layers_weight_arg(t) for t in c["weights"]]
        out.append(
            _on(
                d,
                c["x"],
                c["k_cache"],
                c["v_cache"],
                c["slot_mapping"],
                c["block_tables"],
                c["seq_lens"],
                c["positions"],
                c["cos_table"],
                c["sin_table"],
                c["weights"][0],
                *w[1],
                *w[2],
                c["weights"][3],
                *w[4],
                *w[5],
                HQ,
                HKV,
                I,
                EPS,
                SCALE,
                layout,
            )
        )
    return out


def layers_weight_arg(w):
    return decodekit.ops.layers.layer_weight(w)


def _decoder_weights(a):
    """The six weights of raw decoder_layer arguments (QuantizedWeights rebuilt from their blocks)."""
    H_, I_ = a[0].size(2), a[21]
    q_size, qkv = a[19] * a[1].size(3), (a[19] + 2 * a[20]) * a[1].size(3)
    shapes = ((qkv, H_), (H_, q_size), (2 * I_, H_), (H_, I_))
    ws = []
    for (t, kind), shape in zip(((a[10], a[11]), (a[12], a[13]), (a[15], a[16]), (a[17], a[18])), shapes):
        ws.append(t if kind == "f32" else decodekit.QuantizedWeight(t, kind, shape))
    return a[9], ws[0], ws[1], a[14], ws[2], ws[3]


def decoder_layer_check(args, out):
    x, kc, vc = out
    ws = [dense_weight(w) for w in _decoder_weights(args)]
    wx, wk, wv = ref.decoder_layer(
        *args[:9], ws, num_heads=args[19], num_kv_heads=args[20], eps=args[22], scale=args[23], kv_layout=args[24]
    )
    check_against_float64((x, kc, vc), (wx, wk, wv))


def check_against_float64(got, want):
    """x, k_cache, v_cache within float32 rounding of the float64 block: each element within
    1e-5 of its tensor's largest magnitude (sums of at most 96 products and one softmax per
    step, about 2^-24 relative each, with cancellation; the random Q4_1 blocks' non-zero mean
    makes |x| reach ~2000, where the errors are ~2e-7 of it)."""
    for name, a, b in zip(("x", "k_cache", "v_cache"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5 * float(b.abs().max()), msg=name)


def _w_decoder_layer(a):
    return decodekit.decoder_layer(
        a[0].clone(),
        a[1].clone(),
        a[2].clone(),
        *a[3:9],
        *_decoder_weights(a),
        num_heads=a[19],
        num_kv_heads=a[20],
        eps=a[22],
        scale=a[23],
        kv_layout=a[24],
        validate=False,
    )


def check_probability_rows_samples(d):
    return [_on(d, _probs(seed=24), 300, True)]


def check_probability_rows_check(args, out):
    assert out == 0  # finite, non-negative rows with mass


def processed_probs_samples(d):
    x = _logits(B=6, seed=25)
    t = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9, 1.0])
    k = torch.tensor([0, 5, 0, 40, 1, 0])
    p = torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0, 0.95], dtype=torch.float64)
    m = torch.tensor([0.0, 0.0, 0.1, 0.05, 0.0, 0.0])
    return [
        _on(d, x, t, 1.0, k, 0, p, 1.0, m, 0.0, 290, True),
        _on(d, _logits(seed=26, dtype=torch.bfloat16), None, 0.8, None, 20, None, 0.9, None, 0.0, 300, True),
    ]


def processed_probs_check(args, out):
    logits, t, t_val, k, k_val, p, p_val, m, m_val, vs = args[:10]
    probs, valid = out
    assert bool(valid.all())
    for b in range(logits.size(0)):

        def pick(tt, v, b=b):
            return float(tt[b]) if tt is not None else v

        expected = ref.filtered_probs(
            logits[b].float(),
            temperature=pick(t, t_val),
            top_k=int(pick(k, k_val)),
            top_p=pick(p, p_val),
            min_p=pick(m, m_val),
            vocab_size=vs,
        )
        torch.testing.assert_close(probs[b].double(), expected, rtol=2e-6, atol=1e-7)


def greedy_verify_samples(d):
    target = _logits(B=4, V=300, seed=27).reshape(4, 1, 300).repeat(1, 4, 1) + torch.randn(4, 4, 300, generator=_g(28))
    drafts = target[:, :3].argmax(-1)
    drafts[1, 1] = (drafts[1, 1] + 1) % 300  # a rejection at position 1
    return [_on(d, drafts, target, 300), _on(d, drafts, target.argmax(-1), 300)]


def greedy_verify_check(args, out):
    drafts, target = args[0], args[1]
    ids = target if target.dtype == torch.int64 else target.argmax(-1)
    tokens, num_accepted, num_emitted = out
    for b in range(drafts.size(0)):
        n = 0
        while n < drafts.size(1) and int(drafts[b, n]) == int(ids[b, n]):
            n += 1
        assert int(num_accepted[b]) == n and int(num_emitted[b]) == n + 1
        assert tokens[b, : n + 1].tolist() == ids[b, : n + 1].tolist()


def _trees(seed: int, B: int = 4, N: int = 9, V: int = 40):
    """B small random trees (padded to N nodes), rows of random probabilities, the tree depth."""
    g = _g(seed)
    cand = torch.full((B, N), -1, dtype=torch.int64)
    par = torch.full((B, N), -1, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(2, N + 1, (), generator=g))
        cand[b, :n] = torch.randint(0, V, (n,), generator=g)
        for i in range(1, n):
            par[b, i] = int(torch.randint(0, i, (), generator=g))
    probs = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1)
    # Put mass on the first candidates so that acceptances happen.
    for b in range(B):
        for i in range(1, N):
            if cand[b, i] >= 0 and i % 2:
                probs[b, par[b, i], cand[b, i]] += 1.0
    depth = max(len(ref.speculative.path_to(par[b].tolist(), i)) for b in range(B) for i in range(N) if cand[b, i] >= 0)
    return cand, par, probs / probs.sum(-1, keepdim=True), depth


def tree_speculative_sampling_samples(d):
    cand, par, probs, D = _trees(30)
    return [
        _on(d, cand, par, probs, torch.arange(4) + 7, 0, None, 3, 40, D),
        _on(d, cand, par, probs, None, 5, None, 0, 40, D),
    ]


def tree_speculative_sampling_check(args, out):
    cand, par, probs, seed, seed_val, _, offset, vs = args[:8]
    for b in range(cand.size(0)):
        s = int(seed[b]) if seed is not None else seed_val
        toks, nodes = ref.speculative.tree_speculative_sampling(
            cand[b].tolist(), par[b].tolist(), probs[b, :, :vs], s, offset
        )
        assert out[0][b, : len(toks)].tolist() == toks and out[3][b, : len(nodes)].tolist() == nodes


def typical_acceptance_samples(d):
    cand, par, probs, D = _trees(31)
    eps = torch.tensor([0.09, 0.2, 0.0, 0.5], dtype=torch.float64)
    return [_on(d, cand, par, probs, eps, 0.0, None, 0.3, torch.arange(4), 0, None, 2, 40, D)]


def typical_acceptance_check(args, out):
    cand, par, probs, eps, _, _, delta, seed, _, _, offset, vs = args[:12]
    for b in range(cand.size(0)):
        toks, nodes = ref.speculative.typical_acceptance(
            cand[b].tolist(), par[b].tolist(), probs[b], float(eps[b]), delta, int(seed[b]), offset
        )
        assert out[0][b, : len(toks)].tolist() == toks and out[3][b, : len(nodes)].tolist() == nodes


def greedy_tree_verify_samples(d):
    cand, par, _, D = _trees(32, V=12)
    logits = torch.randint(0, 4, (4, 9, 12), generator=_g(33)).float()
    top = logits.argmax(-1)
    for i in range(1, 9):  # most candidates follow the argmax
        cand[:, i] = torch.where(
            (cand[:, i] >= 0) & (cand[:, i] % 4 != 0), top.gather(1, par[:, i : i + 1].clamp_min(0))[:, 0], cand[:, i]
        )
    return [_on(d, cand, par, logits, 12, D), _on(d, cand, par, top, 12, D)]


def greedy_tree_verify_check(args, out):
    cand, par, target = args[:3]
    logits = target if target.is_floating_point() else torch.nn.functional.one_hot(target, 12).float()
    for b in range(cand.size(0)):
        toks, nodes = ref.speculative.greedy_tree_verify(cand[b].tolist(), par[b].tolist(), logits[b])
        assert out[0][b, : len(toks)].tolist() == toks and out[3][b, : len(nodes)].tolist() == nodes


def private_check_rows_samples(d):
    bad = _probs(seed=29)
    bad[2, 3] = -1.0
    return [_on(d, _probs(seed=24), 300, True), _on(d, bad, 300, True)]


def private_check_rows_check(args, out):
    assert int(out) == (1 if bool((args[0] < 0).any()) else 0)


# ----------------------------------------------------------------- wrappers ----
def _pick(t, val):
    """A per-row parameter as the wrapper takes it: the [B] tensor, else the number."""
    return val if t is None else t


def _w_softmax(a):
    return decodekit.softmax(a[0], _pick(a[1], a[2]), vocab_size=a[3], validate=False)


def _w_sample(a):
    return decodekit.sample_from_logits(
        a[0],
        _pick(a[1], a[2]),
        _pick(a[3], a[4]),
        _pick(a[5], a[6]),
        _pick(a[7], a[8]),
        seed=_pick(a[9], a[10]),
        offset=_pick(a[11], a[12]),
        vocab_size=a[13],
        validate=False,
        return_valid=True,
    )


OPS: List[OpRow] = [
    OpRow("softmax", softmax_samples, softmax_check, batch_args=(0, 1), wrapper=_w_softmax),
    OpRow(
        "argmax",
        argmax_samples,
        argmax_check,
        batch_args=(0,),
        wrapper=lambda a: decodekit.argmax(a[0], vocab_size=a[1], return_valid=True),
    ),
    OpRow(
        "sample_from_logits",
        sample_from_logits_samples,
        sample_from_logits_check,
        batch_args=(0, 1, 3, 5, 7, 9, 11),
        wrapper=_w_sample,
    ),
    OpRow(
        "sample_from_probs",
        sample_from_probs_samples,
        None,
        batch_args=(0, 1, 7),
        wrapper=lambda a: decodekit.sample_from_probs(
            a[0], a[1], a[4], a[6], seed=a[7], offset=a[10], validate=False, return_valid=True
        ),
    ),
    OpRow(
        "filter_probs",
        filter_probs_samples,
        filter_probs_check,
        batch_args=(0, 1, 3),
        wrapper=lambda a: decodekit.filter_probs(a[0], a[1], a[3], a[6], validate=False),
    ),
    OpRow(
        "top_k_mask_logits",
        top_k_mask_logits_samples,
        top_k_mask_logits_check,
        batch_args=(0, 1),
        wrapper=lambda a: decodekit.top_k_mask_logits(a[0], a[1], validate=False),
    ),
    OpRow(
        "apply_penalties",
        apply_penalties_samples,
        apply_penalties_check,
        batch_args=(0, 1, 3, 5, 7, 10, 11),
        wrapper=lambda a: decodekit.apply_penalties(
            a[0], repetition_penalty=a[1], frequency_penalty=a[3], presence_penalty=a[5], token_ids=a[7], validate=False
        ),
    ),
    OpRow("linear", linear_samples, linear_check, batch_args=(0,), wrapper=lambda a: decodekit.linear(*a)),
    OpRow(
        "linear_quantized",
        linear_quantized_samples,
        linear_quantized_check,
        batch_args=(0,),
        wrapper=lambda a: decodekit.linear(a[0], decodekit.QuantizedWeight(a[1], a[2], (a[3], a[4])), a[5]),
    ),
    OpRow(
        "rms_norm",
        rms_norm_samples,
        rms_norm_check,
        batch_args=(0,),
        wrapper=lambda a: decodekit.rms_norm(a[0], a[1], 1e-5),
    ),
    OpRow(
        "silu_and_mul",
        silu_and_mul_samples,
        silu_and_mul_check,
        batch_args=(0,),
        wrapper=lambda a: decodekit.silu_and_mul(a[0]),
    ),
    OpRow(
        "rope_",
        rope_samples,
        rope_check,
        mutates=(0,),
        batch_args=(0, 4),
        wrapper=lambda a: decodekit.rope_(a[0].clone(), a[1], a[2], a[3], a[4], validate=False),
    ),
    OpRow(
        "decoder_layer",
        decoder_layer_samples,
        decoder_layer_check,
        mutates=(0, 1, 2),
        batch_args=(0, 3, 4, 5, 6),
        wrapper=_w_decoder_layer,
    ),
    OpRow(
        "chain_speculative_sampling",
        chain_speculative_sampling_samples,
        None,
        batch_args=(0, 1, 2, 3),
        wrapper=lambda a: decodekit.chain_speculative_sampling(
            a[0], a[1], a[2], seed=a[3], offset=a[6], validate=False
        ),
    ),
    OpRow(
        "paged_attention",
        paged_attention_samples,
        paged_attention_check,
        batch_args=(0, 3, 4, 7),
        wrapper=lambda a: decodekit.paged_attention(
            *a[:5], scale=a[5], kv_layout=a[6], tree_mask=a[7] if len(a) > 7 else None, validate=False
        ),
    ),
    OpRow(
        "append_kv_cache",
        append_kv_cache_samples,
        append_kv_cache_check,
        mutates=(0, 1),
        wrapper=lambda a: decodekit.append_kv_cache(a[0].clone(), a[1].clone(), a[2], a[3], a[4], validate=False),
    ),
    OpRow(
        "append_paged_kv_cache",
        append_paged_kv_cache_samples,
        append_paged_kv_cache_check,
        mutates=(0, 1),
        wrapper=lambda a: decodekit.append_paged_kv_cache(a[0].clone(), a[1].clone(), a[2], a[3], a[4], validate=False),
    ),
    OpRow(
        "compact_kv_cache",
        compact_kv_cache_samples,
        compact_kv_cache_check,
        mutates=(0, 1),
        batch_args=(0, 1, 2, 3),
        wrapper=lambda a: decodekit.compact_kv_cache(a[0].clone(), a[1].clone(), a[2], a[3], validate=False),
    ),
    OpRow(
        "compact_paged_kv_cache",
        compact_paged_kv_cache_samples,
        compact_paged_kv_cache_check,
        mutates=(0, 1),
        wrapper=lambda a: decodekit.compact_paged_kv_cache(
            a[0].clone(), a[1].clone(), a[2], a[3], a[4], kv_layout=a[5], validate=False
        ),
    ),
    # A validation helper (an int result, no Meta kernel): run and checked, not opchecked.
    OpRow("check_probability_rows", check_probability_rows_samples, check_probability_rows_check, opcheck=False),
    OpRow(
        "processed_probs",
        processed_probs_samples,
        processed_probs_check,
        batch_args=(0, 1, 3, 5, 7),
        wrapper=lambda a: decodekit.processed_probs(
            a[0],
            _pick(a[1], a[2]),
            _pick(a[3], a[4]),
            _pick(a[5], a[6]),
            _pick(a[7], a[8]),
            vocab_size=a[9],
            validate=False,
        ),
    ),
    OpRow("greedy_verify", greedy_verify_samples, greedy_verify_check, batch_args=(0, 1)),
    OpRow("_check_probability_rows", private_check_rows_samples, private_check_rows_check),
    OpRow(
        "tree_speculative_sampling",
        tree_speculative_sampling_samples,
        tree_speculative_sampling_check,
        batch_args=(0, 1, 2, 3),
        wrapper=lambda a: decodekit.tree_speculative_sampling(
            a[0],
            a[1],
            a[2],
            seed=a[3] if a[3] is not None else a[4],
            offset=a[6],
            max_depth=a[8],
            vocab_size=a[7],
            validate=False,
        ),
    ),
    OpRow(
        "typical_acceptance",
        typical_acceptance_samples,
        typical_acceptance_check,
        batch_args=(0, 1, 2, 3, 7),
        wrapper=lambda a: decodekit.typical_acceptance(
            a[0], a[1], a[2], a[3], a[6], seed=a[7], offset=a[10], max_depth=a[12], validate=False
        ),
    ),
    OpRow(
        "greedy_tree_verify",
        greedy_tree_verify_samples,
        greedy_tree_verify_check,
        batch_args=(0, 1, 2),
        wrapper=lambda a: (
            decodekit.greedy_tree_verify(a[0], a[1], a[2], max_depth=a[4], validate=False)
            if a[2].is_floating_point()
            else torch.ops.decodekit.greedy_tree_verify(*a)
        ),
    ),
]

BY_NAME = {row.name: row for row in OPS}


def run(row: OpRow, args: tuple):
    """Calls the raw op; for an op that writes in place, returns the written arguments (on
    copies, so ``args`` stay as they were)."""
    if row.mutates:
        args = tuple(a.clone() if i in row.mutates else a for i, a in enumerate(args))
        row.op(*args)
        out = tuple(args[i] for i in row.mutates)
        return out[0] if len(out) == 1 else out
    return row.op(*args)
