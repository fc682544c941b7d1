"""Trains the highlight model on engine data directories.

    python train.py --data DIR [DIR...] --val DIR [DIR...] --out CKPT_DIR \
        [--window 32 --layers 2 --hidden 64 --epochs 20 --seed 0] [--no-mtam] [--pointwise-only]

Each epoch draws random windows from every room segment: a scored stretch of 2n..4n
ticks (one length per batch) preceded by up to 3(n-1) context ticks, so every scored tick
sees exactly the look-back it would online; losses are taken on the scored stretch only.
Loss = impression-weighted BCE on lvtr + border-aware pairwise loss (unless
--pointwise-only) + 0.01 x MTAM alignment loss (unless --no-mtam). The epoch whose
logits order the lvtr labels of the --val rooms best is kept (concordance: the share of
labelled pairs y_i > y_j within a window with s_i > s_j, on fixed windows; a measure the
engine's own data supports, unlike the simulator's ground truth, and the same for every
variant whatever its loss). Writes CKPT_DIR/checkpoint.pt and CKPT_DIR/train.json.
Deterministic for a given --seed and thread count ($HIGHLIGHT_THREADS, default 2).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import feature_stats, load_dirs  # noqa: E402
from model import Highlight, alignment_loss, context, pairwise_loss, pointwise_loss, set_threads  # noqa: E402

ALIGN_WIDTH = 16
ALIGN_WEIGHT = 0.01


def batch(items, ctx):
    """items: (room, lo, hi, a, length): score ticks [a, a+length) of the segment [lo, hi),
    with up to ctx ticks of context before a. Returns tensors padded at the end."""
    parts = []
    for r, lo, hi, a, length in items:
        parts.append((r, max(lo, a - ctx), a, min(a + length, hi)))
    T = max(e - c for _, c, _, e in parts)
    B = len(parts)
    x = np.zeros((B, T, r.rows.shape[1]), np.float32)
    m = np.zeros_like(x)
    y = np.zeros((B, T), np.float32)
    w = np.zeros((B, T), np.float32)
    scored = np.zeros((B, T), np.float32)
    valid = np.zeros((B, T), np.float32)
    for b, (r, c, a, e) in enumerate(parts):
        k = e - c
        x[b, :k] = r.rows[c:e]
        m[b, :k] = r.running_mean[c:e]
        y[b, :k] = r.lvtr[c:e]
        w[b, :k] = r.impressions[c:e]
        scored[b, a - c:k] = 1.0
        valid[b, :k] = 1.0
    mask = scored * (w > 0)
    t = {k: torch.from_numpy(v) for k, v in dict(x=x, m=m, y=y, w=w, mask=mask, valid=valid).items()}
    t["lengths"] = [e - c for _, c, _, e in parts]
    return t


def segments(rooms):
    return [(r, lo, hi) for r in rooms for lo, hi in r.segments]


def epoch_items(segs, n, rng, batch_size):
    """Random windows for one epoch, grouped into batches with one scored length each."""
    items = []
    for r, lo, hi in segs:
        for _ in range(max(1, round((hi - lo) / n))):  # each tick scored ~3 times an epoch
            items.append((r, lo, hi))
    order = rng.permutation(len(items))
    batches = []
    for s in range(0, len(order), batch_size):
        length = int(rng.integers(2 * n, 4 * n + 1))
        group = []
        for i in order[s:s + batch_size]:
            r, lo, hi = items[i]
            a = lo + int(rng.integers(0, max(1, hi - lo - length + 1)))
            group.append((r, lo, hi, a, length))
        batches.append(group)
    return batches


def fixed_items(segs, n):
    """Consecutive scored stretches of 3n ticks covering every segment (validation)."""
    return [(r, lo, hi, a, 3 * n) for r, lo, hi in segs for a in range(lo, hi, 3 * n)]


def concordance(logit, y, mask):
    """Sums over labelled pairs with y_i > y_j within each row: (pairs ranked right, with
    ties as half, number of pairs). The validation score that picks the epoch."""
    dy = y.unsqueeze(2) - y.unsqueeze(1)
    ds = logit.unsqueeze(2) - logit.unsqueeze(1)
    m = mask > 0
    pairs = m.unsqueeze(2) & m.unsqueeze(1) & (dy > 0)
    right = ((ds > 0).float() + 0.5 * (ds == 0).float())[pairs]
    return right.sum().item(), int(pairs.sum())


def losses(model, t, args, generator=None, rng=None):
    out = model(t["x"], t["m"], t["valid"])
    logit = out["logit"]
    point = pointwise_loss(logit, t["y"], t["w"], t["mask"])
    pair = logit.sum() * 0.0 if args.pointwise_only else pairwise_loss(logit, t["y"], t["mask"])
    align = logit.sum() * 0.0
    if model.use_mtam and rng is not None:
        starts = [(b, int(rng.integers(0, k - ALIGN_WIDTH + 1)))
                  for b, k in enumerate(t["lengths"]) if k >= ALIGN_WIDTH]
        align = alignment_loss(out["v"], out["z"], starts, ALIGN_WIDTH, generator)
    return point, pair, align, logit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--val", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--window", type=int, default=32, help="look-back n, in ticks")
    ap.add_argument("--layers", type=int, default=2, help="Perceiver blocks L")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size h (z, p: h; e: 2h)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=0.2, help="on the standardised input rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mtam", action="store_true", help="e_i = [v_i, z_i]: no alignment module or loss")
    ap.add_argument("--pointwise-only", action="store_true", help="drop the pairwise loss")
    ap.add_argument("--name", help="method name in evaluate.py's table (default from the flags)")
    args = ap.parse_args()

    set_threads()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    name = args.name or ("no-mtam" if args.no_mtam else "pointwise-only" if args.pointwise_only else "full")

    train_rooms, val_rooms = load_dirs(args.data), load_dirs(args.val)
    mean, std = feature_stats(train_rooms)
    n = args.window
    model = Highlight(n, args.layers, args.hidden, args.heads, not args.no_mtam, mean, std, args.dropout)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train_segs, val_segs = segments(train_rooms), segments(val_rooms)
    val_batches = [fixed_items(val_segs, n)[i:i + args.batch] for i in range(0, len(fixed_items(val_segs, n)), args.batch)]
    ctx = context(n)
    log = lambda s: print(f"train[{name}]: {s}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{len(train_rooms)} train rooms ({sum(len(r.rows) for r in train_rooms)} ticks), "
        f"{len(val_rooms)} val rooms; {params} parameters")

    best, history = (-math.inf, -1, None), []
    total_steps = args.epochs * len(epoch_items(train_segs, n, np.random.default_rng(0), args.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, total_steps), pct_start=0.1)
    steps = 0
    for epoch in range(args.epochs):
        t0 = time.time()
        model.train()
        sums = np.zeros(3)
        batches = epoch_items(train_segs, n, rng, args.batch)
        for group in batches:
            t = batch(group, ctx)
            point, pair, align, _ = losses(model, t, args, generator, rng)
            loss = point + pair + ALIGN_WEIGHT * align
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if steps < total_steps:
                sched.step()
            steps += 1
            sums += [point.item(), pair.item(), align.item()]
        model.eval()
        vsum, vcount, right, pairs = np.zeros(2), 0, 0.0, 0
        with torch.no_grad():
            for group in val_batches:
                t = batch(group, ctx)
                point, pair, _, logit = losses(model, t, args)
                vsum += [point.item(), pair.item()]
                vcount += 1
                r, k = concordance(logit, t["y"], t["mask"])
                right, pairs = right + r, pairs + k
        vsum /= max(1, vcount)
        val_conc = right / max(1, pairs)
        row = {"epoch": epoch, "train_point": sums[0] / len(batches), "train_pair": sums[1] / len(batches),
               "train_align": sums[2] / len(batches), "val_point": vsum[0], "val_pair": vsum[1],
               "val_concordance": val_conc, "seconds": round(time.time() - t0, 1)}
        history.append(row)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if val_conc > best[0]:
            best = (val_conc, epoch, {k: v.clone() for k, v in model.state_dict().items()})

    os.makedirs(args.out, exist_ok=True)
    info = {"name": name, "data": [os.path.abspath(d) for d in args.data], "val": [os.path.abspath(d) for d in args.val],
            "train_rooms": len(train_rooms), "train_ticks": int(sum(len(r.rows) for r in train_rooms)),
            "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay, "dropout": args.dropout,
            "seed": args.seed, "pointwise_only": args.pointwise_only, "best_epoch": best[1],
            "best_val_concordance": best[0], "parameters": params, "history": history}
    torch.save({"config": model.config(), "state_dict": best[2], "train": info},
               os.path.join(args.out, "checkpoint.pt"))
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"best epoch {best[1]} (val concordance {best[0]:.4f}) -> {args.out}/checkpoint.pt")


def load_checkpoint(path):
    """(model in eval mode, checkpoint dict) from a checkpoint.pt or its directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    c = ck["config"]
    model = Highlight(c["window"], c["layers"], c["hidden"], c["heads"], c["mtam"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck


if __name__ == "__main__":
    main()
