"""Tests of the compressed-interest model (python -m unittest, from scripts/interests test)."""

import unittest

import torch

from model import DENSE, Interests, bucket


class ModelTest(unittest.TestCase):
    def test_bucket_is_fnv1a_64(self):
        # The published FNV-1a 64 test vector for "a".
        self.assertEqual(bucket("a", 1 << 64), 0xAF63DC4C8601EC8C)
        self.assertEqual(bucket("", 7), 0xCBF29CE484222325 % 7)

    def test_prefix_equals_adding_terms_one_by_one(self):
        torch.manual_seed(0)
        m = Interests(buckets=16, k=3)
        x = torch.rand(2, 5, DENSE)
        b = torch.randint(0, 16, (2, 5))
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
        got = m.prefix(x, b, mask)
        for n in range(2):
            s = torch.zeros(16, 32)
            z = torch.zeros(16)
            for t in range(int(mask[n].sum())):
                k, v = m.terms(x[n, t], b[n, t])
                s += torch.outer(k, v)
                z += k
                torch.testing.assert_close(got[n, t], m.read(s, z), rtol=1e-5, atol=1e-5)

    def test_a_changed_term_is_replaced_exactly_by_subtracting_it(self):
        torch.manual_seed(1)
        m = Interests(buckets=8).double()
        xs = torch.rand(4, DENSE, dtype=torch.float64)
        bs = torch.tensor([1, 2, 3, 1])
        k, v = m.terms(xs, bs)
        s = (k.unsqueeze(-1) * v.unsqueeze(-2)).sum(0)
        z = k.sum(0)
        changed = xs[2].clone()
        changed[5] = 1.0
        k2, v2 = m.terms(changed, bs[2])
        s2 = s - torch.outer(k[2], v[2]) + torch.outer(k2, v2)
        z2 = z - k[2] + k2
        xs[2] = changed
        k3, v3 = m.terms(xs, bs)
        torch.testing.assert_close(s2, (k3.unsqueeze(-1) * v3.unsqueeze(-2)).sum(0))
        torch.testing.assert_close(z2, k3.sum(0))

    def test_export_has_every_weight_in_the_engine_layout(self):
        m = Interests(buckets=8, dim=4, key_dim=3, value_dim=5, out_dim=6, k=2)
        check = m.check([[0.5] * DENSE, [0.0] * DENSE], ["a", "b"])
        e = m.export(7, [check])
        self.assertEqual(len(e["owner"]), 8 * 4)
        self.assertEqual(len(e["weight"]), 4 * DENSE)
        self.assertEqual(len(e["key"]), 3 * 4)
        self.assertEqual(len(e["value"]), 5 * 4)
        self.assertEqual(len(e["queries"]), 2 * 3)
        self.assertEqual(len(e["project"]), 6 * 5)
        self.assertEqual(len(check["interests"]), 2 * 6)
        # Row-major [out, in]: the first row of the dense weight is output 0's.
        self.assertAlmostEqual(e["weight"][1], float(m.dense.weight[0, 1]), places=6)

    def test_without_attention_every_interest_is_the_mean_value(self):
        torch.manual_seed(2)
        m = Interests(buckets=8, k=1, attention=False)
        x = torch.rand(1, 3, DENSE)
        b = torch.tensor([[1, 2, 3]])
        out = m.prefix(x, b, torch.ones(1, 3, dtype=torch.bool))[0, -1, 0]
        _, v = m.terms(x[0], b[0])
        torch.testing.assert_close(out, m.project(v.mean(0)), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
