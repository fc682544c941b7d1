"""The compressed-interest model (src/models/interests.rs runs it online).

A behaviour becomes e = O[bucket(owner)] + W x + c, with x the engine's dense
features (`onair sequences` writes them: src/models/interests.rs `dense`); its
key is phi(K e) with phi = elu + 1 and its value V e. A user's state is
S = sum k v^T and z = sum k over the history; interest j reads it with its
query q_j as h_j = phi(q_j)^T S / phi(q_j)^T z, published as P h_j. Training
scores the next behaviour's owner against every owner row T[b] by the best
interest: max_j <P h_j, T[b]> (the multi-interest retrieval shape).

Not for: data loading or the training loop (train.py).
"""

import json

import torch
import torch.nn.functional as F
from torch import nn

DENSE = 12
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def bucket(owner: str, buckets: int) -> int:
    """FNV-1a (64 bit) of the owner id's UTF-8 bytes, modulo buckets (as the engine)."""
    h = FNV_OFFSET
    for byte in owner.encode("utf-8"):
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h % max(buckets, 1)


class Interests(nn.Module):
    """k interest queries over a behaviour history, by linear attention.

    attention=False is the ablation without it: every key is 1, so each
    interest is the plain mean of the values (and all k are the same).
    """

    def __init__(self, buckets=512, dim=32, key_dim=16, value_dim=32, out_dim=32, k=4,
                 attention=True):
        super().__init__()
        self.config = dict(buckets=buckets, dim=dim, key_dim=key_dim, value_dim=value_dim,
                           out_dim=out_dim, k=k, attention=attention)
        self.owner = nn.Embedding(buckets, dim)
        nn.init.normal_(self.owner.weight, std=0.3)
        self.dense = nn.Linear(DENSE, dim)
        self.key = nn.Linear(dim, key_dim, bias=False)
        self.value = nn.Linear(dim, value_dim, bias=False)
        self.queries = nn.Parameter(torch.randn(k, key_dim))
        self.project = nn.Linear(value_dim, out_dim, bias=False)
        # Training only: what a next behaviour's owner is scored against.
        self.target = nn.Embedding(buckets, out_dim)
        nn.init.normal_(self.target.weight, std=0.1)
        self.attention = attention

    def terms(self, x, b):
        """Keys phi(K e) and values V e of behaviours: x [..., DENSE], b [...]."""
        e = self.owner(b) + self.dense(x)
        v = self.value(e)
        if not self.attention:
            return torch.ones(*e.shape[:-1], self.key.out_features, dtype=e.dtype), v
        return F.elu(self.key(e)) + 1.0, v

    def read(self, s, z):
        """Interests [..., k, out_dim] from sums S [..., key_dim, value_dim], z [..., key_dim]."""
        q = F.elu(self.queries) + 1.0
        num = torch.einsum("jd,...dv->...jv", q, s)
        den = torch.einsum("jd,...d->...j", q, z)
        return self.project(num / den.clamp_min(1e-9).unsqueeze(-1))

    def prefix(self, x, b, mask):
        """Interests after each position (inclusive): [N, L, k, out_dim]."""
        k, v = self.terms(x, b)
        m = mask.unsqueeze(-1).to(k.dtype)
        k, v = k * m, v * m
        s = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
        z = torch.cumsum(k, dim=1)
        return self.read(s, z)

    def scores(self, interests):
        """Every owner row's score by the best interest: [..., buckets]."""
        return torch.einsum("...ko,bo->...kb", interests, self.target.weight).amax(-2)

    def export(self, version, checks):
        """The engine's interests.json (weights row-major, and reference outputs)."""
        c = self.config

        def flat(t):
            return [float(f"{v:.9g}") for v in t.detach().reshape(-1).tolist()]

        return {
            "version": version,
            "buckets": c["buckets"],
            "dense": DENSE,
            "dim": c["dim"],
            "key_dim": c["key_dim"],
            "value_dim": c["value_dim"],
            "out_dim": c["out_dim"],
            "interests": c["k"],
            "owner": flat(self.owner.weight),
            "weight": flat(self.dense.weight),
            "bias": flat(self.dense.bias),
            "key": flat(self.key.weight),
            "value": flat(self.value.weight),
            "queries": flat(self.queries),
            "project": flat(self.project.weight),
            "checks": checks,
        }

    def check(self, dense, owners):
        """A reference sequence for the export: the interests after all of it."""
        with torch.no_grad():
            x = torch.tensor(dense, dtype=torch.float32).unsqueeze(0)
            b = torch.tensor([bucket(o, self.config["buckets"]) for o in owners]).unsqueeze(0)
            out = self.prefix(x, b, torch.ones_like(b, dtype=torch.bool))[0, -1]
        return {"dense": dense, "owners": owners, "interests": [float(v) for v in out.reshape(-1)]}


def save_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
