"""MMBee: gift-sending prediction for (viewer, live room) pairs from the room's content
(MFQ), the viewer's live gifting sequence and its graph expansion (GIE), SIM-style.

Two modules, exported separately (the engine caches MFQ tokens per room segment and runs
the ranker per viewer):

    MFQ (per room and content segment, viewer-independent):
      frames [3, 1280], comments [8, 384], transcripts [2, 384] (+ masks)
        -> standardise (training buffers) -> per-modality MLP -> tokens X_m [n_m, d]
      orthogonal fusion: pooled p_m (masked mean); for each m,
        a_m = sum over o != m of (1 - |cos(p_m, p_o)|) (p_o - (p_o . p_m / |p_m|^2) p_m)
        (the part of the other modalities orthogonal to m, weighted by how little they
        correlate); augmented tokens X_m + W a_m
      cross-attention: X_m (queries) over its augmented tokens (+ a learned null token)
      concatenate the 3 modalities (+ type embeddings), one self-attention block
      queries: table[streamer_index] [N, d] + MLP(streamer graph embedding) (GIE on),
        cross-attention over the fused tokens (+ null), self-attention -> tokens [N, d]
    Ranker (per pair):
      target t = LN(id_embedding[streamer_index] + W graph_s)
      user u = MLP(graph_u)
      live sequence: items W [graph_i, seq_feats_i] -> target attention (query t)
      GIE expansion: items W [graph_j, log1p(score_j)] -> target attention (query t)
      content: query W [t, u] -> attention over the MFQ tokens
      context: standardised scalars + counts from the masks
      MLP over [t, u, t*u, i_seq, t*i_seq, i_exp, t*i_exp, i_content, t*i_content, ctx] -> logit

MFQ has no positional embeddings: within a modality its output does not depend on the
order of the valid tokens (a set; test_model.py checks this). Every attention has a
learned always-valid slot (null token, empty slot), so all-masked inputs give finite
outputs that do not depend on the masked slots' contents.

Ablations: mfq=False drops the content branch (the ranker's `tokens` input is ignored);
gie=False replaces every graph embedding with a learned id embedding (training vocab),
drops the expanded sequence and the user embedding, and MFQ's queries come from the
table only.
"""

import math
import os

import torch
import torch.nn as nn

FRAME, TEXT = 1280, 384
FRAMES, COMMENTS, TRANSCRIPTS = 3, 8, 2
NEG = 1e9  # added (negated) to the scores of masked slots; finite, so no NaN anywhere
EPS = 1e-6

MFQ_INPUTS = ["frames", "frame_mask", "comments", "comment_mask", "transcripts", "transcript_mask",
              "streamer_index", "streamer_graph"]
MFQ_OUTPUTS = ["tokens"]
RANKER_INPUTS = ["tokens", "streamer_index", "streamer_graph", "user_graph", "seq", "seq_feats", "seq_mask",
                 "exp", "exp_scores", "exp_mask", "context"]
RANKER_OUTPUTS = ["probability", "logit"]


def set_threads():
    """torch's CPU threads: $MMBEE_THREADS, default 1 (the machine is shared)."""
    torch.set_num_threads(int(os.environ.get("MMBEE_THREADS", "1")))


def mha(q, k, v, mask, heads, d):
    """Multi-head attention. q [B, Q, d], k, v [B, M, d], mask [B, M] (1.0 real, 0.0
    masked) -> [B, Q, d]. (d is passed, not read from the tensors, so that traced graphs
    keep no shape arithmetic in the scale.)"""
    B, Q = q.shape[0], q.shape[1]
    M = k.shape[1]
    hd = d // heads
    qh = q.reshape(B, Q, heads, hd).transpose(1, 2)
    kh = k.reshape(B, M, heads, hd).transpose(1, 2)
    vh = v.reshape(B, M, heads, hd).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(2, 3)) * (1.0 / math.sqrt(hd))
    scores = scores + (mask[:, None, None, :] - 1.0) * NEG
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)
    return out.transpose(1, 2).reshape(B, Q, d)


class Standardise(nn.Module):
    def __init__(self, width, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(width) if std is None else torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.std


class GraphNorm(Standardise):
    """Standardised graph embeddings; a row of zeros (not in the graph) stays zeros."""

    def forward(self, g):
        known = (g.abs().sum(-1, keepdim=True) > 0).to(g.dtype)
        return (g - self.mean) / self.std * known


def safe_index(index, size):
    """Indices outside [0, size) become 0 (the unknown streamer)."""
    return index * ((index >= 0) & (index < size)).to(index.dtype)


def mlp(a, b, c, dropout=0.0):
    return nn.Sequential(nn.Linear(a, b), nn.GELU(), nn.Dropout(dropout), nn.Linear(b, c))


class Attend(nn.Module):
    """Cross-attention block: x = LN(x + O(attention(Qx, Ky, Vy))), x = LN(x + MLP(x))."""

    def __init__(self, d, heads, dropout=0.0):
        super().__init__()
        self.heads, self.d = heads, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = mlp(d, 2 * d, d, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, y, mask):
        x = self.norm1(x + self.drop(self.o(mha(self.q(x), self.k(y), self.v(y), mask, self.heads, self.d))))
        return self.norm2(x + self.drop(self.mlp(x)))


class Encoder(nn.Module):
    """One modality's tokens: standardise, Linear -> GELU -> Linear -> LayerNorm."""

    def __init__(self, width, d, mean=None, std=None, dropout=0.0):
        super().__init__()
        self.std = Standardise(width, mean, std)
        self.drop = nn.Dropout(dropout)
        self.net = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))

    def forward(self, x):
        return self.net(self.drop(self.std(x)))


def masked_mean(x, mask):
    """x [B, n, d], mask [B, n] -> [B, d] (zeros when all masked)."""
    return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def orthogonal(p, q):
    """The part of p [B, d] orthogonal to q [B, d], weighted by 1 - |cos(p, q)|."""
    dot = (p * q).sum(-1, keepdim=True)
    qq = (q * q).sum(-1, keepdim=True)
    cos = dot / (p.norm(dim=-1, keepdim=True) * q.norm(dim=-1, keepdim=True) + EPS)
    return (1.0 - cos.abs()) * (p - dot / (qq + EPS) * q)


class MFQ(nn.Module):
    """Multi-modal fusion with learnable queries: one room segment -> tokens [N, d]."""

    def __init__(self, d=64, queries=4, graph_dim=32, vocab=1, heads=4, gie=True, stats=None, dropout=0.0):
        super().__init__()
        stats = stats or {}
        self.d, self.n, self.heads, self.gie = d, queries, heads, gie
        self.enc = nn.ModuleList([Encoder(FRAME, d, *stats.get("frame", (None, None)), dropout),
                                  Encoder(TEXT, d, *stats.get("comment", (None, None)), dropout),
                                  Encoder(TEXT, d, *stats.get("transcript", (None, None)), dropout)])
        self.aug = nn.ModuleList([nn.Linear(d, d) for _ in range(3)])
        self.cross = nn.ModuleList([Attend(d, heads, dropout) for _ in range(3)])
        self.kind = nn.Parameter(torch.zeros(3, d))
        self.null = nn.Parameter(torch.zeros(d))
        self.fuse = Attend(d, heads, dropout)
        self.table = nn.Embedding(vocab, queries * d)
        self.gnorm = GraphNorm(graph_dim, *stats.get("graph", (None, None)))
        self.from_graph = mlp(graph_dim, d, queries * d) if gie else None
        self.read = Attend(d, heads, dropout)
        self.mix = Attend(d, heads, dropout)
        nn.init.normal_(self.kind, std=0.1)
        nn.init.normal_(self.null, std=0.1)
        nn.init.normal_(self.table.weight, std=0.1)

    def with_null(self, x, mask):
        B = x.shape[0]
        return (torch.cat([x, self.null.expand(B, 1, self.d)], 1),
                torch.cat([mask, torch.ones_like(mask[:, :1])], 1))

    def forward(self, frames, frame_mask, comments, comment_mask, transcripts, transcript_mask,
                streamer_index, streamer_graph):
        xs = [enc(x) for enc, x in zip(self.enc, (frames, comments, transcripts))]
        masks = [frame_mask, comment_mask, transcript_mask]
        pooled = [masked_mean(x, m) for x, m in zip(xs, masks)]
        fused, fmask = [], []
        for i in range(3):
            a = sum(orthogonal(pooled[j], pooled[i]) for j in range(3) if j != i)
            aug, amask = self.with_null(xs[i] + self.aug[i](a).unsqueeze(1), masks[i])
            fused.append(self.cross[i](xs[i], aug, amask) + self.kind[i])
            fmask.append(masks[i])
        x, mask = torch.cat(fused, 1), torch.cat(fmask, 1)
        kv, kvmask = self.with_null(x, mask)
        x = self.fuse(x, kv, kvmask)
        B = x.shape[0]
        q = self.table(safe_index(streamer_index, self.table.num_embeddings))
        if self.gie:
            q = q + self.from_graph(self.gnorm(streamer_graph))
        q = q.reshape(B, self.n, self.d)
        kv, kvmask = self.with_null(x, mask)
        q = self.read(q, kv, kvmask)
        return self.mix(q, q, torch.ones_like(q[:, :, 0]))


class TargetAttention(nn.Module):
    """One query [B, d] over items [B, M, d] (+ a learned empty slot) -> [B, d]."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.d = heads, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.empty = nn.Parameter(torch.zeros(d))
        nn.init.normal_(self.empty, std=0.1)

    def forward(self, query, items, mask):
        B = query.shape[0]
        items = torch.cat([items, self.empty.expand(B, 1, self.d)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = mha(self.q(query).unsqueeze(1), self.k(items), self.v(items), mask, self.heads, self.d)
        return self.o(out[:, 0])


class Ranker(nn.Module):
    """Scores one (viewer, room) pair: logit [B]."""

    def __init__(self, d=64, graph_dim=32, vocab=1, context=8, heads=4, mfq=True, gie=True, stats=None,
                 dropout=0.1):
        super().__init__()
        stats = stats or {}
        self.d, self.mfq, self.gie = d, mfq, gie
        self.gnorm = GraphNorm(graph_dim, *stats.get("graph", (None, None)))
        self.seq_std = Standardise(3, *stats.get("seq_feats", (None, None)))
        self.exp_std = Standardise(1, *stats.get("exp_scores", (None, None)))
        self.ctx_std = Standardise(context, *stats.get("context", (None, None)))
        self.ids = nn.Embedding(vocab, d)
        nn.init.normal_(self.ids.weight, std=0.1)
        self.target_norm = nn.LayerNorm(d)
        parts = 3  # t, i_seq, t * i_seq
        if gie:
            self.target_graph = nn.Linear(graph_dim, d)
            self.user = mlp(graph_dim, d, d)
            self.seq_item = nn.Linear(graph_dim + 3, d)
            self.exp_item = nn.Linear(graph_dim + 1, d)
            self.exp_att = TargetAttention(d, heads)
            parts += 4  # u, t * u, i_exp, t * i_exp
        else:
            self.seq_feat = nn.Linear(3, d)
        self.seq_norm = nn.LayerNorm(d)
        self.seq_att = TargetAttention(d, heads)
        if mfq:
            self.content_query = nn.Linear(2 * d, d)
            self.content_att = TargetAttention(d, heads)
            parts += 2  # i_content, t * i_content
        # Context: the standardised scalars and three counts the attentions cannot see
        # (softmax pooling forgets how many items there were).
        self.ctx = nn.Linear(context + 3, d)
        self.head = nn.Sequential(nn.Linear((parts + 1) * d, 2 * d), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, tokens, streamer_index, streamer_graph, user_graph, seq, seq_feats, seq_mask,
                exp, exp_scores, exp_mask, context, seq_index=None):
        V = self.ids.num_embeddings
        t = self.ids(safe_index(streamer_index, V))
        if self.gie:
            t = t + self.target_graph(self.gnorm(streamer_graph))
        t = self.target_norm(t)
        feats = self.seq_std(seq_feats)
        if self.gie:
            items = self.seq_item(torch.cat([self.gnorm(seq), feats], -1))
        else:
            items = self.ids(safe_index(seq_index, V)) + self.seq_feat(feats)
        i_seq = self.seq_att(t, self.seq_norm(items), seq_mask)
        parts = [t, i_seq, t * i_seq]
        if self.gie:
            u = self.user(self.gnorm(user_graph))
            scores = self.exp_std(torch.log1p(exp_scores.clamp(min=0.0)).unsqueeze(-1))
            i_exp = self.exp_att(t, self.exp_item(torch.cat([self.gnorm(exp), scores], -1)), exp_mask)
            parts += [u, t * u, i_exp, t * i_exp]
        else:
            u = torch.zeros_like(t)
        if self.mfq:
            q = self.content_query(torch.cat([t, u], -1))
            i_c = self.content_att(q, tokens, torch.ones_like(tokens[:, :, 0]))
            parts += [i_c, t * i_c]
        same = seq_feats[:, :, 2] * seq_mask
        counts = torch.log1p(torch.stack([seq_mask.sum(1), same.sum(1), exp_mask.sum(1)], -1))
        parts.append(self.ctx(torch.cat([self.ctx_std(context), counts], -1)))
        return self.head(torch.cat(parts, -1))[:, 0]


class MMBee(nn.Module):
    """MFQ + ranker, trained together on batches from data.Features.batch."""

    def __init__(self, d=64, queries=4, graph_dim=32, vocab=1, context=8, seq_len=32, exp_len=16, heads=4,
                 mfq=True, gie=True, stats=None, dropout=0.1):
        super().__init__()
        self.cfg = {"d": d, "queries": queries, "graph_dim": graph_dim, "vocab": vocab, "context": context,
                    "seq_len": seq_len, "exp_len": exp_len, "heads": heads, "mfq": mfq, "gie": gie,
                    "dropout": dropout}
        self.mfq = MFQ(d, queries, graph_dim, vocab, heads, gie, stats, dropout) if mfq else None
        self.ranker = Ranker(d, graph_dim, vocab, context, heads, mfq, gie, stats, dropout)

    def config(self):
        return dict(self.cfg)

    def tokens(self, b):
        """MFQ tokens [B, N, d] of each pair (computed once per content key), or zeros."""
        B, c = b["streamer_index"].shape[0], self.cfg
        if self.mfq is None:
            return torch.zeros(B, c["queries"], c["d"])
        t = self.mfq(b["frames"], b["frame_mask"], b["comments"], b["comment_mask"], b["transcripts"],
                     b["transcript_mask"], b["mfq_streamer_index"], b["mfq_streamer_graph"])
        return t[b["mfq_of"]]

    def forward(self, b):
        return self.ranker(self.tokens(b), b["streamer_index"], b["streamer_graph"], b["user_graph"], b["seq"],
                           b["seq_feats"], b["seq_mask"], b["exp"], b["exp_scores"], b["exp_mask"], b["context"],
                           b["seq_index"])


class RankerExport(nn.Module):
    """The exported ranker: the contract's inputs, (probability, logit)."""

    def __init__(self, ranker):
        super().__init__()
        if not ranker.gie:
            raise ValueError("a ranker without GIE reads sequence vocab indices, which the export contract has not")
        self.ranker = ranker

    def forward(self, tokens, streamer_index, streamer_graph, user_graph, seq, seq_feats, seq_mask, exp,
                exp_scores, exp_mask, context):
        logit = self.ranker(tokens, streamer_index, streamer_graph, user_graph, seq, seq_feats, seq_mask, exp,
                            exp_scores, exp_mask, context)
        return torch.sigmoid(logit), logit


def to_tensors(b):
    return {k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in b.items()}
