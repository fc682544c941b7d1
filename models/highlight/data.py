"""Data directories written by the engine, as per-room numpy sequences.

A directory (or its highlight/ subdirectory) holds samples.jsonl (one line per room and tick, any order), samples.f32
(little-endian float32 rows of width 2120; a line's `row` is its row there) and, from the
simulator, truth.jsonl (lines of "type": "highlight" give a room's [start_ms, end_ms)).

Per room, ticks are sorted by tick_start_ms. Gaps (a step other than tick_ms) split the
room into segments: the model's look-back windows and the highlight events restart at a
gap, while the streamer running mean continues over all of the room's ticks (a gap is
not a tick and does not count). The running mean at a tick is the mean of the raw rows of
the room's ticks up to and including it (at the first tick: the row itself), summed in
float64.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np

D = 2120


@dataclass
class Room:
    key: str  # "<dir name>/<room_id>": unique over directories
    room_id: str
    streamer_id: str
    tick_ms: int
    start_ms: np.ndarray  # [T] int64
    rows: np.ndarray  # [T, D] float32
    impressions: np.ndarray  # [T] float32
    lvtr: np.ndarray  # [T] float32
    segments: list  # [(lo, hi)]: contiguous index ranges
    truth: list = field(default_factory=list)  # [(start_ms, end_ms)]
    _mean: np.ndarray = None

    @property
    def running_mean(self):
        if self._mean is None:
            count = np.arange(1, len(self.rows) + 1, dtype=np.float64)[:, None]
            self._mean = (np.cumsum(self.rows, axis=0, dtype=np.float64) / count).astype(np.float32)
        return self._mean

    @property
    def highlight(self):
        """[T] bool: ticks whose start lies in a ground-truth highlight interval."""
        y = np.zeros(len(self.start_ms), bool)
        for s, e in self.truth:
            y |= (self.start_ms >= s) & (self.start_ms < e)
        return y

    def scalar(self, name):
        from model import SCALAR_NAMES
        return self.rows[:, 2112 + SCALAR_NAMES.index(name)]


def load_truth(path):
    """{room_id: [(start_ms, end_ms)]} from truth.jsonl (other line types ignored)."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            t = json.loads(line)
            if t.get("type") == "highlight":
                out.setdefault(t["room_id"], []).append((int(t["start_ms"]), int(t["end_ms"])))
    for v in out.values():
        v.sort()
    return out


def find(path, name):
    """path/name, or path/highlight/name (the engine's samples directory layout)."""
    for p in (os.path.join(path, name), os.path.join(path, "highlight", name)):
        if os.path.exists(p):
            return p
    return os.path.join(path, name)


def load_dir(path):
    """All rooms of one data directory, in room_id order. The files may also sit in
    path/highlight/ (where the engine's --samples-dir puts them); a layout.json next to
    them, if any, must give width 2120."""
    name = os.path.basename(os.path.normpath(path))
    layout = find(path, "layout.json")
    if os.path.exists(layout):
        with open(layout) as f:
            width = json.load(f).get("width", D)
        if width != D:
            raise ValueError(f"{layout}: rows of width {width}, this model reads {D}")
    features = np.fromfile(find(path, "samples.f32"), dtype="<f4").reshape(-1, D)
    by_room = {}
    with open(find(path, "samples.jsonl")) as f:
        for line in f:
            if line.strip():
                s = json.loads(line)
                by_room.setdefault(s["room_id"], []).append(s)
    truth = load_truth(find(path, "truth.jsonl"))
    rooms = []
    for room_id in sorted(by_room):
        ss = sorted(by_room[room_id], key=lambda s: s["tick_start_ms"])
        start = np.array([s["tick_start_ms"] for s in ss], np.int64)
        tick_ms = int(ss[0]["tick_ms"])
        breaks = np.flatnonzero(np.diff(start) != tick_ms) + 1
        bounds = [0, *breaks.tolist(), len(ss)]
        rooms.append(Room(
            key=f"{name}/{room_id}", room_id=room_id, streamer_id=ss[0]["streamer_id"], tick_ms=tick_ms,
            start_ms=start, rows=features[[s["row"] for s in ss]],
            impressions=np.array([s["impressions"] for s in ss], np.float32),
            lvtr=np.array([s["lvtr"] for s in ss], np.float32),
            segments=list(zip(bounds[:-1], bounds[1:])), truth=truth.get(room_id, [])))
    return rooms


def load_dirs(paths):
    return [r for p in paths for r in load_dir(p)]


def split_by_streamer(rooms, fraction, seed):
    """(rest, held out): about `fraction` of the streamers, with all their rooms, held out."""
    streamers = sorted({r.streamer_id for r in rooms})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(streamers)[: max(1, int(round(fraction * len(streamers))))].tolist())
    return [r for r in rooms if r.streamer_id not in held], [r for r in rooms if r.streamer_id in held]


def feature_stats(rooms):
    """Per-column mean and std of the raw rows (float64 sums); std 1 where a column is constant."""
    n = sum(len(r.rows) for r in rooms)
    s = sum(r.rows.sum(0, dtype=np.float64) for r in rooms)
    mean = s / n
    var = sum(((r.rows - mean) ** 2).sum(0) for r in rooms) / n
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
