"""Synthetic data directories in the engine's format, for the tests and smoke runs.

Not the simulator: a stand-in with the properties the model should learn, written as
`samples.jsonl` + `samples.f32` + `truth.jsonl` exactly as the engine writes them.

Per room (one streamer): a latent excitement curve around 0.35 with 1-3 highlights of
5-15 s per ~5 min at ~0.9 (ramp up 2 s before, decay over 4 s after). The image embedding
jumps at once during a highlight (a "confetti" direction, brighter); audio loudness follows
excitement; the comment rate and the share of hype comments follow the excitement of
2-5 s earlier (a lag per streamer: chat trails the picture); transcripts arrive every few
seconds when speech is on. Viewers get ~1.5 impressions per tick and enter 2-5 s later; a
long view is much likelier when they enter during a highlight.

    python synth.py OUT_DIR --rooms 12 --ticks 300 --seed 1 [--world 0] [--gaps]

Directories made with the same --world share the feature "world" (the directions that
mean confetti, hype, ...) and differ in streamers when their --seed differs.
"""

import argparse
import json
import os

import numpy as np

D = 2120
TICK_MS = 1000


class World:
    """The directions shared by every room of every directory with the same seed."""

    def __init__(self, seed):
        rng = np.random.default_rng(1_000_003 + seed)
        self.confetti = np.abs(rng.normal(0, 1.0, 1280)) * (rng.random(1280) < 0.15)
        self.bright = np.abs(rng.normal(0, 0.5, 1280))
        self.hype = unit(rng.normal(0, 1, 384))
        self.speech_hype = unit(rng.normal(0, 1, 384))
        self.mel_profile = rng.uniform(0.5, 1.5, 32)


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def excitement(rng, ticks):
    """The latent curve and the highlight intervals [start, end) in ticks."""
    base = np.empty(ticks)
    a = 0.0
    for t in range(ticks):
        a = 0.9 * a + rng.normal(0, 0.02)
        base[t] = 0.35 + a
    count = max(1, int(round(rng.integers(1, 4) * ticks / 300)))
    intervals = []
    for _ in range(50):
        if len(intervals) == count:
            break
        length = int(rng.integers(5, 16))
        start = int(rng.integers(3, max(4, ticks - length - 5)))
        if all(start + length + 8 < s or e + 8 < start for s, e in intervals):
            intervals.append((start, start + length))
    intervals.sort()
    exc = base.copy()
    for s, e in intervals:
        for t in range(max(0, s - 2), min(ticks, e + 4)):
            if t < s:
                level = base[t] + (0.9 - base[t]) * (t - (s - 3)) / 3
            elif t < e:
                level = 0.9 + rng.normal(0, 0.02)
            else:
                level = 0.9 - (0.9 - base[t]) * (t - e + 1) / 5
            exc[t] = max(exc[t], level)
    return np.clip(exc, 0, 1), intervals


def room(rng, world, ticks):
    """Feature rows [ticks, D], labels and highlight intervals of one room."""
    exc, intervals = excitement(rng, ticks)
    in_hl = np.zeros(ticks, bool)
    for s, e in intervals:
        in_hl[s:e] = True
    lag = int(rng.integers(2, 6))
    speech = rng.random() < 0.7
    img_base = np.abs(rng.normal(0, 1.0, 1280)) * (rng.random(1280) < 0.4)
    topic = unit(rng.normal(0, 1, 384))
    speech_topic = unit(rng.normal(0, 1, 384))
    mel_base = rng.normal(-4.0, 0.5, 32)
    rows = np.zeros((ticks, D), np.float32)
    for t in range(ticks):
        r = rows[t]
        frames = int(rng.choice([0, 1, 2], p=[0.03, 0.17, 0.8]))
        if frames:
            img = img_base + 0.8 * in_hl[t] * world.confetti + exc[t] * world.bright
            img = img + rng.normal(0, 0.3 / np.sqrt(frames), 1280)
            r[0:1280] = np.maximum(img, 0)
        past = exc[t - lag] if t >= lag else exc[0]
        comments = int(rng.poisson(0.3 + 3.5 * past))
        if comments:
            hype = rng.random(comments) < np.clip((past - 0.35) / 0.55, 0, 1) * 0.8 + 0.05
            dirs = np.where(hype[:, None], world.hype, topic)
            r[1280:1664] = unit(dirs + 0.8 * rng.normal(0, 1, (comments, 384)) / np.sqrt(20)).mean(0)
        transcripts = int(speech and rng.random() < 0.25)
        if transcripts:
            r[1664:2048] = unit(speech_topic + exc[t] * world.speech_hype + rng.normal(0, 0.05, 384))
        rms = -35 + 20 * exc[t] + rng.normal(0, 4)
        r[2048:2080] = mel_base + (rms + 35) / 10 * world.mel_profile + rng.normal(0, 0.2, 32)
        r[2080:2112] = 0.5 + 0.2 * exc[t] + rng.normal(0, 0.05, 32)
        r[2112:2120] = [frames, comments, transcripts, 1.0, rms, rms + 10 + rng.normal(0, 1),
                        0.3 + 0.4 * rng.random() if speech else -1.0, 1.0]
    impressions = rng.poisson(1.5, ticks)
    long_views = np.zeros(ticks, np.int64)
    for t in range(ticks):
        for _ in range(impressions[t]):
            enter = min(ticks - 1, t + int(rng.integers(2, 6)))
            p = 0.05 + 0.75 * np.clip((exc[enter] - 0.35) / 0.55, 0, 1)
            long_views[t] += rng.random() < p
    return rows, impressions, long_views, intervals, exc, lag


def write_dir(out, rooms=12, ticks=300, seed=1, world=0, gaps=False, prefix=None):
    """Writes one data directory; returns the per-room lags (for reports)."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = World(world)
    prefix = prefix or f"s{seed}"
    lines, truth, blocks, lags = [], [], [], {}
    row = 0
    t0 = 1_760_000_000_000 + seed * 10_000_000
    for k in range(rooms):
        room_id, streamer_id = f"{prefix}-room{k}", f"{prefix}-streamer{k}"
        rows, impressions, long_views, intervals, _, lag = room(rng, w, ticks)
        lags[room_id] = lag
        keep = np.ones(ticks, bool)
        if gaps and k == 0:
            keep[ticks // 2: ticks // 2 + 5] = False  # the engine was down for 5 ticks
        for t in np.flatnonzero(keep):
            lines.append({"id": f"{room_id}:{t}", "room_id": room_id, "streamer_id": streamer_id,
                          "tick_start_ms": t0 + int(t) * TICK_MS, "tick_ms": TICK_MS,
                          "impressions": int(impressions[t]), "long_views": int(long_views[t]),
                          "lvtr": float(long_views[t] / impressions[t]) if impressions[t] else 0.0,
                          "long_view_ms": int(long_views[t]) * int(rng.integers(30_000, 120_000)),
                          "row": row, "image_model": "mobilenet_v2/1", "text_model": "e5-small/1"})
            row += 1
        blocks.append(rows[keep])
        truth.append({"type": "room", "room_id": room_id, "streamer_id": streamer_id})
        for s, e in intervals:
            truth.append({"type": "highlight", "room_id": room_id,
                          "start_ms": t0 + s * TICK_MS, "end_ms": t0 + e * TICK_MS})
    order = rng.permutation(len(lines))  # the engine does not promise any order
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        for i in order:
            f.write(json.dumps(lines[i]) + "\n")
    np.concatenate(blocks).astype("<f4").tofile(os.path.join(out, "samples.f32"))
    with open(os.path.join(out, "truth.jsonl"), "w") as f:
        for line in truth:
            f.write(json.dumps(line) + "\n")
    return lags


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rooms", type=int, default=12)
    ap.add_argument("--ticks", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--world", type=int, default=0)
    ap.add_argument("--gaps", action="store_true", help="drop 5 ticks in the middle of the first room")
    a = ap.parse_args()
    lags = write_dir(a.out, a.rooms, a.ticks, a.seed, a.world, a.gaps)
    print(json.dumps({"out": a.out, "rooms": a.rooms, "ticks": a.ticks, "chat_lag_s": lags}))


if __name__ == "__main__":
    main()
