"""Evaluates highlight scorers on held-out rooms against the simulator's ground truth.

    python evaluate.py --test DIR... --val DIR... --checkpoints CKPT... --out metrics.json

Methods, all scored the same way: every checkpoint (named by its training --name), a
comment-rate heuristic (comments in the tick over the room's running mean comment count
so far, +1 in the denominator) and an audio-loudness heuristic (rms_dbfs minus the room's
running mean rms so far); both heuristics are causal like the model.

Metrics on the --test rooms:
  - auc: frame-level ROC AUC of the scores against ground-truth highlight ticks, pooled;
  - ndcg10, ap: per room, NDCG@10 and average precision of the ranking of the room's ticks
    (relevance: ground-truth highlight tick), averaged over rooms with a highlight;
  - precision, recall, f1: events from the hysteresis rule (`events`) matched to truth
    intervals at IoU >= 0.5 (greedy by IoU, one-to-one), pooled over rooms, with
    enter/exit/hold/min calibrated globally on the --val rooms for each method
    (maximum event F1 over a grid of score quantiles).
Writes metrics.json and prints a markdown table.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_dirs  # noqa: E402
from model import context, set_threads, windows  # noqa: E402

IOU = 0.5


# ---- the hysteresis rule (the engine implements the same)

def events(scores, enter, exit, hold, min_ticks):
    """Events [(start, end, peak)] of one contiguous run of ticks, as tick indices, end
    exclusive. An event opens at the first tick with score >= enter, stays open while
    scores are >= exit, and closes when `hold` consecutive ticks score < exit: its end is
    the first of those ticks. A run's end closes an open event. Peak: the highest-score
    tick inside (the first on ties). Events shorter than min_ticks ticks are dropped."""
    out = []
    start, below = None, 0

    def close(end):
        if end - start >= min_ticks:
            out.append((start, end, start + int(np.argmax(scores[start:end]))))

    for i, s in enumerate(scores):
        if start is None:
            if s >= enter:
                start, below = i, 0
        elif s >= exit:
            below = 0
        else:
            below += 1
            if below == hold:
                close(i - hold + 1)
                start = None
    if start is not None:
        close(len(scores))
    return out


def room_events(room, scores, th):
    """Events of a room as [(start_ms, end_ms)], per segment (a gap closes an event)."""
    out = []
    for lo, hi in room.segments:
        for s, e, _ in events(scores[lo:hi], th["enter"], th["exit"], th["hold_ticks"], th["min_ticks"]):
            end = room.start_ms[lo + e] if lo + e < hi else room.start_ms[hi - 1] + room.tick_ms
            out.append((int(room.start_ms[lo + s]), int(end)))
    return out


def iou(a, b):
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def match(pred, truth, threshold=IOU):
    """Matched pairs: greedy by IoU, each prediction and truth interval used at most once."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, n = set(), set(), 0
    for v, i, j in pairs:
        if v < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            n += 1
    return n


def event_scores(rooms, scores, th):
    tp = npred = ntrue = 0
    for r, s in zip(rooms, scores):
        pred = room_events(r, s, th)
        tp += match(pred, r.truth)
        npred += len(pred)
        ntrue += len(r.truth)
    p = tp / npred if npred else 0.0
    rc = tp / ntrue if ntrue else 0.0
    f1 = 2 * p * rc / (p + rc) if p + rc else 0.0
    return {"precision": p, "recall": rc, "f1": f1, "events_predicted": npred, "events_true": ntrue, "matched": tp}


def calibrate(rooms, scores):
    """Global enter/exit/hold/min maximising event F1 on these rooms."""
    pooled = np.concatenate(scores)
    best = None
    for qe in (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98):
        enter = float(np.quantile(pooled, qe))
        for dq in (0.0, 0.05, 0.1, 0.2, 0.3):
            exit = min(enter, float(np.quantile(pooled, max(0.0, qe - dq))))
            for hold in (1, 2, 3, 5, 8):
                for min_ticks in (1, 2, 3, 5, 8):
                    th = {"enter": enter, "exit": exit, "hold_ticks": hold, "min_ticks": min_ticks}
                    f1 = event_scores(rooms, scores, th)["f1"]
                    if best is None or f1 > best[0]:
                        best = (f1, th)
    return best[1], best[0]


# ---- ranking metrics (numpy, no sklearn)

def roc_auc(scores, labels):
    """Mann-Whitney AUC with average ranks for ties; nan without both classes."""
    labels = np.asarray(labels, bool)
    npos, nneg = labels.sum(), (~labels).sum()
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[labels].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def ndcg_at(scores, labels, k=10):
    order = np.argsort(-np.asarray(scores), kind="mergesort")[:k]
    gains = np.asarray(labels, float)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (gains[order] * disc[:len(order)]).sum()
    ideal = (np.sort(gains)[::-1][:k] * disc[:min(k, len(gains))]).sum()
    return float(dcg / ideal) if ideal > 0 else float("nan")


def average_precision(scores, labels):
    labels = np.asarray(labels, bool)[np.argsort(-np.asarray(scores), kind="mergesort")]
    if not labels.any():
        return float("nan")
    hits = np.cumsum(labels)
    return float((hits[labels] / (np.flatnonzero(labels) + 1)).mean())


# ---- scorers

def running_mean(a):
    return np.cumsum(a, dtype=np.float64) / np.arange(1, len(a) + 1)


def comment_rate(room):
    c = room.scalar("comments").astype(np.float64)
    return c / (running_mean(c) + 1.0)


def loudness(room):
    rms = room.scalar("rms_dbfs").astype(np.float64)
    return rms - running_mean(rms)


@torch.no_grad()
def model_scores(model, room, chunk=1024):
    """Per-tick scores of a room, segment by segment, in chunks of scored ticks with the
    3(n-1) ticks of context each needs (the same numbers as one pass over the segment)."""
    out = np.zeros(len(room.rows), np.float32)
    ctx = context(model.window)
    mean = room.running_mean
    for lo, hi in room.segments:
        for a in range(lo, hi, chunk):
            c, e = max(lo, a - ctx), min(hi, a + chunk)
            x = torch.from_numpy(room.rows[c:e]).unsqueeze(0)
            m = torch.from_numpy(mean[c:e]).unsqueeze(0)
            logit = model(x, m, torch.ones(1, e - c))["logit"][0]
            out[a:e] = torch.sigmoid(logit[a - c:]).numpy()
    return out


@torch.no_grad()
def mtam_lags(model, rooms):
    """The learned lag bias and the mean MTAM attention per lag (0 = same tick)."""
    n = model.window
    total, count = torch.zeros(n), 0
    for r in rooms:
        for lo, hi in r.segments:
            x = torch.from_numpy(r.rows[lo:hi]).unsqueeze(0)
            v, z = model.encode(x)
            h = v.shape[-1]
            k, _ = model.mtam.project(z)
            w = model.mtam.weights(v.reshape(-1, h), windows(k, n).reshape(-1, n, h),
                                   windows(torch.ones(1, hi - lo), n).reshape(-1, n))
            total += w[n - 1:].sum(0).flip(0)  # positions with a full window; lag order
            count += max(0, hi - lo - n + 1)
    bias = model.mtam.lag_bias.detach().numpy()
    attn = (total / max(1, count)).numpy()
    return {"lag_bias": [round(float(b), 4) for b in bias], "bias_peak_lag": int(np.argmax(bias)),
            "mean_attention_by_lag": [round(float(a), 4) for a in attn], "attention_peak_lag": int(np.argmax(attn))}


def evaluate(method, score_fn, test, val):
    val_scores = [score_fn(r) for r in val]
    th, val_f1 = calibrate(val, val_scores)
    scores = [score_fn(r) for r in test]
    labels = [r.highlight for r in test]
    per_room = [(ndcg_at(s, y), average_precision(s, y)) for s, y in zip(scores, labels) if y.any()]
    result = {"auc": roc_auc(np.concatenate(scores), np.concatenate(labels)),
              "ndcg10": float(np.mean([a for a, _ in per_room])) if per_room else float("nan"),
              "ap": float(np.mean([b for _, b in per_room])) if per_room else float("nan"),
              **event_scores(test, scores, th), "threshold": th, "val_f1": val_f1}
    print(f"evaluate: {method}: auc={result['auc']:.3f} f1={result['f1']:.3f}", file=sys.stderr, flush=True)
    return result


def table(methods):
    lines = ["| method | ROC AUC | NDCG@10 | AP | event P | event R | event F1 | events (pred/true) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        lines.append(f"| {name} | {m['auc']:.3f} | {m['ndcg10']:.3f} | {m['ap']:.3f} | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} | {m['f1']:.3f} | {m['events_predicted']}/{m['events_true']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", nargs="+", required=True)
    ap.add_argument("--val", nargs="+", required=True)
    ap.add_argument("--checkpoints", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    set_threads()
    from train import load_checkpoint

    test, val = load_dirs(args.test), load_dirs(args.val)
    methods, extra = {}, {}
    for path in args.checkpoints:
        model, ck = load_checkpoint(path)
        name = ck["train"]["name"]
        methods[name] = evaluate(name, lambda r, m=model: model_scores(m, r), test, val)
        methods[name]["checkpoint"] = os.path.abspath(path)
        if model.use_mtam:
            extra.setdefault("mtam", {})[name] = mtam_lags(model, test)
    methods["comment-rate"] = evaluate("comment-rate", comment_rate, test, val)
    methods["audio-loudness"] = evaluate("audio-loudness", loudness, test, val)
    out = {"test": [os.path.abspath(d) for d in args.test], "val": [os.path.abspath(d) for d in args.val],
           "test_rooms": len(test), "test_ticks": int(sum(len(r.rows) for r in test)),
           "test_highlight_ticks": int(sum(r.highlight.sum() for r in test)),
           "iou": IOU, "calibration": "global (val rooms)", "methods": methods, **extra,
           "table": table(methods)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(out["table"])


if __name__ == "__main__":
    main()
