"""Tests of the MMBee model, its metrics, the data loader and the export.

    python -m unittest discover -s models/mmbee -p 'test_*.py'
"""

import json
import math
import os
import sys
import tempfile
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import (PAIR_COLUMNS, Features, History, Vocab, check_clock, check_graph, day_dirs,  # noqa: E402
                  default_splits, load_day, load_gifts, load_graph, parse_days)
from evaluate import gauc, logloss, popularity, roc_auc, uauc  # noqa: E402
from model import (MFQ_INPUTS, MFQ_OUTPUTS, RANKER_INPUTS, RANKER_OUTPUTS, MMBee, RankerExport,  # noqa: E402
                   set_threads)
import export  # noqa: E402
import synth  # noqa: E402

set_threads()


def randomise(model, seed=0, scale=0.3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def tiny(mfq=True, gie=True, seed=0):
    """A small model with every parameter and buffer randomised."""
    torch.manual_seed(seed)
    stats = {"frame": (torch.randn(1280), torch.rand(1280) + 0.5),
             "comment": (torch.randn(384) * 0.1, torch.rand(384) + 0.5),
             "transcript": (torch.randn(384) * 0.1, torch.rand(384) + 0.5),
             "graph": (torch.randn(8) * 0.1, torch.rand(8) + 0.5),
             "seq_feats": (torch.rand(3), torch.rand(3) + 0.5), "exp_scores": (torch.rand(1), torch.rand(1) + 0.5),
             "context": (torch.rand(8), torch.rand(8) + 0.5)}
    m = MMBee(d=16, queries=2, graph_dim=8, vocab=5, context=8, seq_len=6, exp_len=4, heads=4, mfq=mfq, gie=gie,
              stats=stats, dropout=0.0)
    return randomise(m, seed)


def mfq_inputs(batch=3, seed=1, G=8):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(batch, 3, 1280, generator=g) * 2
    comments = torch.randn(batch, 8, 384, generator=g)
    comments = comments / comments.norm(dim=-1, keepdim=True)
    transcripts = torch.randn(batch, 2, 384, generator=g)
    fm = torch.tensor([[1.0, 1.0, 1.0]] * batch)
    cm = torch.tensor([[1.0] * 5 + [0.0] * 3] * batch)
    tm = torch.tensor([[1.0, 0.0]] * batch)
    for x, m in ((frames, fm), (comments, cm), (transcripts, tm)):
        x[m == 0] = 0.0
    return [frames, fm, comments, cm, transcripts, tm, torch.arange(batch) % 5, torch.randn(batch, G, generator=g)]


class Metrics(unittest.TestCase):
    def test_auc_with_ties(self):
        # positives 0.4 and 0.8 against negatives 0.1 and 0.4: wins 0.4>0.1, 0.8>0.1,
        # 0.8>0.4 and one tie (0.4 = 0.4, half): 3.5 of 4 pairs.
        self.assertAlmostEqual(roc_auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]), 0.875)
        self.assertAlmostEqual(roc_auc([0.5, 0.5, 0.5], [0, 1, 0]), 0.5)
        self.assertAlmostEqual(roc_auc([0.9, 0.1], [0, 1]), 0.0)
        self.assertTrue(math.isnan(roc_auc([0.1, 0.2], [1, 1])))

    def test_uauc_and_gauc_skip_single_class_users(self):
        users = ["a", "a", "a", "b", "b", "c", "c", "d", "e", "e"]
        scores = [0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.6, 0.5, 0.5, 0.5]
        labels = [1, 0, 0, 1, 0, 0, 0, 1, 1, 0]
        # a: AUC 1 (3 samples), b: 0 (2), e: a tie, 0.5 (2); c (only negatives) and
        # d (one positive) are skipped.
        self.assertAlmostEqual(uauc(scores, labels, users), (1.0 + 0.0 + 0.5) / 3)
        self.assertAlmostEqual(gauc(scores, labels, users), (1.0 * 3 + 0.0 * 2 + 0.5 * 2) / 7)
        self.assertTrue(math.isnan(gauc([0.1, 0.2], [0, 0], ["a", "b"])))

    def test_logloss(self):
        self.assertAlmostEqual(logloss([0.8, 0.3], [1, 0]), -(math.log(0.8) + math.log(0.7)) / 2)
        self.assertLess(logloss([0.0, 1.0], [0, 1]), 1e-6)  # clipped, finite

    def test_popularity_orders_by_rate_then_user_gifts(self):
        class D:
            pairs = [{"streamer_id": "s1", "user_id": "x", "label": 1}, {"streamer_id": "s1", "user_id": "y", "label": 0},
                     {"streamer_id": "s2", "user_id": "x", "label": 0}]
            gifts = [{"user_id": "x"}, {"user_id": "x"}, {"user_id": "y"}]
        pairs = [{"streamer_id": "s1", "user_id": "y"}, {"streamer_id": "s1", "user_id": "x"},
                 {"streamer_id": "s2", "user_id": "x"}, {"streamer_id": "s3", "user_id": "z"}]
        score, rate = popularity([D], pairs)
        np.testing.assert_allclose(rate, [0.5, 0.5, 0.0, 1 / 3])  # s3 unseen: the overall rate
        self.assertEqual(list(np.argsort(score)), [2, 3, 0, 1])  # s2 < s3 < s1 (y: 1 gift < x: 2)


class Histories(unittest.TestCase):
    def test_history_is_strictly_before(self):
        gifts = [{"user_id": "u", "streamer_id": s, "t_ms": t, "value": v}
                 for s, t, v in (("a", 300, 1), ("a", 100, 5), ("b", 200, 10), ("c", 200, 52))]
        gifts.append({"user_id": "w", "streamer_id": "a", "t_ms": 50, "value": 1})
        h = History(gifts)
        self.assertEqual(h.before("u", 100, 10), [])
        self.assertEqual(h.before("u", 200, 10), [(100, "a", 5.0)])
        self.assertEqual([g[0] for g in h.before("u", 201, 10)], [200, 200, 100])
        self.assertEqual([g[0] for g in h.before("u", 10**9, 2)], [300, 200])  # most recent first, limited
        self.assertEqual(h.count("u", 300), 3)
        self.assertEqual(h.before("nobody", 500, 4), [])

    def test_features_never_use_a_gift_at_or_after_t(self):
        with tempfile.TemporaryDirectory() as root:
            synth.write_root(root, days=4, history=1, streamers=4, users=40, seconds=120, seed=3)
            days = day_dirs(root)
            loaded = [load_day(p, d) for d, p in days.items()]
            gifts = [g for d in loaded for g in d.gifts]
            graph = load_graph(root)
            f = Features(loaded[1:], graph, Vocab(["streamer-0001"]), History(gifts), seq_len=5, exp_len=3)
            self.assertGreater(len(f), 100)
            m = f.a["seq_mask"] > 0
            self.assertTrue(m.any())
            ages = f.a["seq_feats"][..., 1]
            self.assertTrue((ages[m] > 0).all())  # log1p(age hours) > 0: every gift strictly before t
            for i in range(len(f)):  # against a brute force count
                t, u = f.a["t_ms"][i], f.users[i]
                n = sum(1 for g in gifts if g["user_id"] == u and g["t_ms"] < t)
                self.assertEqual(int(m[i].sum()), min(5, n))
            # masks are prefixes; same_streamer matches
            self.assertTrue((np.diff(f.a["seq_mask"], axis=1) <= 0).all())


class Graphs(unittest.TestCase):
    def write_graph(self, d, through=None):
        os.makedirs(d)
        meta = {"format": "onair-graph-v1", "version": 3, "dim": 2, "users": 2, "streamers": 1, "edges": 2}
        if through is not None:
            meta["events_through_ms"] = through
        with open(os.path.join(d, "graph.json"), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(d, "nodes.tsv"), "w") as f:
            f.write("u\tuser-b\t1\t2.0\ns\tstreamer-x\t2\t3.0\nu\tuser-a\t1\t1.0\n")
        np.array([[1, 2], [3, 4], [5, 6]], "<f4").tofile(os.path.join(d, "embeddings.f32"))
        with open(os.path.join(d, "neighbors.jsonl"), "w") as f:
            f.write(json.dumps({"id": "user-a", "kind": "u", "gifted": [["streamer-x", 1.0]],
                                "expanded": [["streamer-y", 0.5]]}) + "\n")
            f.write(json.dumps({"id": "streamer-x", "kind": "s", "similar": [["streamer-y", 0.2]],
                                "gifters": [["user-a", 1.0]]}) + "\n")

    def test_load_graph_follows_nodes_tsv(self):
        with tempfile.TemporaryDirectory() as root:
            self.write_graph(os.path.join(root, "graph", "3"), through=999)
            self.write_graph(os.path.join(root, "graph", "12"))
            self.assertTrue(load_graph(root).path.endswith(os.path.join("graph", "12")))  # numeric, not lexical
            g = load_graph(os.path.join(root, "graph", "3"))
            self.assertEqual((g.dim, g.version), (2, 3))
            np.testing.assert_array_equal(g.emb[g.user_row("user-a")], [5, 6])
            np.testing.assert_array_equal(g.emb[g.streamer_row("streamer-x")], [3, 4])
            np.testing.assert_array_equal(g.emb[g.user_row("nobody")], [0, 0])  # row -1: zeros
            self.assertEqual(g.expanded["user-a"], [("streamer-y", 0.5)])
            self.assertEqual(g.similar["streamer-x"], [("streamer-y", 0.2)])
            check_graph(g, [{"t_ms": 1000}])
            with self.assertRaises(ValueError):
                check_graph(g, [{"t_ms": 999}, {"t_ms": 5000}])

    def test_synthetic_graph_is_history_only(self):
        with tempfile.TemporaryDirectory() as root:
            synth.write_root(root, days=4, history=2, streamers=4, users=40, seconds=120, seed=1)
            g = load_graph(root)
            days = day_dirs(root)
            hist = {x["user_id"] for d in (0, 1) for x in load_day(days[d], d, with_content=False).gifts}
            self.assertEqual(set(g.users), hist)
            later = [p for d in (2, 3) for p in load_day(days[d], d, with_content=False).pairs]
            check_graph(g, later, [0, 1])
            with self.assertRaises(ValueError):  # graph.json built_from names day-1
                check_graph(g, later, [0])
            # the engine's graph job names its --gifts files in `inputs`
            g.meta = {"inputs": {"previous": None, "after_ms": -1,
                                 os.path.join(root, "day-2", "mmbee-gifts", "samples.jsonl"): {"merged": 3}}}
            check_graph(g, later)
            with self.assertRaises(ValueError):
                check_graph(g, later, [0, 1])
            self.assertEqual(default_splits(days), ([0], [1], [2], [3]))
            self.assertEqual(parse_days("0-2,5"), [0, 1, 2, 5])


class MFQTests(unittest.TestCase):
    def test_permutation_invariant_within_a_modality(self):
        """No positional embeddings: reordering the valid slots of a modality (a set)
        leaves the tokens unchanged."""
        m = tiny().mfq
        x = mfq_inputs()
        y = [t.clone() for t in x]
        y[0] = x[0][:, [2, 0, 1]]
        y[2] = x[2].clone()
        y[2][:, :5] = x[2][:, [4, 1, 3, 0, 2]]
        with torch.no_grad():
            self.assertLess((m(*x) - m(*y)).abs().max().item(), 1e-5)

    def test_masked_slots_do_not_matter_and_empty_is_finite(self):
        m = tiny().mfq
        x = mfq_inputs()
        y = [t.clone() for t in x]
        y[2][:, 5:] = torch.randn(3, 3, 384)  # masked comment slots
        y[4][:, 1:] = 9.0  # masked transcript slot
        with torch.no_grad():
            a = m(*x)
            self.assertLess((a - m(*y)).abs().max().item(), 1e-6)
            for masks in ([1], [3], [5], [1, 3, 5]):  # one modality empty, then all of them
                z = [t.clone() for t in x]
                for k in masks:
                    z[k][:] = 0.0
                    z[k - 1][:] = 0.0
                out = m(*z)
                self.assertTrue(torch.isfinite(out).all())
                self.assertEqual(tuple(out.shape), (3, 2, 16))
            self.assertGreater((a[0] - a[1]).abs().max().item(), 1e-3)  # not constant

    def test_unknown_and_out_of_vocabulary_streamer(self):
        m = tiny().mfq
        x = mfq_inputs(batch=2)
        x[6] = torch.tensor([0, 99])
        x[7] = torch.zeros(2, 8)
        with torch.no_grad():
            out = m(*x)
            x[6] = torch.tensor([0, 0])
            same = m(*x)
        self.assertTrue(torch.isfinite(out).all())
        self.assertLess((out - same).abs().max().item(), 1e-6)  # 99 reads as 0

    def test_viewer_independent(self):
        """MFQ has no viewer input, and Features.batch computes it once per (content row,
        streamer): two viewers of one room segment get the same tokens."""
        for name in MFQ_INPUTS:
            self.assertNotIn("user", name)
        with tempfile.TemporaryDirectory() as root:
            synth.write_root(root, days=4, history=1, streamers=3, users=40, seconds=120, seed=2)
            days = day_dirs(root)
            day = load_day(days[2], 2)
            f = Features([day], load_graph(root), Vocab(["streamer-0000", "streamer-0001"]),
                         History(day.gifts), seq_len=6, exp_len=4)
            keys = {}
            for i in range(len(f)):
                keys.setdefault((f.a["content"][i], f.streamers[i]), set()).add(f.users[i])
            shared = [k for k, us in keys.items() if len(us) > 1 and k[0] >= 0][0]
            idx = np.array([i for i in range(len(f)) if (f.a["content"][i], f.streamers[i]) == shared][:2])
            m = MMBee(d=16, queries=2, graph_dim=f.graph.dim, vocab=3, context=8, seq_len=6, exp_len=4)
            m.eval()
            from model import to_tensors
            b = to_tensors(f.batch(idx))
            self.assertEqual(len(b["frames"]), 1)
            with torch.no_grad():
                tok = m.tokens(b)
            self.assertEqual((tok[0] - tok[1]).abs().max().item(), 0.0)
            self.assertNotEqual(f.users[idx[0]], f.users[idx[1]])


class RankerTests(unittest.TestCase):
    def inputs(self, model, batch=4, seed=0):
        return list(export.ranker_example(model, batch, seed))

    def test_empty_sequences_and_masked_slots(self):
        for gie in (True, False):
            m = tiny(gie=gie)
            x = self.inputs(m)
            seq_index = torch.randint(0, 5, (4, 6))
            with torch.no_grad():
                a = m.ranker(*x, seq_index=seq_index)
                self.assertTrue(torch.isfinite(a).all())
                y = [t.clone() for t in x]
                for k, mk in ((4, 6), (7, 9)):  # seq, exp: change the masked slots
                    y[k][y[mk] == 0] = 3.0
                y[5][y[6] == 0] = 2.0
                y[8][y[9] == 0] = 2.0
                b = m.ranker(*y, seq_index=seq_index)
            self.assertLess((a - b).abs().max().item(), 1e-5)

    def test_ablations_ignore_what_they_drop(self):
        m = tiny(mfq=False, gie=False)
        x = self.inputs(m)
        seq_index = torch.randint(0, 5, (4, 6))
        y = [t.clone() for t in x]
        for k in (0, 2, 3, 4, 7, 8):  # tokens, graphs, expansion
            y[k] = torch.randn_like(y[k])
        with torch.no_grad():
            self.assertLess((m.ranker(*x, seq_index=seq_index) - m.ranker(*y, seq_index=seq_index)).abs().max().item(), 1e-6)
        with self.assertRaises(ValueError):
            RankerExport(m.ranker)


class Export(unittest.TestCase):
    def test_round_trip(self):
        m = tiny()
        with tempfile.TemporaryDirectory() as d:
            log = lambda s: None  # noqa: E731
            p = {k: os.path.join(d, k) for k in ("mfq.onnx", "mfq.pt", "ranker.onnx", "ranker.pt")}
            d1 = export.export_pair(m.mfq, lambda b, s: export.mfq_example(m, b, s), MFQ_INPUTS, MFQ_OUTPUTS,
                                    p["mfq.onnx"], p["mfq.pt"], log, batches=(1, 4))
            d2 = export.export_pair(RankerExport(m.ranker).eval(), lambda b, s: export.ranker_example(m, b, s),
                                    RANKER_INPUTS, RANKER_OUTPUTS, p["ranker.onnx"], p["ranker.pt"], log, batches=(1, 4))
            self.assertLess(max(d1, d2), export.TOLERANCE)
            # batch 1 is the empty / unknown row of the examples
            x = export.ranker_example(m, 1, 5)
            self.assertEqual(float(x[6].sum()), 0.0)
            loaded = torch.jit.load(p["ranker.pt"])
            with torch.no_grad():
                prob, logit = loaded(*x)
            self.assertTrue(torch.isfinite(logit).all())
            self.assertAlmostEqual(prob.item(), torch.sigmoid(logit).item(), places=6)
            mfq, ranker = export.contract(m, ["s1"], ["log_present_s"])
            self.assertEqual(list(mfq["shapes"]), MFQ_INPUTS + MFQ_OUTPUTS)
            self.assertEqual(list(ranker["shapes"]), RANKER_INPUTS + RANKER_OUTPUTS)


class Synthetic(unittest.TestCase):
    def test_pairs_follow_the_contract(self):
        with tempfile.TemporaryDirectory() as root:
            synth.write_root(root, days=4, history=1, streamers=3, users=40, seconds=120, horizon=30, seed=4,
                             replay=0.05)
            day = load_day(os.path.join(root, "day-2"), 2)
            ends = {}
            for c in day.content_meta:
                ends.setdefault(c["room_id"], []).append((c["start_ms"], c["end_ms"]))
            self.assertEqual(day.content.shape, (len(day.content_meta), 7680))
            self.assertEqual(len({p["id"] for p in day.pairs}), len(day.pairs))  # replays dropped
            nulls, triggers = 0, set()
            for p in day.pairs:
                done = [s for s, e in ends[p["room_id"]] if e <= p["t_ms"]]
                if p["content_start_ms"] is None:
                    nulls += 1
                    self.assertEqual(done, [])
                else:
                    self.assertEqual(p["content_start_ms"], max(done))
                hits = [g for g in day.gifts if g["user_id"] == p["user_id"] and g["room_id"] == p["room_id"]
                        and p["t_ms"] < g["t_ms"] <= p["t_ms"] + p["horizon_ms"]]
                self.assertEqual(p["label"], int(bool(hits)))
                self.assertEqual(p["gift_value"], sum(g["value"] for g in hits))
                triggers.add(p["trigger"])
                if p["trigger"] == 0:  # the session just started: nothing counted yet
                    self.assertEqual([p[c] for c in PAIR_COLUMNS], [0, 0, 0, 0, 0, False])
                    continue
                # session counters: the session's gifts at or before t (as src/operators/gift_labels.rs)
                mine = [g for g in day.gifts if g["user_id"] == p["user_id"] and g["room_id"] == p["room_id"]
                        and p["t_ms"] - p["present_ms"] <= g["t_ms"] <= p["t_ms"]]
                self.assertEqual(p["session_gifts"], len(mine))
                self.assertEqual(p["session_gift_value"], sum(g["value"] for g in mine))
                if p["trigger"] == 2:  # right after the viewer's own gift in this room, which the counters include
                    own = [g for g in mine if g["t_ms"] == p["t_ms"]]
                    self.assertTrue(own)
                    self.assertGreaterEqual(p["session_gift_value"], sum(g["value"] for g in own))
                if p["trigger"] == 1:
                    self.assertEqual(p["content_start_ms"] + synth.SEGMENT_MS, p["t_ms"])
                self.assertIsInstance(p["followed"], bool)
            self.assertGreater(nulls, 0)
            self.assertEqual(triggers, {0, 1, 2})
            counts = [c["comment_tokens"] for c in day.content_meta]
            self.assertTrue(all(0 <= k <= 8 for k in counts))
            row = day.content_meta[0]
            k = row["comment_tokens"]
            comments = day.content[0, 3840:6912].reshape(8, 384)
            np.testing.assert_allclose(np.linalg.norm(comments[:k], axis=1), 1.0, rtol=1e-5)
            self.assertTrue((comments[k:] == 0).all())
            self.assertEqual({t["type"] for t in day.truth}, {"streamer", "viewer"})


def append_sample(task_dir, line, row):
    """Appends one sample to a task directory, as the engine's sink does."""
    with open(os.path.join(task_dir, "samples.f32"), "ab") as f:
        n = f.tell() // (4 * len(row))
        f.write(np.asarray(row, "<f4").tobytes())
    with open(os.path.join(task_dir, "samples.jsonl"), "a") as f:
        f.write(json.dumps({**line, "row": n}) + "\n")


class Format(unittest.TestCase):
    """The engine's sample-file format: replays, crashed writes, unknown keys, layouts."""

    def test_replayed_samples_keep_the_last_line(self):
        with tempfile.TemporaryDirectory() as root:
            synth.write_root(root, days=4, history=1, streamers=3, users=30, seconds=100, seed=5, replay=0.0)
            day_path = os.path.join(root, "day-2")
            before = load_day(day_path, 2)
            pair = next(p for p in before.pairs if p["content_start_ms"] is not None)
            with open(os.path.join(day_path, "mmbee", "samples.jsonl")) as f:
                line = next(json.loads(x) for x in f if json.loads(x)["id"] == pair["id"])
            # the pair again, with other values and an unknown key; then a row without a line
            append_sample(os.path.join(day_path, "mmbee"), {**line, "label": 1.0 - line["label"], "extra": [1]},
                          [123456, 7, 8, 9, 10, 1])
            with open(os.path.join(day_path, "mmbee", "samples.f32"), "ab") as f:
                f.write(np.full(6, -1, "<f4").tobytes())
            # the pair's content row again, with other contents
            cdir = os.path.join(day_path, "mmbee-content")
            with open(os.path.join(cdir, "samples.jsonl")) as f:
                cline = next(json.loads(x) for x in f if json.loads(x)["room_id"] == pair["room_id"]
                             and json.loads(x)["tick_start_ms"] == pair["content_start_ms"])
            append_sample(cdir, {**cline, "comment_tokens": 1}, np.full(7680, 0.5))
            gdir = os.path.join(day_path, "mmbee-gifts")
            gifts_before = load_gifts(day_path)
            with open(os.path.join(gdir, "samples.jsonl")) as f:
                gline = json.loads(f.readline())
            append_sample(gdir, gline, [gline["value"]])

            after = load_day(day_path, 2)
            self.assertEqual(len(after.pairs), len(before.pairs))
            self.assertEqual(len(after.content_meta), len(before.content_meta))
            self.assertEqual(len(after.gifts), len(gifts_before))
            p = next(x for x in after.pairs if x["id"] == pair["id"])
            self.assertEqual(p["label"], 1 - pair["label"])
            self.assertEqual([p[k] for k in PAIR_COLUMNS], [123456, 7, 8, 9, 10, True])
            f = Features([after], load_graph(root), Vocab([]), History(after.gifts), seq_len=4, exp_len=2)
            i = [x["id"] for x in after.pairs].index(pair["id"])
            row = f.a["content"][i]
            self.assertTrue((f.content[row] == 0.5).all())
            np.testing.assert_array_equal(f.comment_mask[row], [1, 0, 0, 0, 0, 0, 0, 0])

    def test_layout_mismatch_and_dangling_rows_are_refused(self):
        with tempfile.TemporaryDirectory() as root:
            synth.write_root(root, days=4, history=1, streamers=2, users=20, seconds=60, seed=6)
            day_path = os.path.join(root, "day-1")
            pdir = os.path.join(day_path, "mmbee")
            with open(os.path.join(pdir, "samples.jsonl"), "a") as f:
                f.write(json.dumps({"id": "x", "row": 10**6, "tick_start_ms": 0, "label": 0.0}) + "\n")
            with self.assertRaises(ValueError):
                load_day(day_path, 1)
            with open(os.path.join(day_path, "mmbee-content", "layout.json"), "w") as f:
                json.dump({"feature_layout": "mmbee-content-v2", "width": 7680}, f)
            with self.assertRaises(ValueError):
                load_day(day_path, 1)

    def test_days_must_follow_each_other(self):
        g = lambda *ts: [{"t_ms": t} for t in ts]  # noqa: E731
        check_clock({0: g(1, 5), 1: [], 2: g(6, 9)})
        with self.assertRaises(ValueError):
            check_clock({0: g(1, 5), 1: g(5, 9)})


if __name__ == "__main__":
    unittest.main()
