#!/usr/bin/env python3
"""Train Medusa-1 heads for SmolLM2-135M-Instruct on the self-distilled chat set of
``scripts/make_chat_data.py`` (the backbone is frozen; its hidden states are read from the cache).

Heads (settled choices, :mod:`decodekit.models.medusa`): head ``i`` is ``h + SiLU(W_i h + b_i)``
on the final-normed hidden state ``h``, ``W_i`` and ``b_i`` start at zero (so every head starts
as the target's own LM head), followed by the target's tied LM head restricted to a reduced
vocabulary (``--vocab`` tokens: the most frequent in the answers, then in the prompts). Head ``i``
predicts token ``t + 2 + i`` from the state at ``t``; its loss weight is ``0.8 ** i`` (Medusa-1);
positions whose label is outside the reduced vocabulary or past the answer's end do not count.

Held-out report: ``--heldout-frac`` of the sequences are never trained on; on them, per head, the
top-1 and top-5 agreement with the target's greedy tokens (teacher-forced: the true prefix), over
all labelled positions (a label outside the reduced vocabulary counts as a miss). They are
printed and stored in the file's metadata.

Cost on the 2-core reference CPU: ``--minutes`` bounds the training (default 20).

Usage::

    python scripts/train_medusa.py --data build/chat-data \\
        --out python/decodekit/models/data/smollm2-135m-medusa.safetensors
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from decodekit.models import load_model
from decodekit.models.draft import embedding_checksum
from decodekit.models.medusa import MEDUSA_FORMAT, _target_embed


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def labels_for(seqs, seq_index, pos, num_heads, remap):
    """``[N, K]`` reduced-vocabulary labels (-1 = none) of head ``i`` at every cached state, and the
    full-vocabulary labels (-1 past the end) for the agreement report."""
    full = torch.full((seq_index.numel(), num_heads), -1, dtype=torch.int64)
    tokens = [torch.tensor(s["prompt_ids"] + s["answer_ids"], dtype=torch.int64) for s in seqs]
    si, pt = seq_index.tolist(), pos.tolist()
    for n, (s, t) in enumerate(zip(si, pt)):
        toks = tokens[s]
        for i in range(num_heads):
            j = t + 2 + i
            if j < toks.numel():
                full[n, i] = toks[j]
    reduced = torch.where(full >= 0, remap[full.clamp(min=0)], torch.full_like(full, -1))
    return reduced, full


def head_logits(h, W, b, E):
    """h [n, H], W [K, H, H], b [K, H], E [N, H] -> [n, K, N]."""
    a = torch.einsum("nh,koh->nko", h, W) + b
    return (h[:, None, :] + F.silu(a)) @ E.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["build/chat-data"], help="make_chat_data.py output dirs")
    ap.add_argument("--out", default="build/smollm2-135m-medusa.safetensors")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heldout-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    from safetensors.torch import load_file, save_file

    seqs, hidden, seq_index, pos = [], [], [], []
    for d in args.data:  # several runs of make_chat_data.py (different --seed) are concatenated
        data = Path(d)
        cached = load_file(str(data / "hidden.safetensors"))
        hidden.append(cached["hidden"])
        seq_index.append(cached["seq_index"].long() + len(seqs))
        pos.append(cached["pos"].long())
        seqs += json.loads((data / "sequences.json").read_text())["sequences"]
    hidden, seq_index, pos = torch.cat(hidden), torch.cat(seq_index), torch.cat(pos)
    log(f"{len(seqs)} sequences, {hidden.shape[0]} cached states")

    lm = load_model()
    net = lm.model
    E_full = _target_embed(net).float()
    V, H = E_full.shape

    # reduced vocabulary: answer tokens first, then prompt tokens
    counts = Counter()
    for s in seqs:
        counts.update({t: 1000 for t in s["answer_ids"]})
        counts.update(s["prompt_ids"])
    vocab = [t for t, _ in counts.most_common(args.vocab)]
    token_ids = torch.tensor(sorted(vocab), dtype=torch.int64)
    remap = torch.full((V,), -1, dtype=torch.int64)
    remap[token_ids] = torch.arange(token_ids.numel())
    E = E_full[token_ids].contiguous()
    log(f"reduced vocabulary: {token_ids.numel()} tokens")

    K = args.heads
    y, y_full = labels_for(seqs, seq_index, pos, K, remap)
    rng = random.Random(args.seed)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    held = set(order[: max(1, int(len(seqs) * args.heldout_frac))])
    is_held = torch.tensor([s in held for s in seq_index.tolist()])
    tr = (~is_held).nonzero()[:, 0]
    te = is_held.nonzero()[:, 0]
    log(f"train states {tr.numel()}, held-out states {te.numel()} ({len(held)} sequences)")

    W = torch.zeros(K, H, H, requires_grad=True)
    b = torch.zeros(K, H, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=args.lr, weight_decay=0.0)
    weights = torch.tensor([0.8**i for i in range(K)])
    steps_per_epoch = -(-tr.numel() // args.batch)
    total = steps_per_epoch * args.max_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.05)
    t0, step = time.time(), 0
    done = False
    for epoch in range(args.max_epochs):
        perm = tr[torch.randperm(tr.numel())]
        run_loss = 0.0
        for i in range(0, perm.numel(), args.batch):
            idx = perm[i : i + args.batch]
            h = hidden[idx].float()
            lg = head_logits(h, W, b, E)  # [n, K, N]
            lab = y[idx]
            loss = 0.0
            for k in range(K):
                valid = lab[:, k] >= 0
                if valid.any():
                    loss = loss + weights[k] * F.cross_entropy(lg[valid, k], lab[valid, k])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach())
            if step % 50 == 0:
                log(f"epoch {epoch} step {step}/{total} loss {run_loss / 50:.3f}")
                run_loss = 0.0
            if time.time() - t0 > args.minutes * 60:
                done = True
                break
        if done:
            break
    train_s = time.time() - t0
    log(f"trained {step} steps in {train_s:.0f} s")

    # held-out teacher-forced agreement with the target's greedy tokens
    top1 = torch.zeros(K)
    top5 = torch.zeros(K)
    count = torch.zeros(K)
    with torch.no_grad():
        for i in range(0, te.numel(), 1024):
            idx = te[i : i + 1024]
            lg = head_logits(hidden[idx].float(), W, b, E)
            best = token_ids[lg.topk(5, dim=-1).indices]  # [n, K, 5] full ids
            lab = y_full[idx]
            for k in range(K):
                valid = lab[:, k] >= 0
                count[k] += valid.sum()
                top1[k] += (best[valid, k, 0] == lab[valid, k]).sum()
                top5[k] += (best[valid, k] == lab[valid, k, None]).any(-1).sum()
    a1 = (top1 / count.clamp(min=1)).tolist()
    a5 = (top5 / count.clamp(min=1)).tolist()
    for k in range(K):
        log(f"head {k}: held-out top-1 {a1[k]:.3f}, top-5 {a5[k]:.3f} ({int(count[k])} positions)")

    meta = {
        "format": MEDUSA_FORMAT,
        "num_heads": str(K),
        "target_vocab_size": str(V),
        "target_hidden_size": str(H),
        "target_embed_checksum": embedding_checksum(E_full),
        "training_data": f"scripts/make_chat_data.py: {len(seqs)} self-distilled chat answers",
        "training_states": str(tr.numel()),
        "training_steps": str(step),
        "training_seconds": f"{train_s:.0f}",
        "heldout_top1": ",".join(f"{x:.3f}" for x in a1),
        "heldout_top5": ",".join(f"{x:.3f}" for x in a5),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "weight": W.detach().half().contiguous(),
            "bias": b.detach().half().contiguous(),
            "token_ids": token_ids.to(torch.int32),
        },
        args.out,
        metadata=meta,
    )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
