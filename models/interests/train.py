"""Trains, evaluates and exports the compressed-interest model.

    train.py DATA_ROOT OUT [--epochs N] [--seed S] [--max-len L]

DATA_ROOT holds day-D.jsonl files from `onair sequences` (scripts/interests
data). Days are split in order: the last is test, the one before validation,
the rest training. The task: after each behaviour of a user's day, rank the
owner (streamer or author) of the user's next behaviour among every owner
row; metrics are HR@10 and MRR over all such positions of the test day.
Models trained in the same run: the full model (k = 4 interests), k = 1, and
no attention (the mean of the values); baselines: popularity (training days'
owner frequency) and the user's own history (owners the user had by
frequency, then popularity). Writes OUT/metrics.json and, for the full model,
OUT/interests.json (the engine's file, with reference outputs) and
OUT/model.pt (the state dict).

Not for: the model's definition (model.py) or the data (the engine writes it).
"""

import argparse
import json
import math
import pathlib
import random

import torch
import torch.nn.functional as F

from model import DENSE, Interests, bucket, save_json

BUCKETS = 512


def load_day(path, max_len):
    users = []
    with open(path) as f:
        for line in f:
            u = json.loads(line)
            bs = u["behaviours"][-max_len:]
            if len(bs) >= 2:
                users.append({
                    "user": u["user"],
                    "dense": [b["dense"] for b in bs],
                    "owners": [b["owner"] for b in bs],
                    "buckets": [bucket(b["owner"], BUCKETS) for b in bs],
                })
    return users


def batches(users, size, shuffle, rng):
    order = list(range(len(users)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        group = [users[j] for j in order[i:i + size]]
        n = max(len(u["buckets"]) for u in group)
        x = torch.zeros(len(group), n, DENSE)
        b = torch.zeros(len(group), n, dtype=torch.long)
        m = torch.zeros(len(group), n, dtype=torch.bool)
        for r, u in enumerate(group):
            L = len(u["buckets"])
            x[r, :L] = torch.tensor(u["dense"])
            b[r, :L] = torch.tensor(u["buckets"])
            m[r, :L] = True
        yield group, x, b, m


def ranks(scores, target):
    """1-based rank of each target among the scores (ties count against it)."""
    t = scores.gather(-1, target.unsqueeze(-1))
    return (scores >= t).sum(-1)


def metrics_of(rank_list):
    r = torch.cat(rank_list).double()
    return {
        "positions": int(r.numel()),
        "hr@10": float((r <= 10).double().mean()),
        "mrr": float((1.0 / r).mean()),
    }


def evaluate_model(model, users):
    model.eval()
    out = []
    with torch.no_grad():
        for _, x, b, m in batches(users, 64, False, None):
            s = model.scores(model.prefix(x, b, m))[:, :-1]
            valid = m[:, 1:] & m[:, :-1]
            out.append(ranks(s, b[:, 1:])[valid])
    return metrics_of(out)


def evaluate_baselines(train_users, users):
    pop = torch.zeros(BUCKETS, dtype=torch.float64)
    for u in train_users:
        for b in u["buckets"]:
            pop[b] += 1
    pop = pop / pop.sum()
    pop_ranks, hist_ranks = [], []
    for u in users:
        seen = torch.zeros(BUCKETS, dtype=torch.float64)
        for i in range(len(u["buckets"]) - 1):
            seen[u["buckets"][i]] += 1
            t = torch.tensor([u["buckets"][i + 1]])
            pop_ranks.append(ranks(pop.unsqueeze(0), t))
            hist_ranks.append(ranks((seen + pop).unsqueeze(0), t))
    return metrics_of(pop_ranks), metrics_of(hist_ranks)


def train_one(name, train_users, val_users, epochs, seed, **kw):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Interests(buckets=BUCKETS, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    best, best_state, history = -1.0, None, []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for _, x, b, m in batches(train_users, 32, True, rng):
            s = model.scores(model.prefix(x, b, m))[:, :-1]
            valid = m[:, 1:] & m[:, :-1]
            loss = F.cross_entropy(s[valid], b[:, 1:][valid])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(valid.sum())
            count += int(valid.sum())
        val = evaluate_model(model, val_users)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), **val})
        print(f"{name} epoch {epoch}: loss {total / max(count, 1):.4f} val mrr {val['mrr']:.4f} "
              f"hr@10 {val['hr@10']:.4f}", flush=True)
        if val["mrr"] > best:
            best = val["mrr"]
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, history


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--version", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("INTERESTS_THREADS", "2")))
    days = sorted(pathlib.Path(a.data).glob("day-*.jsonl"),
                  key=lambda p: int(p.stem.split("-")[1]))
    if len(days) < 3:
        raise SystemExit(f"{a.data}: need at least 3 day-D.jsonl files, found {len(days)}")
    train_days, val_day, test_day = days[:-2], days[-2], days[-1]
    train_users = [u for d in train_days for u in load_day(d, a.max_len)]
    val_users = load_day(val_day, a.max_len)
    test_users = load_day(test_day, a.max_len)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {
        "full (k=4)": dict(k=4),
        "k=1": dict(k=1),
        "no attention (mean)": dict(k=1, attention=False),
    }
    results, trained = {}, {}
    for name, kw in variants.items():
        model, history = train_one(name, train_users, val_users, a.epochs, a.seed, **kw)
        trained[name] = model
        results[name] = {"test": evaluate_model(model, test_users), "history": history}
    pop, hist = evaluate_baselines(train_users, test_users)
    results["popularity"] = {"test": pop}
    results["own history (frequency, then popularity)"] = {"test": hist}
    full = trained["full (k=4)"]
    rng = random.Random(a.seed)
    picks = rng.sample(test_users, 3)
    checks = [full.check(u["dense"][:n], u["owners"][:n]) for u, n in zip(picks, (1, 7, 60))]
    save_json(out / "interests.json", full.export(a.version, checks))
    torch.save(full.state_dict(), out / "model.pt")
    summary = {
        "data": {
            "train_days": [p.name for p in train_days],
            "val_day": val_day.name,
            "test_day": test_day.name,
            "users": {"train": len(train_users), "val": len(val_users), "test": len(test_users)},
            "behaviours": {
                "train": sum(len(u["buckets"]) for u in train_users),
                "test": sum(len(u["buckets"]) for u in test_users),
            },
            "owners": len({o for u in train_users + test_users for o in u["owners"]}),
            "buckets": BUCKETS,
        },
        "args": vars(a),
        "results": results,
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    for name, r in results.items():
        t = r["test"]
        print(f"{name:45s} hr@10 {t['hr@10']:.4f}  mrr {t['mrr']:.4f}  ({t['positions']} positions)")


if __name__ == "__main__":
    main()
