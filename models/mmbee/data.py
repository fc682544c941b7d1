"""The engine's MMBee data root, as numpy arrays the model reads.

    DATA_ROOT/day-<d>/mmbee-content/  layout.json, samples.f32, samples.jsonl: content rows
    DATA_ROOT/day-<d>/mmbee/          layout.json, samples.f32, samples.jsonl: (viewer, room) pairs
    DATA_ROOT/day-<d>/mmbee-gifts/    layout.json, samples.f32, samples.jsonl: every gift
    DATA_ROOT/day-<d>/truth.jsonl     the simulator's truth (evaluation only)
    DATA_ROOT/graph/<version>/        graph.json, nodes.tsv, embeddings.f32, neighbors.jsonl

Each task directory is the engine's training-sample file sink (src/sinks/samples.rs): a
line per sample pointing at its float32 row (`row`); a sample replayed after a restart is
appended again with the same `id`, and the last line per id is kept (`latest_per_id`).
README.md, "Data", gives every field. Splits are by day. A sample's live gifting history
is every gift of any loaded day with t_ms strictly before the sample's t_ms (`History`);
the days must follow each other on one clock (`check_clock`). The graph comes from the
history days only, and `check_graph` refuses one whose graph.json says otherwise.

`Features.build` turns pairs into fixed-size arrays (sequence slots, expanded slots,
context features, content row indices). Graph embeddings stay in one table and are
gathered per batch (`Features.batch`), so L x G floats are never stored per pair.
"""

import bisect
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np

FRAME, TEXT = 1280, 384
FRAMES, COMMENTS, TRANSCRIPTS = 3, 8, 2
WIDTH = FRAMES * FRAME + COMMENTS * TEXT + TRANSCRIPTS * TEXT  # 7680
LAYOUT = "mmbee-content-v1"
# The three task directories of a day: (directory, feature_layout, width).
CONTENT_TASK = ("mmbee-content", LAYOUT, WIDTH)
PAIR_TASK = ("mmbee", "mmbee-pair-v1", 6)
GIFT_TASK = ("mmbee-gifts", "gift-v1", 1)
# The pair row's columns (samples.f32 of day-<d>/mmbee/), in order.
PAIR_COLUMNS = ["present_ms", "session_likes", "session_comments", "session_gifts", "session_gift_value", "followed"]
TRIGGERS = {0: "enter", 1: "content", 2: "gift"}
COLS = {"frames": (0, FRAMES * FRAME), "comments": (FRAMES * FRAME, FRAMES * FRAME + COMMENTS * TEXT),
        "transcripts": (FRAMES * FRAME + COMMENTS * TEXT, WIDTH)}
HOUR_MS = 3_600_000

# Context features: name -> definition (the text goes into mmbee.json verbatim). Any
# subset, in any order, can be chosen with train.py --context; DEFAULT_CONTEXT is C = 8.
CONTEXT = {
    "log_present_s": "log1p(present_ms / 1000): seconds since the user entered the room",
    "log_session_likes": "log1p(session_likes): the user's likes in this room since entering, at or before t "
                         "(the session counters include the action that triggered the prediction)",
    "log_session_comments": "log1p(session_comments)",
    "log_session_gifts": "log1p(session_gifts): gift actions in this room since entering, at or before t "
                         "(a trigger 2 pair counts its own gift)",
    "log_session_gift_value": "log1p(session_gift_value)",
    "followed": "1.0 if the user followed the streamer at or before t in this session (the engine knows no "
                "older follows), else 0.0",
    "user_known": "1.0 if the user has a row in the graph (nodes.tsv), else 0.0",
    "streamer_known": "1.0 if the candidate streamer has a row in the graph, else 0.0",
    "log_user_gifts": "log1p(number of the user's gifts in the live history, all of it, before t_ms)",
    "log_content_comments": "log1p(comments) of the content row used (0 without one)",
    "trigger_content": "1.0 if the prediction was made because the room's content segment changed (trigger 1)",
    "trigger_gift": "1.0 if the prediction was made right after the viewer's own gift (trigger 2; that gift, "
                    "at t, is in the session counters, at or before t, but not in the live history, strictly "
                    "before t)",
}
DEFAULT_CONTEXT = ["log_present_s", "log_session_likes", "log_session_comments", "log_session_gifts",
                   "log_session_gift_value", "followed", "user_known", "streamer_known"]
SEQ_FEATURES = ["log1p(value)", "log1p(age_hours)", "same_streamer"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def day_dirs(root):
    """{day index: path} of DATA_ROOT/day-<d> directories."""
    out = {}
    for name in os.listdir(root):
        m = re.fullmatch(r"day-(\d+)", name)
        if m and os.path.isdir(os.path.join(root, name)):
            out[int(m.group(1))] = os.path.join(root, name)
    return dict(sorted(out.items()))


def default_splits(days):
    """Day indices (history, train, val, test) for n days: the last is test, the one before
    val, and of the rest the first ceil((n-2)/2) history and the others train."""
    days = sorted(days)
    n = len(days)
    if n < 4:
        raise ValueError(f"need at least 4 days (history, train, val, test), have {n}")
    h = (n - 1) // 2
    return days[:h], days[h:n - 2], [days[n - 2]], [days[n - 1]]


def parse_days(spec):
    """'0-2,5' or ['0', '1'] -> [0, 1, 2, 5]."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        spec = ",".join(spec)
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


@dataclass
class Day:
    index: int
    path: str
    content: np.ndarray  # [R, WIDTH] float32, row i of content_meta
    content_meta: list  # content lines (start_ms, end_ms added), one per kept content sample
    content_at: dict  # (room_id, start_ms) -> index into content / content_meta
    pairs: list  # pair lines with t_ms, content_start_ms (None: none) and PAIR_COLUMNS
    gifts: list  # {user_id, room_id, streamer_id, t_ms, value}
    truth: list  # truth.jsonl's streamer and viewer lines


def latest_per_id(lines):
    """The last line per `id`, where its last copy stands (lines without an id are kept)."""
    last = {}
    for i, line in enumerate(lines):
        if line.get("id") is not None:
            last[line["id"]] = i
    return [line for i, line in enumerate(lines) if line.get("id") is None or last[line["id"]] == i]


def read_task(day_path, task, rows=True):
    """(lines, rows) of one task directory of a day: the kept lines (latest_per_id) and,
    with rows, their float32 rows [len(lines), width] in the same order (None without)."""
    name, layout, width = task
    d = os.path.join(day_path, name)
    layout_path = os.path.join(d, "layout.json")
    with open(layout_path) as f:
        have = json.load(f)
    if have.get("feature_layout") != layout or have.get("width") != width:
        raise ValueError(f"{layout_path}: {have}, this model reads {layout!r} of width {width}")
    lines = latest_per_id(read_jsonl(os.path.join(d, "samples.jsonl")))
    if not rows:
        return lines, None
    path = os.path.join(d, "samples.f32")
    size = os.path.getsize(path) // 4
    if size % width:
        raise ValueError(f"{path}: {size} floats is not a whole number of rows of {width}")
    idx = np.array([int(line["row"]) for line in lines], np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= size // width):
        raise ValueError(f"{path}: {size // width} rows, a line points at row {int(idx.max())}")
    if not len(idx):
        return lines, np.zeros((0, width), np.float32)
    table = np.memmap(path, dtype="<f4", mode="r", shape=(size // width, width))
    return lines, np.asarray(table[idx], dtype=np.float32)


def load_gifts(day_path):
    """[{user_id, room_id, streamer_id, t_ms, value}] of day-<d>/mmbee-gifts/."""
    lines, _ = read_task(day_path, GIFT_TASK, rows=False)
    return [{"user_id": g["user_id"], "room_id": g.get("room_id", ""), "streamer_id": g["streamer_id"],
             "t_ms": int(g.get("t_ms", g.get("tick_start_ms"))), "value": int(g["value"])} for g in lines]


def load_day(path, index=None, with_content=True):
    meta, content = read_task(path, CONTENT_TASK, rows=with_content)
    if content is None:
        content = np.zeros((0, WIDTH), np.float32)
    for m in meta:
        m["start_ms"] = int(m["tick_start_ms"])
        m["end_ms"] = m["start_ms"] + int(m["tick_ms"])
    lines, rows = read_task(path, PAIR_TASK)
    pairs = []
    for line, row in zip(lines, rows):
        p = dict(line)
        p["t_ms"] = int(line["tick_start_ms"])
        cs = int(line.get("content_start_ms", -1))
        p["content_start_ms"] = cs if cs >= 0 else None
        p["label"] = int(float(line["label"]) > 0.5)
        for name, v in zip(PAIR_COLUMNS, row):
            p[name] = float(v)
        p["followed"] = p["followed"] > 0.5
        pairs.append(p)
    truth_path = os.path.join(path, "truth.jsonl")
    truth = []
    if os.path.exists(truth_path):
        with open(truth_path) as f:  # highlight, utterance and tick lines are skipped unparsed
            truth = [json.loads(line) for line in f
                     if '"streamer"' in line or '"viewer"' in line]
        truth = [t for t in truth if t.get("type") in ("streamer", "viewer")]
    return Day(index=index, path=path, content=content, content_meta=meta,
               content_at={(m["room_id"], m["start_ms"]): i for i, m in enumerate(meta)},
               pairs=pairs, gifts=load_gifts(path), truth=truth)


def check_clock(gifts_by_day):
    """Refuses days whose gift times overlap ({day: gifts}, in day order): the live history
    (`History`, strictly before t_ms) and check_graph assume the days follow each other on
    one clock, as the engine's demo days run one after the other do."""
    prev = None
    for d, gifts in sorted(gifts_by_day.items()):
        if not gifts:
            continue
        lo, hi = min(g["t_ms"] for g in gifts), max(g["t_ms"] for g in gifts)
        if prev is not None and lo <= prev[1]:
            raise ValueError(f"day-{d}'s first gift ({lo}) is not after day-{prev[0]}'s last ({prev[1]}): the days "
                             "overlap in time (were they simulated faster than real time?)")
        prev = (d, hi)


# ---- the graph

@dataclass
class Graph:
    path: str
    meta: dict
    dim: int
    version: int
    emb: np.ndarray  # [nodes + 1, G]: the last row is zeros (index -1: not in the graph)
    users: dict  # user_id -> row
    streamers: dict  # streamer_id -> row
    gifted: dict  # user_id -> [(streamer_id, weight)]
    expanded: dict  # user_id -> [(streamer_id, score)]
    similar: dict  # streamer_id -> [(streamer_id, swing)]

    def user_row(self, u):
        return self.users.get(u, -1)

    def streamer_row(self, s):
        return self.streamers.get(s, -1)


def graph_dir(root_or_dir):
    """A graph version directory: the argument itself if it has graph.json, else the highest
    numbered version under DATA_ROOT/graph/."""
    if os.path.exists(os.path.join(root_or_dir, "graph.json")):
        return root_or_dir
    base = os.path.join(root_or_dir, "graph")
    versions = [int(v) for v in os.listdir(base) if v.isdigit()] if os.path.isdir(base) else []
    if not versions:
        raise FileNotFoundError(f"no graph/<version>/ under {root_or_dir}")
    return os.path.join(base, str(max(versions)))


def load_graph(path):
    path = graph_dir(path)
    with open(os.path.join(path, "graph.json")) as f:
        meta = json.load(f)
    if meta.get("format") != "onair-graph-v1":
        raise ValueError(f"{path}/graph.json: format {meta.get('format')!r}, want onair-graph-v1")
    dim = int(meta["dim"])
    users, streamers = {}, {}
    with open(os.path.join(path, "nodes.tsv")) as f:
        for i, line in enumerate(f):
            kind, node = line.rstrip("\n").split("\t")[:2]
            (users if kind == "u" else streamers)[node] = i
    n = len(users) + len(streamers)
    emb = np.fromfile(os.path.join(path, "embeddings.f32"), dtype="<f4")
    if emb.size != n * dim:
        raise ValueError(f"{path}: embeddings.f32 has {emb.size} floats, want {n} nodes x {dim}")
    emb = np.concatenate([emb.reshape(n, dim), np.zeros((1, dim), np.float32)])
    gifted, expanded, similar = {}, {}, {}
    nb = os.path.join(path, "neighbors.jsonl")
    for line in read_jsonl(nb) if os.path.exists(nb) else []:
        if line["kind"] == "u":
            gifted[line["id"]] = [(s, float(w)) for s, w in line.get("gifted", [])]
            expanded[line["id"]] = [(s, float(w)) for s, w in line.get("expanded", [])]
        else:
            similar[line["id"]] = [(s, float(w)) for s, w in line.get("similar", [])]
    return Graph(path=path, meta=meta, dim=dim, version=int(meta.get("version", 0)), emb=emb, users=users,
                 streamers=streamers, gifted=gifted, expanded=expanded, similar=similar)


def check_graph(graph, pairs, history=None):
    """Refuses a graph that saw a gift at or after the earliest of these pairs, as far as
    graph.json tells: `events_through_ms` (the engine's graph job: its last gift's time);
    and, given the history day indices, one built from another day's files (the engine's
    `inputs`: the paths given to `onair graph --gifts`, read for `day-<d>`; the fixture's
    `built_from`)."""
    if history is not None:
        named = [k for k, v in (graph.meta.get("inputs") or {}).items() if isinstance(v, dict)]
        named += list(graph.meta.get("built_from") or [])
        for name in named:
            m = re.search(r"day-(\d+)", str(name))
            if m and int(m.group(1)) not in set(history):
                raise ValueError(f"{graph.path}: built from {name}, not a history day {sorted(history)}")
    through = graph.meta.get("events_through_ms")
    if through is None or not pairs:
        return
    first = min(int(p["t_ms"]) for p in pairs)
    if int(through) >= first:
        raise ValueError(f"{graph.path}: graph has gifts through {through}, not before the first "
                         f"training sample at {first}")


# ---- live gifting history

class History:
    """Every gift of the loaded days, per user, sorted by t_ms; `before(user, t)` gives the
    gifts strictly before t, most recent first."""

    def __init__(self, gifts):
        by_user = {}
        for g in gifts:
            by_user.setdefault(g["user_id"], []).append((int(g["t_ms"]), g["streamer_id"], float(g["value"])))
        self.t, self.streamer, self.value = {}, {}, {}
        for u, gs in by_user.items():
            gs.sort(key=lambda g: g[0])
            self.t[u] = [g[0] for g in gs]
            self.streamer[u] = [g[1] for g in gs]
            self.value[u] = [g[2] for g in gs]

    def count(self, user, t_ms):
        return bisect.bisect_left(self.t.get(user, []), t_ms)

    def before(self, user, t_ms, limit):
        """[(t_ms, streamer_id, value)] of the user's last `limit` gifts with t < t_ms,
        most recent first."""
        ts = self.t.get(user)
        if not ts:
            return []
        i = bisect.bisect_left(ts, t_ms)
        lo = max(0, i - limit)
        return [(ts[k], self.streamer[user][k], self.value[user][k]) for k in range(i - 1, lo - 1, -1)]


# ---- feature arrays

def content_masks(meta_rows):
    """[R] lines -> (frame [R, 3], comment [R, 8], transcript [R, 2]) masks from the counts."""
    def mask(counts, n):
        c = np.minimum(np.asarray(counts, np.int64), n)
        return (np.arange(n)[None, :] < c[:, None]).astype(np.float32)
    return (mask([m["frames"] for m in meta_rows], FRAMES), mask([m["comment_tokens"] for m in meta_rows], COMMENTS),
            mask([m["transcript_tokens"] for m in meta_rows], TRANSCRIPTS))


def split_content(rows):
    """[R, WIDTH] -> frames [R, 3, 1280], comments [R, 8, 384], transcripts [R, 2, 384]."""
    return (rows[:, slice(*COLS["frames"])].reshape(-1, FRAMES, FRAME),
            rows[:, slice(*COLS["comments"])].reshape(-1, COMMENTS, TEXT),
            rows[:, slice(*COLS["transcripts"])].reshape(-1, TRANSCRIPTS, TEXT))


class Vocab:
    """Streamer ids -> index (0: unknown, i + 1: ids[i])."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.index = {s: i + 1 for i, s in enumerate(self.ids)}

    def __len__(self):
        return len(self.ids) + 1

    def __call__(self, s):
        return self.index.get(s, 0)


class Features:
    """Per-pair arrays for the model. Content rows of all days are concatenated into one
    table; a pair's `content` is its row there, -1 without one."""

    def __init__(self, days, graph, vocab, history, seq_len=32, exp_len=16, context=None):
        self.graph, self.vocab, self.L, self.K = graph, vocab, seq_len, exp_len
        self.context_names = list(context or DEFAULT_CONTEXT)
        offsets, rows, meta = {}, [], []
        for d in days:
            offsets[d.index] = sum(len(r) for r in rows)
            rows.append(d.content[:len(d.content_meta)])
            meta += d.content_meta
        self.content = np.concatenate(rows) if rows else np.zeros((0, WIDTH), np.float32)
        self.frame_mask, self.comment_mask, self.transcript_mask = content_masks(meta)
        self.content_meta = meta
        pairs = [(d, p) for d in days for p in d.pairs]
        P, L, K, G = len(pairs), seq_len, exp_len, graph.dim
        a = {
            "content": np.full(P, -1, np.int64), "streamer_vocab": np.zeros(P, np.int64),
            "streamer_node": np.full(P, -1, np.int64), "user_node": np.full(P, -1, np.int64),
            "seq_node": np.full((P, L), -1, np.int64), "seq_vocab": np.zeros((P, L), np.int64),
            "seq_feats": np.zeros((P, L, 3), np.float32), "seq_mask": np.zeros((P, L), np.float32),
            "exp_node": np.full((P, K), -1, np.int64), "exp_vocab": np.zeros((P, K), np.int64),
            "exp_scores": np.zeros((P, K), np.float32), "exp_mask": np.zeros((P, K), np.float32),
            "context": np.zeros((P, len(self.context_names)), np.float32), "label": np.zeros(P, np.float32),
            "t_ms": np.zeros(P, np.int64),
        }
        self.users, self.streamers, self.rooms, self.day = [], [], [], np.zeros(P, np.int64)
        exp_cache = {}
        for i, (d, p) in enumerate(pairs):
            u, s, t = p["user_id"], p["streamer_id"], int(p["t_ms"])
            self.users.append(u)
            self.streamers.append(s)
            self.rooms.append(p["room_id"])
            self.day[i] = d.index
            a["label"][i] = float(p["label"])
            a["t_ms"][i] = t
            cs = p.get("content_start_ms")
            row = d.content_at.get((p["room_id"], int(cs))) if cs is not None else None
            if row is not None:
                a["content"][i] = offsets[d.index] + row
            a["streamer_vocab"][i] = vocab(s)
            a["streamer_node"][i] = graph.streamer_row(s)
            a["user_node"][i] = graph.user_row(u)
            for j, (gt, gs, gv) in enumerate(history.before(u, t, L)):
                a["seq_node"][i, j] = graph.streamer_row(gs)
                a["seq_vocab"][i, j] = vocab(gs)
                a["seq_feats"][i, j] = (math.log1p(gv), math.log1p((t - gt) / HOUR_MS), float(gs == s))
                a["seq_mask"][i, j] = 1.0
            if u not in exp_cache:
                exp_cache[u] = graph.expanded.get(u, [])[:K]
            for j, (es, sc) in enumerate(exp_cache[u]):
                a["exp_node"][i, j] = graph.streamer_row(es)
                a["exp_vocab"][i, j] = vocab(es)
                a["exp_scores"][i, j] = sc
                a["exp_mask"][i, j] = 1.0
            a["context"][i] = self.context_row(p, history, self.content_meta[a["content"][i]] if row is not None else None)
        self.a = a
        self.users_arr = np.array(self.users)

    def context_row(self, p, history, content):
        values = {
            "log_present_s": math.log1p(max(0, p.get("present_ms", 0)) / 1000),
            "log_session_likes": math.log1p(p.get("session_likes", 0)),
            "log_session_comments": math.log1p(p.get("session_comments", 0)),
            "log_session_gifts": math.log1p(p.get("session_gifts", 0)),
            "log_session_gift_value": math.log1p(p.get("session_gift_value", 0)),
            "followed": float(bool(p.get("followed", False))),
            "user_known": float(p["user_id"] in self.graph.users),
            "streamer_known": float(p["streamer_id"] in self.graph.streamers),
        }
        if "log_user_gifts" in self.context_names:
            values["log_user_gifts"] = math.log1p(history.count(p["user_id"], int(p["t_ms"])))
        trigger = int(p.get("trigger", -1))
        values["trigger_content"] = float(trigger == 1)
        values["trigger_gift"] = float(trigger == 2)
        if "log_content_comments" in self.context_names:
            values["log_content_comments"] = math.log1p(content["comments"]) if content is not None else 0.0
        return [values[n] for n in self.context_names]

    def __len__(self):
        return len(self.a["label"])

    def batch(self, idx):
        """numpy arrays of the model's inputs for pairs idx. MFQ inputs are per unique
        content key (row, streamer): `mfq_*`, and `mfq_of` maps each pair to its key."""
        a, emb = self.a, self.graph.emb
        keys, kidx, mfq_of = {}, [], np.zeros(len(idx), np.int64)
        for j, i in enumerate(idx):
            k = (int(a["content"][i]), self.streamers[i])
            if k not in keys:
                keys[k] = len(kidx)
                kidx.append(i)
            mfq_of[j] = keys[k]
        rows = a["content"][kidx]
        has = rows >= 0
        content = np.zeros((len(kidx), WIDTH), np.float32)
        content[has] = self.content[rows[has]]
        frames, comments, transcripts = split_content(content)
        fm = np.zeros((len(kidx), FRAMES), np.float32)
        cm = np.zeros((len(kidx), COMMENTS), np.float32)
        tm = np.zeros((len(kidx), TRANSCRIPTS), np.float32)
        fm[has], cm[has] = self.frame_mask[rows[has]], self.comment_mask[rows[has]]
        tm[has] = self.transcript_mask[rows[has]]
        return {
            "frames": frames, "frame_mask": fm, "comments": comments, "comment_mask": cm,
            "transcripts": transcripts, "transcript_mask": tm,
            "mfq_streamer_index": a["streamer_vocab"][kidx], "mfq_streamer_graph": emb[a["streamer_node"][kidx]],
            "mfq_of": mfq_of,
            "streamer_index": a["streamer_vocab"][idx], "streamer_graph": emb[a["streamer_node"][idx]],
            "user_graph": emb[a["user_node"][idx]],
            "seq": emb[a["seq_node"][idx]], "seq_index": a["seq_vocab"][idx], "seq_feats": a["seq_feats"][idx],
            "seq_mask": a["seq_mask"][idx],
            "exp": emb[a["exp_node"][idx]], "exp_index": a["exp_vocab"][idx], "exp_scores": a["exp_scores"][idx],
            "exp_mask": a["exp_mask"][idx],
            "context": a["context"][idx], "label": a["label"][idx],
        }


def stats(x, mask=None):
    """Per-column (mean, std) over rows (where mask > 0); std 1 where (near) constant."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    if mask is not None:
        x = x[np.asarray(mask).reshape(-1) > 0]
    if len(x) == 0:
        return np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def feature_stats(f):
    """The standardisation buffers the model keeps, from the training features."""
    used = np.unique(f.a["content"][f.a["content"] >= 0])
    frames, comments, transcripts = split_content(f.content[used])
    g = f.graph.emb[:-1]
    return {
        "frame": stats(frames, f.frame_mask[used]), "comment": stats(comments, f.comment_mask[used]),
        "transcript": stats(transcripts, f.transcript_mask[used]),
        "graph": stats(g) if len(g) else (np.zeros(f.graph.dim, np.float32), np.ones(f.graph.dim, np.float32)),
        "seq_feats": stats(f.a["seq_feats"], f.a["seq_mask"]),
        "exp_scores": stats(np.log1p(np.maximum(f.a["exp_scores"], 0))[..., None], f.a["exp_mask"]),
        "context": stats(f.a["context"]),
    }


def load_truth(days):
    """({streamer_id: genre}, {(room_id, user_id): viewer line}) from the days' truth.jsonl."""
    streamers, viewers = {}, {}
    for d in days:
        for t in d.truth:
            if t.get("type") == "streamer":
                streamers[t["streamer_id"]] = t.get("genre")
            elif t.get("type") == "viewer":
                viewers[(t["room_id"], t["user_id"])] = t
    return streamers, viewers
