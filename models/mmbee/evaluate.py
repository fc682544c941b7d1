"""Evaluates MMBee checkpoints and the popularity baseline on the test day(s).

    python evaluate.py --root DATA_ROOT --checkpoints CKPT... --out metrics.json [--test 4] [--history 0-1]

Methods: every checkpoint (named by its training --name); `popularity`, which trains
nothing: the streamer's gift rate per pair in the history days' pairs (the rate over
all history pairs for a streamer without any), ties broken by the user's number of gifts
in the history days; and, where the simulator's truth.jsonl is there, `truth-oracle`:
affinity x gift_level of the (room, user), which knows the hidden world and no
excitement (a reference for the headroom, not a method).

Metrics on the test pairs:
  - auc: ROC AUC over all pairs (ties: average ranks);
  - uauc: the mean over users having both classes of the per-user AUC;
  - gauc: the per-user AUC averaged with weights = the user's number of samples, over the
    same users;
  - logloss: mean binary cross-entropy of the probabilities (clipped to [1e-7, 1 - 1e-7];
    popularity's probability is the streamer rate; the oracle has none);
  - positive_rate (the labels') and mean_probability.
Writes metrics.json and prints a markdown table.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# ---- metrics (numpy)

def roc_auc(scores, labels):
    """Mann-Whitney AUC with average ranks for ties; nan without both classes."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average rank (1-based) of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    for a, b in zip(starts, ends):
        ranks[a:b] = (a + b - 1) / 2 + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[labels].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def user_aucs(scores, labels, users):
    """{user: (auc, samples)} for users having both classes."""
    scores, labels, users = np.asarray(scores), np.asarray(labels), np.asarray(users)
    order = np.argsort(users, kind="mergesort")
    u = users[order]
    bounds = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1, len(u)]
    out = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = order[a:b]
        y = labels[idx] > 0
        if y.any() and not y.all():
            out[u[a]] = (roc_auc(scores[idx], y), b - a)
    return out


def uauc(scores, labels, users):
    per = user_aucs(scores, labels, users)
    return float(np.mean([a for a, _ in per.values()])) if per else float("nan")


def gauc(scores, labels, users):
    per = user_aucs(scores, labels, users)
    if not per:
        return float("nan")
    a = np.array([v for v, _ in per.values()])
    w = np.array([n for _, n in per.values()], np.float64)
    return float((a * w).sum() / w.sum())


def logloss(prob, labels):
    p = np.clip(np.asarray(prob, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def metrics(scores, labels, users, prob=None):
    per = user_aucs(scores, labels, users)
    return {"auc": roc_auc(scores, labels), "uauc": uauc(scores, labels, users), "gauc": gauc(scores, labels, users),
            "logloss": logloss(prob, labels) if prob is not None else None,
            "positive_rate": float(np.mean(labels)),
            "mean_probability": float(np.mean(prob)) if prob is not None else None,
            "pairs": int(len(labels)), "users": int(len(set(users))), "users_both_classes": len(per)}


# ---- baselines

def popularity(history_days, pairs):
    """(scores, probabilities) of the popularity baseline for these pairs (dicts)."""
    n, pos, user_gifts = {}, {}, {}
    for d in history_days:
        for p in d.pairs:
            n[p["streamer_id"]] = n.get(p["streamer_id"], 0) + 1
            pos[p["streamer_id"]] = pos.get(p["streamer_id"], 0) + int(p["label"])
        for g in d.gifts:
            user_gifts[g["user_id"]] = user_gifts.get(g["user_id"], 0) + 1
    overall = sum(pos.values()) / max(1, sum(n.values()))
    rate = np.array([pos[p["streamer_id"]] / n[p["streamer_id"]] if p["streamer_id"] in n else overall
                     for p in pairs])
    count = np.array([user_gifts.get(p["user_id"], 0) for p in pairs], np.float64)
    # Lexicographic (rate, then count) as one score: the dense rank of the pair of keys.
    keys = np.lexsort((count, rate))
    score = np.empty(len(pairs))
    rank, prev = 0, None
    for i in keys:
        k = (rate[i], count[i])
        if k != prev:
            rank, prev = rank + 1, k
        score[i] = rank
    return score, rate


def oracle(test_days, pairs):
    """affinity x gift_level from the simulator's truth (None without truth)."""
    from data import load_truth
    _, viewers = load_truth(test_days)
    if not viewers:
        return None
    return np.array([viewers[(p["room_id"], p["user_id"])]["affinity"] * viewers[(p["room_id"], p["user_id"])]["gift_level"]
                     if (p["room_id"], p["user_id"]) in viewers else 0.0 for p in pairs])


def signals(f):
    """AUC and UAUC of single raw inputs on these features (what each says by itself, and
    within users: see README.md, "Within-user ranking")."""
    a = f.a
    cols = {n: a["context"][:, i] for i, n in enumerate(f.context_names)}
    m = a["seq_mask"]
    cols["seq_gifts"] = m.sum(1)
    cols["seq_same_streamer"] = (a["seq_feats"][:, :, 2] * m).sum(1)
    cols["seq_recency"] = np.where(m[:, 0] > 0, -a["seq_feats"][:, 0, 1], -100.0)
    cols["exp_entries"] = a["exp_mask"].sum(1)
    y, u = a["label"], f.users_arr
    return {n: {"auc": roc_auc(x, y), "uauc": uauc(x, y, u)} for n, x in cols.items()}


def table(methods):
    lines = ["| method | AUC | UAUC | GAUC | log-loss | mean p | positive rate |", "|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name, m in methods.items():
        lines.append(f"| {name} | {f(m['auc'])} | {f(m['uauc'])} | {f(m['gauc'])} | {f(m['logloss'])} | "
                     f"{f(m['mean_probability'])} | {m['positive_rate']:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--checkpoints", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("--history", help="history days (default: the first checkpoint's, else data.default_splits)")
    ap.add_argument("--test", help="test days (default: the last day)")
    ap.add_argument("--graph", help="graph version directory (default: each checkpoint's)")
    args = ap.parse_args()

    from data import Features, History, Vocab, day_dirs, default_splits, load_day, load_graph, parse_days
    from model import set_threads
    from train import all_gifts, load_checkpoint, predict

    set_threads()
    days = day_dirs(args.root)
    h, _, _, te = default_splits(days)
    cks = [load_checkpoint(p) for p in args.checkpoints]
    if args.history:
        h = parse_days(args.history)
    elif cks:
        h = cks[0][1]["train"]["days"]["history"]
    te = parse_days(args.test) if args.test else te
    test_days = [load_day(days[d], d) for d in te]
    history_days = [load_day(days[d], d, with_content=False) for d in h]
    pairs = [p for d in test_days for p in d.pairs]
    labels = np.array([p["label"] for p in pairs], np.float64)
    users = np.array([p["user_id"] for p in pairs])
    history = History(all_gifts(days))
    log = lambda s: print(f"evaluate: {s}", file=sys.stderr, flush=True)  # noqa: E731

    methods, built = {}, {}
    for path, (model, ck) in zip(args.checkpoints, cks):
        name = ck["train"]["name"]
        graph_path = args.graph or ck["train"]["graph"]
        c = ck["config"]
        key = (graph_path, tuple(ck["vocab"]), c["seq_len"], c["exp_len"], tuple(ck["context"]))
        if key not in built:
            built[key] = Features(test_days, load_graph(graph_path), Vocab(ck["vocab"]), history,
                                  c["seq_len"], c["exp_len"], ck["context"])
        logit = predict(model, built[key]).astype(np.float64)
        prob = 1 / (1 + np.exp(-logit))
        methods[name] = {**metrics(logit, labels, users, prob), "checkpoint": os.path.abspath(path),
                         "best_epoch": ck["train"]["best_epoch"], "parameters": ck["train"]["parameters"]}
        log(f"{name}: auc={methods[name]['auc']:.4f} gauc={methods[name]['gauc']:.4f}")
    extra = {"signals": signals(next(iter(built.values())))} if built else {}
    score, rate = popularity(history_days, pairs)
    methods["popularity"] = metrics(score, labels, users, rate)
    log(f"popularity: auc={methods['popularity']['auc']:.4f} gauc={methods['popularity']['gauc']:.4f}")
    o = oracle(test_days, pairs)
    if o is not None:
        methods["truth-oracle"] = metrics(o, labels, users)
    out = {"root": os.path.abspath(args.root), "days": {"history": h, "test": te},
           "test_pairs": len(pairs), "test_positive_rate": float(labels.mean()) if len(labels) else None,
           "test_users": int(len(set(users))), "methods": methods, **extra, "table": table(methods)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(out["table"])


if __name__ == "__main__":
    main()
