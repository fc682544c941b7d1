"""Tests of the highlight model, its losses, the data loader and the hysteresis rule.

    python -m unittest discover -s models/highlight -p 'test_*.py'
"""

import math
import os
import sys
import tempfile
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_dir  # noqa: E402
from evaluate import average_precision, events, match, ndcg_at, roc_auc  # noqa: E402
from model import (D, Highlight, Step, alignment_loss, context, pairwise_loss, pointwise_loss,  # noqa: E402
                   set_threads, soft_dtw)
import synth  # noqa: E402

set_threads()


def small_model(mtam=True, window=5, seed=0):
    """A small model with every parameter randomised (so lag biases and embeddings matter)."""
    torch.manual_seed(seed)
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    model = Highlight(window=window, layers=2, hidden=16, heads=4, mtam=mtam, mean=mean, std=std)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def rows(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g) * 2.0
    m = torch.cumsum(x.double(), 0) / torch.arange(1, T + 1).unsqueeze(1)
    return x, m.float()


def run_steps(model, x, m):
    """Scores a room tick by tick with the step module, keeping the histories as the engine
    does (rings of n-1 slots, oldest first, empty slots at the front marked invalid)."""
    step, n, h = Step(model), model.window, model.hidden
    z_hist, e_hist, p_hist = torch.zeros(1, n - 1, h), torch.zeros(1, n - 1, 2 * h), torch.zeros(1, n - 1, h)
    valid = torch.zeros(1, n - 1)
    logits = []
    with torch.no_grad():
        for t in range(len(x)):
            score, logit, z, e, p = step(x[t:t + 1], m[t:t + 1], z_hist, e_hist, p_hist, valid)
            logits.append(logit[0])
            z_hist = torch.cat([z_hist[:, 1:], z.unsqueeze(1)], 1)
            e_hist = torch.cat([e_hist[:, 1:], e.unsqueeze(1)], 1)
            p_hist = torch.cat([p_hist[:, 1:], p.unsqueeze(1)], 1)
            valid = torch.cat([valid[:, 1:], torch.ones(1, 1)], 1)
    return torch.stack(logits)


class StepMatchesFull(unittest.TestCase):
    def check(self, mtam):
        model = small_model(mtam)
        x, m = rows(3 * model.window + 7)
        with torch.no_grad():
            full = model(x.unsqueeze(0), m.unsqueeze(0), torch.ones(1, len(x)))["logit"][0]
        steps = run_steps(model, x, m)
        self.assertLess((full - steps).abs().max().item(), 1e-4)
        self.assertGreater(full.std().item(), 1e-3)  # not a constant model

    def test_with_mtam(self):
        self.check(True)

    def test_without_mtam(self):
        self.check(False)

    def test_batched_rooms_at_different_ages(self):
        """Two rooms in one step call, one still filling its history: each row of the
        batch gives what it gives alone."""
        model = small_model()
        step, n, h = Step(model), model.window, model.hidden
        g = torch.Generator().manual_seed(3)
        args = [torch.randn(2, D, generator=g), torch.randn(2, D, generator=g), torch.randn(2, n - 1, h, generator=g),
                torch.randn(2, n - 1, 2 * h, generator=g), torch.randn(2, n - 1, h, generator=g),
                torch.tensor([[0.0] * (n - 3) + [1.0, 1.0], [1.0] * (n - 1)])]
        with torch.no_grad():
            both = step(*args)
            for b in range(2):
                alone = step(*[a[b:b + 1] for a in args])
                for u, v in zip(both, alone):
                    self.assertLess((u[b:b + 1] - v).abs().max().item(), 1e-5)

    def test_invalid_history_contents_do_not_matter(self):
        model = small_model()
        step, n, h = Step(model), model.window, model.hidden
        g = torch.Generator().manual_seed(4)
        x, m = torch.randn(1, D, generator=g), torch.randn(1, D, generator=g)
        valid = torch.tensor([[0.0] * (n - 2) + [1.0]])
        hist = [torch.randn(1, n - 1, k, generator=g) for k in (h, 2 * h, h)]
        other = [t.clone() for t in hist]
        for t in other:
            t[:, : n - 2] = 0.0
        with torch.no_grad():
            a = step(x, m, *hist, valid)[1]
            b = step(x, m, *other, valid)[1]
        self.assertEqual(a.item(), b.item())


class Causality(unittest.TestCase):
    def test_future_rows_do_not_change_past_logits(self):
        model = small_model()
        x, m = rows(40)
        with torch.no_grad():
            base = model(x.unsqueeze(0), m.unsqueeze(0), torch.ones(1, 40))["logit"][0]
            for t in (0, 3, 17, 38):
                x2, m2 = x.clone(), m.clone()
                x2[t + 1:] += torch.randn_like(x2[t + 1:]) * 5
                m2[t + 1:] += torch.randn_like(m2[t + 1:]) * 5
                out = model(x2.unsqueeze(0), m2.unsqueeze(0), torch.ones(1, 40))["logit"][0]
                self.assertLess((out[: t + 1] - base[: t + 1]).abs().max().item(), 1e-6)
                self.assertGreater((out[t + 1:] - base[t + 1:]).abs().max().item(), 1e-3)

    def test_same_look_back_wherever_a_window_starts(self):
        """A training window starting mid-room gives the online logits from its
        context(n)-th position on."""
        model = small_model()
        x, m = rows(50)
        ctx = context(model.window)
        with torch.no_grad():
            full = model(x.unsqueeze(0), m.unsqueeze(0), torch.ones(1, 50))["logit"][0]
            for c in (1, 7, 20):
                part = model(x[c:].unsqueeze(0), m[c:].unsqueeze(0), torch.ones(1, 50 - c))["logit"][0]
                self.assertLess((part[ctx:] - full[c + ctx:]).abs().max().item(), 1e-5)

    def test_end_padding_does_not_change_real_positions(self):
        model = small_model()
        x, m = rows(20)
        xp = torch.cat([x, torch.zeros(6, D)])
        mp = torch.cat([m, torch.zeros(6, D)])
        valid = torch.cat([torch.ones(20), torch.zeros(6)]).unsqueeze(0)
        with torch.no_grad():
            a = model(x.unsqueeze(0), m.unsqueeze(0), torch.ones(1, 20))["logit"][0]
            b = model(xp.unsqueeze(0), mp.unsqueeze(0), valid)["logit"][0, :20]
        self.assertLess((a - b).abs().max().item(), 1e-5)


def naive_soft_dtw(c, gamma):
    a, b = c.shape
    r = np.full((a + 1, b + 1), np.inf)
    r[0, 0] = 0.0
    for i in range(1, a + 1):
        for j in range(1, b + 1):
            prev = np.array([r[i - 1, j - 1], r[i - 1, j], r[i, j - 1]])
            finite = prev[np.isfinite(prev)]
            mn = finite.min()
            soft = mn - gamma * math.log(np.exp(-(finite - mn) / gamma).sum())
            r[i, j] = c[i - 1, j - 1] + soft
    return r[a, b]


class Losses(unittest.TestCase):
    def test_soft_dtw_matches_naive_loop(self):
        rng = np.random.default_rng(0)
        for a, b, gamma in ((4, 4, 0.1), (5, 3, 0.1), (3, 6, 1.0), (1, 1, 0.1), (16, 16, 0.1)):
            c = rng.random((2, a, b))
            got = soft_dtw(torch.tensor(c), gamma).numpy()
            for k in range(2):
                self.assertAlmostEqual(got[k], naive_soft_dtw(c[k], gamma), places=9)

    def test_soft_dtw_small_gamma_is_dtw(self):
        c = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]], dtype=torch.float64)
        self.assertAlmostEqual(soft_dtw(c, 1e-4).item(), 0.0, places=3)

    def test_soft_dtw_gradient_is_finite(self):
        c = torch.rand(3, 8, 8, requires_grad=True)
        soft_dtw(c, 0.1).sum().backward()
        self.assertTrue(torch.isfinite(c.grad).all())

    def test_pairwise_loss_hand_example(self):
        # y: 1.0 > 0.5 > 0.0 = 0.0; tick 4 is unlabelled (masked). Pairs with y_i > y_j:
        #   (0,1): dy 0.5, ds -0.7 -> 1.2 >= 0: kept (wrong order)
        #   (0,2): dy 1.0, ds  3.2 -> -2.2: beyond the border, dropped
        #   (0,3): dy 1.0, ds  0.8 -> 0.2 >= 0: kept (right order, inside the border)
        #   (1,2): dy 0.5, ds  3.9 -> -3.4: dropped
        #   (1,3): dy 0.5, ds  1.5 -> -1.0: dropped
        y = torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.9]])
        s = torch.tensor([[0.2, 0.9, -3.0, -0.6, 5.0]])
        mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
        want = (-math.log(1 / (1 + math.exp(0.7))) - math.log(1 / (1 + math.exp(-0.8)))) / 2
        self.assertAlmostEqual(pairwise_loss(s, y, mask).item(), want, places=6)

    def test_alignment_loss_prefers_the_true_order(self):
        """Text identical to the frames: the true order has soft-DTW near 0 and beats the
        permutations, so the loss is far below log 8 (chance); unrelated text is near it."""
        g = torch.Generator().manual_seed(0)
        v = torch.randn(2, 40, 16, generator=g)
        starts = [(0, 3), (1, 20)]
        aligned = alignment_loss(v, v.clone(), starts, 16, torch.Generator().manual_seed(1))
        self.assertLess(aligned.item(), 0.1)
        z = torch.randn(2, 40, 16, generator=g)
        unrelated = alignment_loss(v, z, starts, 16, torch.Generator().manual_seed(1))
        self.assertGreater(unrelated.item(), 0.5 * math.log(8))

    def test_pairwise_loss_all_beyond_border_is_zero(self):
        y = torch.tensor([[1.0, 0.0]])
        s = torch.tensor([[5.0, -5.0]], requires_grad=True)
        loss = pairwise_loss(s, y, torch.ones(1, 2))
        self.assertEqual(loss.item(), 0.0)

    def test_pointwise_loss_weights_and_mask(self):
        logit = torch.tensor([[0.0, 2.0, -1.0]])
        y = torch.tensor([[0.5, 1.0, 0.0]])
        w = torch.tensor([[2.0, 1.0, 0.0]])
        bce = lambda s, t: -(t * math.log(1 / (1 + math.exp(-s))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-s))))  # noqa: E731
        want = (2 * bce(0.0, 0.5) + 1 * bce(2.0, 1.0)) / 3
        self.assertAlmostEqual(pointwise_loss(logit, y, w, (w > 0).float()).item(), want, places=6)


class Hysteresis(unittest.TestCase):
    def test_hand_example(self):
        s = np.array([0.1, 0.9, 0.6, 0.3, 0.6, 0.8, 0.3, 0.2, 0.1, 0.95, 0.2, 0.2, 0.7, 0.9, 0.6])
        # enter 0.8, exit 0.5, hold 2, min 2:
        #   opens at 1; tick 3 < exit, tick 4 back above (one below tick only, hold 2);
        #   6, 7 below -> closes at 6: (1, 6), peak 1.
        #   opens at 9; 10, 11 below -> (9, 10), 1 tick < min 2: dropped.
        #   12 is 0.7 < enter; opens at 13, open at the end -> (13, 15), peak 13.
        self.assertEqual(events(s, 0.8, 0.5, 2, 2), [(1, 6, 1), (13, 15, 13)])
        self.assertEqual(events(s, 0.8, 0.5, 2, 1), [(1, 6, 1), (9, 10, 9), (13, 15, 13)])
        # hold 1: the first tick below exit closes.
        self.assertEqual(events(s, 0.8, 0.5, 1, 1), [(1, 3, 1), (5, 6, 5), (9, 10, 9), (13, 15, 13)])

    def test_match_is_one_to_one(self):
        truth = [(0, 10), (20, 30)]
        pred = [(1, 10), (0, 9), (22, 30), (50, 60)]
        self.assertEqual(match(pred, truth), 2)
        self.assertEqual(match([(0, 4)], [(0, 10)]), 0)  # IoU 0.4

    def test_ranking_metrics(self):
        self.assertAlmostEqual(roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 0.75)
        self.assertAlmostEqual(roc_auc([0.5, 0.5, 0.5], [0, 1, 0]), 0.5)
        self.assertAlmostEqual(average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]), (1 + 2 / 3) / 2)
        self.assertAlmostEqual(ndcg_at([0.9, 0.8, 0.7], [0, 1, 0], k=10), (1 / math.log2(3)) / 1.0)


class Data(unittest.TestCase):
    def test_synthetic_directory_round_trip(self):
        with tempfile.TemporaryDirectory() as d:
            synth.write_dir(d, rooms=2, ticks=60, seed=5, gaps=True)
            rooms = load_dir(d)
            self.assertEqual(len(rooms), 2)
            gap_room = rooms[0]
            self.assertEqual(len(gap_room.rows), 55)
            self.assertEqual(gap_room.segments, [(0, 30), (30, 55)])
            self.assertEqual(rooms[1].segments, [(0, 60)])
            self.assertTrue((np.diff(gap_room.start_ms) > 0).all())
            np.testing.assert_allclose(gap_room.running_mean[0], gap_room.rows[0], rtol=1e-6)
            np.testing.assert_allclose(gap_room.running_mean[10], gap_room.rows[:11].mean(0), rtol=1e-5, atol=1e-5)
            self.assertTrue(rooms[1].truth)
            self.assertTrue(rooms[1].highlight.any())
            ok = rooms[1].impressions > 0
            np.testing.assert_allclose(rooms[1].lvtr[~ok], 0.0)


if __name__ == "__main__":
    unittest.main()
