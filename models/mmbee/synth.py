"""A synthetic MMBee data root in the engine's format, for the tests and smoke runs.

Not the simulator: a small stand-in with the structure the model should find, written as
the engine writes it (see README.md, "Data"):

    DATA_ROOT/day-<d>/{mmbee-content,mmbee,mmbee-gifts}/{layout.json, samples.f32, samples.jsonl}
    DATA_ROOT/day-<d>/truth.jsonl
    DATA_ROOT/graph/<version>/{graph.json, nodes.tsv, embeddings.f32, neighbors.jsonl}

The world (the same every day): streamers of 5 genres, one room each; users with a
gifting level (most near 0, 4 % whales at 0.6..1.0) and a preferred genre; a user's
affinity to a streamer is raised when the genres match (as in src/simulator/world.rs).
Each day: every room broadcasts for --seconds with an excitement curve (a slow random walk
around the streamer's level plus 1-3 highlights of 20-60 s at ~0.9); users watch sessions
in rooms (never two at once), chosen by affinity; while present a user gifts with a
per-second probability 0.02 (0.1 + affinity) (0.03 + 2 gift_level) (0.2 + 3 ex^2)
(times 1 + momentum exp(-s since the session's last gift / 60) with --momentum; default
0, like the engine's simulator). The
content rows show the excitement: frame embeddings shift along a fixed random direction,
comments turn toward a "hype" direction (both plus noise), transcripts likewise.

Pairs, at the engine's prediction times: when a user enters a room (trigger 0), at every
20 s segment boundary for each user present (trigger 1) and right after each of the
user's gifts (trigger 2); label 1.0 when the user gifts in that room within
(t, t + horizon]. The pair row's session counters and `followed` count what happened
in the session at or before t, the triggering action included, as the engine counts them
(src/operators/gift_labels.rs): a trigger 2 pair counts its own gift, a trigger 0 pair is
all zeros (a followed (user, streamer) follows ~90 s after entering). The live history
(mmbee-gifts, read by data.History) stays strictly before t. The content row of a pair is
the room's latest segment ending at or before t (-1: none yet). A share --replay of every task's samples is appended a second time with
the same id, as an engine restart replays them; truth.jsonl has tick and utterance lines
the loader must skip.

The graph version directory is built from the --history first days' gifts only:
user-streamer weights (ln(1 + summed value), as the engine's graph job), Swing similarity between streamers, metapath
expansion user -> streamer -> similar streamer, and embeddings from a truncated SVD of
the log1p weight matrix. graph.json marks it "synthetic fixture": the engine's graph job
(GraphCL) makes the real ones.

    python synth.py DATA_ROOT [--days 6 --history 2 --streamers 20 --users 600 --seed 0] [--momentum 0]
        [--replay 0.01]
"""

import argparse
import json
import math
import os
import shutil

import numpy as np

FRAME, TEXT = 1280, 384
FRAMES, COMMENTS, TRANSCRIPTS = 3, 8, 2
WIDTH = FRAMES * FRAME + COMMENTS * TEXT + TRANSCRIPTS * TEXT  # 7680
GENRES = 5
T0 = 1_760_000_000_000
DAY_MS = 86_400_000
SEGMENT_MS = 20_000
GIFTS = [1, 5, 10, 52, 100, 520, 1314]


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class World:
    """Streamers, users, affinities and the feature directions; fixed for every day."""

    def __init__(self, seed, streamers, users):
        rng = np.random.default_rng(seed)
        self.streamers = [f"streamer-{i:04d}" for i in range(streamers)]
        self.rooms = [f"room-{i:04d}" for i in range(streamers)]
        self.users = [f"user-{i:06d}" for i in range(users)]
        self.s_genre = rng.integers(0, GENRES, streamers)
        self.s_level = rng.uniform(0.2, 0.45, streamers)  # the streamer's usual excitement
        self.s_speech = rng.random(streamers) < 0.7
        self.u_genre = rng.integers(0, GENRES, users)
        whale = rng.random(users) < 0.04
        u = rng.random(users)
        self.gift_level = np.where(whale, 0.6 + 0.4 * u, 0.25 * u ** 3)
        self.activity = rng.uniform(0.5, 3.0, users)  # sessions a day
        base = np.where(rng.random((users, streamers)) < 0.08, 0.7 + 0.3 * rng.random((users, streamers)),
                        0.6 * rng.random((users, streamers)) ** 2)
        match = self.u_genre[:, None] == self.s_genre[None, :]
        self.affinity = np.where(match, np.minimum(1.0, 0.15 + 1.5 * base), 0.6 * base)
        self.followed = rng.random((users, streamers)) < 0.5 * self.affinity
        # Feature directions. Frames: non-negative like pooled ReLU features.
        self.excite_dir = np.abs(rng.normal(0, 1, FRAME)) * (rng.random(FRAME) < 0.2)
        genre_img = np.abs(rng.normal(0, 1, (GENRES, FRAME))) * (rng.random((GENRES, FRAME)) < 0.2)
        own_img = np.abs(rng.normal(0, 0.7, (streamers, FRAME))) * (rng.random((streamers, FRAME)) < 0.2)
        self.s_img = genre_img[self.s_genre] + own_img
        self.hype = unit(rng.normal(0, 1, TEXT))
        genre_topic = unit(rng.normal(0, 1, (GENRES, TEXT)))
        self.s_topic = unit(genre_topic[self.s_genre] + 0.7 * unit(rng.normal(0, 1, (streamers, TEXT))))
        self.s_speech_topic = unit(rng.normal(0, 1, (streamers, TEXT)))
        self.speech_hype = unit(rng.normal(0, 1, TEXT))


def excitement(rng, level, seconds):
    """Per-second excitement in [0, 1]: a slow random walk around `level` plus highlights."""
    ex = np.empty(seconds)
    a = 0.0
    for t in range(seconds):
        a = 0.98 * a + rng.normal(0, 0.025)
        ex[t] = level + a
    for _ in range(int(rng.integers(1, 4))):
        length = int(rng.integers(20, 61))
        s = int(rng.integers(0, max(1, seconds - length)))
        for t in range(max(0, s - 5), min(seconds, s + length + 10)):
            if t < s:
                w = (t - (s - 5)) / 5
            elif t < s + length:
                w = 1.0
            else:
                w = 1.0 - (t - (s + length) + 1) / 11
            ex[t] = max(ex[t], (1 - w) * ex[t] + w * (0.9 + rng.normal(0, 0.02)))
    return np.clip(ex, 0.0, 1.0)


def sessions(rng, w, seconds):
    """[(user, streamer, enter_s, leave_s)], no user in two rooms at once."""
    out = []
    pick = (0.05 + w.affinity) ** 2
    pick /= pick.sum(1, keepdims=True)
    for u in range(len(w.users)):
        k = rng.poisson(w.activity[u])
        starts = np.sort(rng.uniform(0, seconds - 10, k))
        free = 0.0
        for s0 in starts:
            s = rng.choice(len(w.streamers), p=pick[u])
            enter = max(s0, free)
            length = 20 + rng.exponential(150) * (0.5 + w.affinity[u, s])
            leave = min(seconds, enter + length)
            if leave - enter < 5:
                continue
            out.append((u, int(s), float(enter), float(leave)))
            free = leave + 1.0
    return out


def content_row(rng, w, s, ex, lo, seconds):
    """One content row [WIDTH] and its counts for the segment [lo, lo + 20 s) of streamer s."""
    row = np.zeros(WIDTH, np.float32)
    seg = ex[lo:min(seconds, lo + SEGMENT_MS // 1000)]
    u = rng.random()
    frames = 3 if u > 0.08 else (0 if u < 0.03 else int(rng.integers(1, 3)))
    for f in range(frames):
        e = seg[min(len(seg) - 1, int((f + 0.5) * len(seg) / FRAMES))]
        img = w.s_img[s] + 1.5 * e * w.excite_dir + rng.normal(0, 0.3, FRAME)
        row[f * FRAME:(f + 1) * FRAME] = np.maximum(img, 0.0)
    lagged = ex[max(0, lo - 3):max(1, lo - 3 + len(seg))].mean()  # chat trails the picture
    total = int(rng.poisson(1.0 + 8.0 * lagged))
    stored = min(total, COMMENTS)
    if stored:
        hype = rng.random(stored) < np.clip((lagged - 0.3) / 0.6, 0, 1) * 0.8 + 0.05
        dirs = np.where(hype[:, None], w.hype, w.s_topic[s])
        c = unit(dirs + rng.normal(0, 1, (stored, TEXT)) / math.sqrt(TEXT) * 4.0)
        base = FRAMES * FRAME
        row[base:base + stored * TEXT] = c.reshape(-1)
    trans = int(rng.choice([0, 1, 2], p=[0.3, 0.4, 0.3])) if w.s_speech[s] else 0
    if trans:
        t = unit(w.s_speech_topic[s] + seg.mean() * w.speech_hype + rng.normal(0, 1, (trans, TEXT)) / math.sqrt(TEXT))
        base = FRAMES * FRAME + COMMENTS * TEXT
        row[base:base + trans * TEXT] = t.reshape(-1)
    return row, {"frames": frames, "comment_tokens": stored, "comments": total, "transcript_tokens": trans}


def simulate_day(rng, w, day, seconds, horizon_s, momentum=0.0):
    """(content rows, content lines, pair rows, pair lines, gifts, truth) of one day, the
    lines as the engine's sample sink writes them (without `row`, which write_task sets).
    momentum > 0 raises a user's gift probability after a gift in the same session by a
    factor 1 + momentum exp(-seconds since / 60) (gifting streaks; the engine's simulator
    has none)."""
    t_day = T0 + day * DAY_MS
    ex = [excitement(rng, w.s_level[s], seconds) for s in range(len(w.streamers))]
    rows, content = [], []
    for s in range(len(w.streamers)):
        for lo in range(0, seconds - SEGMENT_MS // 1000 + 1, SEGMENT_MS // 1000):
            r, counts = content_row(rng, w, s, ex[s], lo, seconds)
            start = t_day + lo * 1000
            content.append(sink_line(f"mmbee-content:{w.rooms[s]}:{start}", "mmbee-content", "mmbee-content-v1",
                                     w.rooms[s], "", w.streamers[s], start, SEGMENT_MS, 0, counts,
                                     ("synth-image/1", "synth-text/1")))
            rows.append(r)
    gifts, pairs, pair_rows = [], [], []
    for u, s, enter, leave in sessions(rng, w, seconds):
        aff, gl = w.affinity[u, s], w.gift_level[u]
        sec = np.arange(math.ceil(enter), math.floor(leave))
        e = ex[s][sec]
        p_gift = 0.02 * (0.1 + aff) * (0.03 + 2.0 * gl) * (0.2 + 3.0 * e * e)
        p_like = 0.04 * (0.4 + aff) * (0.3 + 2.0 * e)
        p_comment = 0.01 * (0.3 + aff)
        enter_ms, leave_ms = t_day + int(enter * 1000), t_day + int(leave * 1000)
        g_ms = []  # (t_ms, value)
        last = -1e9
        for t, pg in zip(sec, p_gift):
            if rng.random() < pg * (1.0 + momentum * math.exp(-(t - last) / 60.0)):
                last = t
                x = rng.random()
                tier = min(len(GIFTS) - 1, int(x * x * (3.0 + 4.0 * gl)))
                combo = int(rng.integers(1, 6)) if tier <= 1 else 1
                tt = t_day + int(t * 1000) + int(rng.integers(0, 1000))
                for _ in range(combo):
                    if tt >= leave_ms:
                        break
                    g_ms.append((tt, GIFTS[tier]))
                    tt += int(rng.integers(250, 450))
        likes = np.cumsum(rng.random(len(sec)) < p_like)  # a like / comment of second x is at x s
        comments = np.cumsum(rng.random(len(sec)) < p_comment)
        follow_ms = enter_ms + int(rng.exponential(90_000)) if w.followed[u, s] else None
        for tt, v in g_ms:
            gifts.append({"user_id": w.users[u], "room_id": w.rooms[s], "streamer_id": w.streamers[s],
                          "t_ms": tt, "value": v})
        g_t = np.array([g for g, _ in g_ms], np.int64)
        g_v = np.array([v for _, v in g_ms], np.int64)
        # Prediction times: the viewer entered (0), the room's segment changed (1), the viewer
        # sent a gift (2); each at the event's time, after it.
        times = [(enter_ms, 0)]
        first = (enter_ms - t_day) // SEGMENT_MS + 1
        times += [(t_day + k * SEGMENT_MS, 1) for k in range(first, (leave_ms - t_day - 1) // SEGMENT_MS + 1)]
        times += [(int(t), 2) for t in sorted(set(g_t.tolist()))]
        for t_ms, trigger in times:
            upto = g_t <= t_ms  # the session's gifts at or before t: a trigger 2 pair counts its own
            after = (g_t > t_ms) & (g_t <= t_ms + horizon_s * 1000)
            k = int(np.searchsorted(t_day + sec * 1000, t_ms, side="right"))  # actions at or before t
            seg = (t_ms - t_day) // SEGMENT_MS * SEGMENT_MS - SEGMENT_MS  # latest segment ending <= t
            label = float(after.any())
            pairs.append(sink_line(f"mmbee:{w.rooms[s]}:{w.users[u]}:{t_ms}:{trigger}", "mmbee", "mmbee-pair-v1",
                                   w.rooms[s], w.users[u], w.streamers[s], t_ms, 0, label,
                                   {"gift_value": int(g_v[after].sum()), "horizon_ms": horizon_s * 1000,
                                    "content_start_ms": t_day + seg if seg >= 0 else -1, "trigger": trigger}))
            if trigger == 0:  # the session just started: nothing counted yet
                pair_rows.append([0, 0, 0, 0, 0, 0.0])
                continue
            pair_rows.append([t_ms - enter_ms, int(likes[k - 1]) if k else 0, int(comments[k - 1]) if k else 0,
                              int(upto.sum()), int(g_v[upto].sum()),
                              float(follow_ms is not None and follow_ms <= t_ms)])
    gifts.sort(key=lambda g: g["t_ms"])
    truth = [{"type": "streamer", "streamer_id": w.streamers[s], "genre": int(w.s_genre[s])}
             for s in range(len(w.streamers))]
    seen = sorted({(w.rooms.index(p["room_id"]), w.users.index(p["user_id"])) for p in pairs})
    for s, u in seen:
        truth.append({"type": "viewer", "room_id": w.rooms[s], "user_id": w.users[u],
                      "affinity": float(w.affinity[u, s]), "gift_level": float(w.gift_level[u]),
                      "genre": int(w.u_genre[u])})
    for s in range(len(w.streamers)):  # other line types the loader must skip
        truth += [{"type": "tick", "room_id": w.rooms[s], "t_ms": t_day + x * 1000, "excitement": float(ex[s][x])}
                  for x in range(0, seconds, 60)]
        truth.append({"type": "utterance", "room_id": w.rooms[s], "t_ms": t_day, "text": "the streamer says hi"})
    return (np.stack(rows), content, np.array(pair_rows, np.float32).reshape(-1, 6), pairs,
            [gift_line(n, g) for n, g in enumerate(gifts)], truth)


def sink_line(sid, task, layout, room, user, streamer, t_ms, tick_ms, label, values, models=("", "")):
    """A line as the engine's training-sample file sink writes it (src/sinks/samples.rs),
    `row` set by write_task; `values` are added where the line has no such key."""
    line = {"id": sid, "task": task, "room_id": room, "user_id": user, "streamer_id": streamer,
            "tick_start_ms": t_ms, "tick_ms": tick_ms, "impressions": 0, "long_views": 0, "lvtr": label,
            "label": label, "long_view_ms": 0, "feature_layout": layout, "row": None,
            "image_model": models[0], "text_model": models[1]}
    for k, v in sorted(values.items()):
        line.setdefault(k, v)
    return line


def gift_line(n, g):
    return sink_line(f"gift:{g['room_id']}:{g['user_id']}:{g['t_ms']}:{n}", "mmbee-gifts", "gift-v1", g["room_id"],
                     g["user_id"], g["streamer_id"], g["t_ms"], 0, g["value"], {"t_ms": g["t_ms"], "value": g["value"]})


def write_task(out, layout, lines, rows, rng, replay=0.0):
    """Writes one task directory as the sink does: layout.json, samples.f32 (row i of
    `rows` for lines[i]), samples.jsonl. A share `replay` of the samples is appended again
    at the end (same id, a new row: what an engine restart replays)."""
    os.makedirs(out)
    with open(os.path.join(out, "layout.json"), "w") as f:
        f.write(json.dumps({"feature_layout": layout, "width": rows.shape[1]}) + "\n")
    again = np.flatnonzero(rng.random(len(lines)) < replay) if replay > 0 else np.zeros(0, np.int64)
    order = np.concatenate([np.arange(len(lines)), again]).astype(np.int64)
    rows[order].astype("<f4").tofile(os.path.join(out, "samples.f32"))
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        for r, i in enumerate(order):
            f.write(json.dumps({**lines[i], "row": r}) + "\n")


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


# ---- the graph fixture (the engine's graph job writes the real one)

def swing(gifted, alpha=1.0):
    """Swing similarity between streamers from {user: {streamer: weight}}:
    sim(i, j) = sum over user pairs (u, v), u != v, who both gifted i and j, of
    w_u w_v / (alpha + |I_u & I_v|), with w_u = 1 / sqrt(|I_u|)."""
    items = {u: set(s) for u, s in gifted.items()}
    by_item = {}
    for u, ss in items.items():
        for s in ss:
            by_item.setdefault(s, set()).add(u)
    wu = {u: 1.0 / math.sqrt(len(ss)) for u, ss in items.items()}
    sim = {}
    names = sorted(by_item)
    for a, i in enumerate(names):
        for j in names[a + 1:]:
            common = sorted(by_item[i] & by_item[j])
            total = 0.0
            for x, u in enumerate(common):
                for v in common[x + 1:]:
                    total += 2 * wu[u] * wu[v] / (alpha + len(items[u] & items[v]))
            if total > 0:
                sim.setdefault(i, {})[j] = total
                sim.setdefault(j, {})[i] = total
    return sim


def top_by_score(items, top):
    """[[id, score], ...]: the `top` highest scores, ties by id."""
    return [[k, v] for k, v in sorted(items, key=lambda x: (-x[1], x[0]))[:top]]


LISTS = {"gifted": 32, "expanded": 16, "similar": 16, "gifters": 32}  # src/graph/tables.rs defaults


def build_graph(out, gifts, dim=32, version=1, days=(), seed=0):
    """Writes a graph version directory from these gifts (the history days' only), laid out
    as src/graph/tables.rs writes it: edge weight ln(1 + summed value), users first, then
    streamers (each in a shuffled order here: readers must follow nodes.tsv)."""
    value = {}
    for g in gifts:
        key = (g["user_id"], g["streamer_id"])
        value[key] = value.get(key, 0) + int(g["value"])
    gifted, gifters = {}, {}
    for (u, s), v in value.items():
        gifted.setdefault(u, {})[s] = math.log1p(v)
        gifters.setdefault(s, {})[u] = math.log1p(v)
    sim = swing(gifted)
    rng = np.random.default_rng(seed)
    streamers, users = sorted(gifters), sorted(gifted)
    nodes = [("u", u) for u in rng.permutation(users).tolist()] + [("s", s) for s in rng.permutation(streamers).tolist()]
    row = {n: i for i, n in enumerate(nodes)}
    m = np.zeros((len(users), len(streamers)))
    ui, si = {u: i for i, u in enumerate(users)}, {s: i for i, s in enumerate(streamers)}
    for u, ss in gifted.items():
        for s, wgt in ss.items():
            m[ui[u], si[s]] = wgt
    uu, sv, vt = np.linalg.svd(m, full_matrices=False)
    k = min(dim, len(sv))
    emb = np.zeros((len(nodes), dim), np.float32)
    ue, se = uu[:, :k] * np.sqrt(sv[:k]), vt[:k].T * np.sqrt(sv[:k])
    for u in users:
        emb[row[("u", u)], :k] = ue[ui[u]]
    for s in streamers:
        emb[row[("s", s)], :k] = se[si[s]]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
    os.makedirs(out, exist_ok=True)
    emb.astype("<f4").tofile(os.path.join(out, "embeddings.f32"))
    with open(os.path.join(out, "nodes.tsv"), "w") as f:
        for kind, i in nodes:
            nb = gifted[i] if kind == "u" else gifters[i]
            f.write(f"{kind}\t{i}\t{len(nb)}\t{sum(nb.values())}\n")
    lines = []
    for kind, i in nodes:
        if kind == "u":
            mine = dict(top_by_score(gifted[i].items(), LISTS["gifted"]))
            total = sum(mine.values())
            exp = {}
            for s, wgt in mine.items():
                for s2, sc in sim.get(s, {}).items():
                    if s2 not in gifted[i]:
                        exp[s2] = exp.get(s2, 0.0) + wgt / total * sc
            lines.append({"id": i, "kind": "u", "gifted": top_by_score(mine.items(), LISTS["gifted"]),
                          "expanded": top_by_score(((s, round(v, 6)) for s, v in exp.items()), LISTS["expanded"])})
        else:
            lines.append({"id": i, "kind": "s",
                          "similar": top_by_score(((s, round(v, 6)) for s, v in sim.get(i, {}).items()),
                                                  LISTS["similar"]),
                          "gifters": top_by_score(gifters[i].items(), LISTS["gifters"])})
    write_jsonl(os.path.join(out, "neighbors.jsonl"), lines)
    meta = {"format": "onair-graph-v1", "version": version, "dim": dim, "users": len(users),
            "streamers": len(streamers), "edges": len(value), "gifts": len(gifts),
            "events_through_ms": max((g["t_ms"] for g in gifts), default=0), "lists": LISTS,
            "built_from": list(days),
            "method": "synthetic fixture (models/mmbee/synth.py): truncated SVD of the user-streamer "
                      "matrix of edge weights ln(1 + value), rows L2-normalised; not GraphCL",
            "similarity": "swing (alpha 1, user weight 1/sqrt(degree))",
            "expansion": "user -> gifted streamer (weight share) -> swing-similar streamer not gifted, scores summed"}
    with open(os.path.join(out, "graph.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def write_root(root, days=6, history=2, streamers=20, users=600, seconds=600, horizon=30,
               seed=0, dim=32, momentum=0.0, replay=0.01):
    """Writes the whole data root; returns a summary."""
    w = World(seed, streamers, users)
    summary, history_gifts = {"days": []}, []
    for d in range(days):
        rng = np.random.default_rng([seed, d])
        rows, content, pair_rows, pairs, gifts, truth = simulate_day(rng, w, d, seconds, horizon, momentum)
        out = os.path.join(root, f"day-{d}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out)
        order = rng.permutation(len(pairs))  # the engine promises no order
        write_task(os.path.join(out, "mmbee-content"), "mmbee-content-v1", content, rows, rng, replay)
        write_task(os.path.join(out, "mmbee"), "mmbee-pair-v1", [pairs[i] for i in order], pair_rows[order], rng,
                   replay)
        write_task(os.path.join(out, "mmbee-gifts"), "gift-v1", gifts,
                   np.array([[g["value"]] for g in gifts], np.float32).reshape(-1, 1), rng, replay)
        write_jsonl(os.path.join(out, "truth.jsonl"), truth)
        if d < history:
            history_gifts += [{k: g[k] for k in ("user_id", "room_id", "streamer_id", "t_ms", "value")} for g in gifts]
        summary["days"].append({"day": d, "pairs": len(pairs), "positive": int(sum(p["label"] for p in pairs)),
                                "gifts": len(gifts), "content_rows": len(rows)})
    graph_root = os.path.join(root, "graph")
    if os.path.isdir(graph_root):
        shutil.rmtree(graph_root)
    summary["graph"] = build_graph(os.path.join(graph_root, "1"), history_gifts, dim=dim,
                                   days=[f"day-{d}" for d in range(history)], seed=seed)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--days", type=int, default=6)
    ap.add_argument("--history", type=int, default=2, help="the first days, whose gifts build the graph")
    ap.add_argument("--streamers", type=int, default=20)
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--seconds", type=int, default=600, help="broadcast length each day")
    ap.add_argument("--horizon", type=int, default=30, help="label horizon, seconds")
    ap.add_argument("--dim", type=int, default=32, help="graph embedding size G")
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="gift probability x (1 + momentum exp(-s since the session's last gift / 60)); 0: none")
    ap.add_argument("--replay", type=float, default=0.01,
                    help="share of samples appended twice (same id, as after an engine restart)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = write_root(a.root, a.days, a.history, a.streamers, a.users, a.seconds, a.horizon, a.seed, a.dim,
                   a.momentum, a.replay)
    print(json.dumps(s["days"]))


if __name__ == "__main__":
    main()
