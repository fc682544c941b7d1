"""Trains MMBee (or an ablation) on a data root, split by day.

    python train.py --root DATA_ROOT --out CKPT_DIR [--history 0-1 --train 2 --val 3]
        [--no-mfq] [--no-gie] [--d 64 --queries 4 --seq-len 32 --exp-len 16 --epochs 8 ...]

Days default to data.default_splits (the last day is test and never read here). The
graph is DATA_ROOT/graph/<highest version> (or --graph); it must come from the history
days only (data.check_graph). Every pair of the --train days is a sample; its live
gifting history is every gift of any day before its t_ms. The model is trained end to end
(MFQ and ranker together) with BCE, AdamW and a one-cycle schedule; each batch drops a
share --id-dropout of its candidate streamers to the unknown index 0, so index 0 and the
graph path learn to serve streamers the vocabulary has not seen. The epoch with the best
validation AUC is kept. Writes CKPT_DIR/checkpoint.pt and CKPT_DIR/train.json.
Deterministic for a given --seed and thread count ($MMBEE_THREADS, default 1).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import (CONTEXT, DEFAULT_CONTEXT, Features, History, Vocab, check_clock, check_graph,  # noqa: E402
                  day_dirs, default_splits, feature_stats, load_day, load_gifts, load_graph, parse_days)
from evaluate import gauc, roc_auc  # noqa: E402
from model import MMBee, set_threads, to_tensors  # noqa: E402


def splits(args, root):
    """(history, train, val, test) day indices from the flags and the root's days."""
    days = day_dirs(root)
    h, tr, va, te = default_splits(days)
    h = parse_days(args.history) if args.history else h
    tr = parse_days(args.train) if args.train else tr
    va = parse_days(args.val) if args.val else va
    te = parse_days(getattr(args, "test", None)) if getattr(args, "test", None) else te
    for d in h + tr + va + te:
        if d not in days:
            raise SystemExit(f"no {root}/day-{d}")
    return days, h, tr, va, te


def all_gifts(days):
    """Every gift of every day directory (History keeps only those before each t_ms),
    after checking that the days follow each other in time (data.check_clock)."""
    by_day = {d: load_gifts(p) for d, p in days.items()}
    check_clock(by_day)
    return [g for gs in by_day.values() for g in gs]


def predict(model, feats, batch=512):
    """Logits [P] of every pair of feats (eval mode, no grad)."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(feats), batch):
            idx = np.arange(s, min(len(feats), s + batch))
            out.append(model(to_tensors(feats.batch(idx))).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def drop_ids(b, rng, p):
    """Sets a share p of the batch's candidate streamers to the unknown index 0, in both
    MFQ and ranker, and in the sequences (for the model without GIE)."""
    if p <= 0:
        return b
    ids = np.unique(b["streamer_index"])
    gone = ids[rng.random(len(ids)) < p]
    for k in ("streamer_index", "mfq_streamer_index", "seq_index", "exp_index"):
        b[k] = np.where(np.isin(b[k], gone), 0, b[k])
    return b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="DATA_ROOT with day-<d>/{mmbee-content,mmbee,mmbee-gifts}/ and graph/<version>/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--graph", help="graph version directory (default: the root's highest)")
    ap.add_argument("--history", help="history days, e.g. 0-1 (default: data.default_splits)")
    ap.add_argument("--train", help="training days, e.g. 2")
    ap.add_argument("--val", help="validation days")
    ap.add_argument("--no-mfq", action="store_true", help="no content tokens")
    ap.add_argument("--no-gie", action="store_true",
                    help="id embeddings instead of graph embeddings; no expanded sequence, no user embedding")
    ap.add_argument("--name", help="method name in the metrics table (default from the flags)")
    ap.add_argument("--d", type=int, default=64, help="model width d")
    ap.add_argument("--queries", type=int, default=4, help="MFQ query tokens N")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32, help="live gifting sequence length L")
    ap.add_argument("--exp-len", type=int, default=16, help="GIE expanded sequence length K")
    ap.add_argument("--context", default=",".join(DEFAULT_CONTEXT),
                    help=f"context features, comma separated, from: {', '.join(CONTEXT)}")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--id-dropout", type=float, default=0.1, help="share of candidate streamers set to unknown per batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    set_threads()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    name = args.name or {(False, False): "full", (True, False): "no-mfq", (False, True): "no-gie",
                         (True, True): "base"}[(args.no_mfq, args.no_gie)]
    log = lambda s: print(f"train[{name}]: {s}", file=sys.stderr, flush=True)  # noqa: E731
    context = [c for c in args.context.split(",") if c]
    unknown = [c for c in context if c not in CONTEXT]
    if unknown:
        ap.error(f"unknown context features {unknown}")

    t0 = time.time()
    days, h, tr, va, _ = splits(args, args.root)
    graph = load_graph(args.graph or args.root)
    train_days = [load_day(days[d], d) for d in tr]
    val_days = [load_day(days[d], d) for d in va]
    check_graph(graph, [p for d in train_days for p in d.pairs], h)
    history = History(all_gifts(days))
    vocab = Vocab(sorted({p["streamer_id"] for d in train_days for p in d.pairs}))
    train = Features(train_days, graph, vocab, history, args.seq_len, args.exp_len, context)
    val = Features(val_days, graph, vocab, history, args.seq_len, args.exp_len, context)
    stats = feature_stats(train)
    model = MMBee(args.d, args.queries, graph.dim, len(vocab), len(context), args.seq_len, args.exp_len, args.heads,
                  not args.no_mfq, not args.no_gie, stats, args.dropout)
    params = sum(p.numel() for p in model.parameters())
    log(f"days history {h} train {tr} val {va}; graph {graph.path} (G {graph.dim}); {len(train)} train pairs "
        f"({train.a['label'].mean():.3f} positive), {len(val)} val pairs; vocab {len(vocab) - 1}; "
        f"{params} parameters; data {time.time() - t0:.1f} s")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = (len(train) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, args.epochs * per_epoch),
                                                pct_start=0.15)
    best, history_rows = (-1.0, -1, None), []
    for epoch in range(args.epochs):
        t1 = time.time()
        model.train()
        order = rng.permutation(len(train))
        total = 0.0
        for s in range(0, len(order), args.batch):
            b = to_tensors(drop_ids(train.batch(order[s:s + args.batch]), rng, args.id_dropout))
            loss = F.binary_cross_entropy_with_logits(model(b), b["label"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(b["label"])
        logit = predict(model, val)
        y = val.a["label"]
        p = 1 / (1 + np.exp(-logit))
        val_loss = float(-np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1))))
        row = {"epoch": epoch, "train_loss": total / len(train), "val_loss": val_loss,
               "val_auc": roc_auc(logit, y), "val_gauc": gauc(logit, y, val.users_arr),
               "seconds": round(time.time() - t1, 1)}
        history_rows.append(row)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if row["val_auc"] > best[0]:
            best = (row["val_auc"], epoch, {k: v.clone() for k, v in model.state_dict().items()})

    os.makedirs(args.out, exist_ok=True)
    info = {"name": name, "root": os.path.abspath(args.root), "graph": os.path.abspath(graph.path),
            "graph_version": graph.version, "graph_meta": graph.meta,
            "days": {"history": h, "train": tr, "val": va},
            "train_pairs": len(train), "train_positive_rate": float(train.a["label"].mean()),
            "val_pairs": len(val), "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
            "weight_decay": args.weight_decay, "dropout": args.dropout, "id_dropout": args.id_dropout,
            "seed": args.seed, "best_epoch": best[1], "best_val_auc": best[0], "parameters": params,
            "seconds": round(time.time() - t0, 1), "history": history_rows}
    torch.save({"config": model.config(), "state_dict": best[2], "vocab": vocab.ids, "context": context,
                "train": info}, os.path.join(args.out, "checkpoint.pt"))
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"best epoch {best[1]} (val AUC {best[0]:.4f}) -> {args.out}/checkpoint.pt ({info['seconds']} s)")


def load_checkpoint(path):
    """(model in eval mode, checkpoint dict) from a checkpoint.pt or its directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = MMBee(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck


if __name__ == "__main__":
    main()
