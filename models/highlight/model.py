"""The highlight model: per-tick scores from the engine's feature rows, causal and online.

Layout of the computation, per tick i of a room (every step sees only ticks <= i):

    x_i (raw row, 2120)  --standardise-->  visual side (image, log-mel, 6 scalars)  -> v_i  (h)
                                            text side  (comments, speech, 2 counts) -> z_i  (h)
    streamer_i (running mean of raw rows 0..i)  --same first layers-->              -> s_i  (h)
    MTAM:       z~_i = attention(query v_i, keys/values z_{i-n+1..i}, learned lag bias)
                e_i  = [v_i, z~_i]                                                      (2h)
    Perceiver:  q = s_i; L times q = block(q, [e_{i-n+1..i} + lag embedding, s_i])    -> p_i (h)
    Decoder:    d_i = attention(p_i over p_{i-n+1..i} + lag embedding), MLP          -> logit s_i

Every attention reads a window of exactly n slots ending at i; slots before the room's
first tick are masked. The full-sequence forward (training, evaluation) and the one-tick
`Step` (export, the engine) share the same window functions, so they agree to float
rounding. A logit depends on at most the last 3(n-1)+1 rows (z: 1 row, e: n rows,
p: 2n-1 rows, logit: 3n-2 rows): `context(n)` is the number of rows a training window
needs before its first scored tick.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 2120
# Row layout (see README.md).
IMAGE = (0, 1280)
COMMENTS = (1280, 1664)
SPEECH = (1664, 2048)
MEL = (2048, 2112)
SCALARS = (2112, 2120)  # frames, comments, transcripts, audio_s, rms, peak, speech_ratio, has_audio
SCALAR_NAMES = ["frames", "comments", "transcripts", "audio_seconds", "rms_dbfs", "peak_dbfs",
                "speech_ratio", "has_audio"]
# The visual side: image embedding, log-mel means and stds, and the frame count, audio
# seconds, rms, peak, speech ratio and has_audio scalars (2112 and 2115..2119).
VISUAL_WIDTH = 1280 + 64 + 1 + 5
# The text side: comment and transcript embeddings, and the comment and transcript counts.
TEXT_WIDTH = 384 + 384 + 2
NEG = 1e9  # added (negated) to the scores of masked slots; finite, so no NaN anywhere


def set_threads():
    """torch's CPU threads: $HIGHLIGHT_THREADS, default 2. On a machine whose cores are
    busy with other work, 1 can be several times faster (2 threads wait on each other)."""
    torch.set_num_threads(int(os.environ.get("HIGHLIGHT_THREADS", "2")))


def merge_text(x):
    """Raw rows [..., D] with one text embedding per tick: the mean of the comment and
    transcript embeddings the tick has (both multilingual-e5, one space), in the comment
    slot; the transcript slot zeroed. The training data has no transcripts (speech
    recognition is too slow to generate it on a small machine), so the model never
    learns weights of its own for that slot, and transcripts still count online."""
    has_c = (x[..., 2113:2114] > 0).to(x.dtype)
    has_s = (x[..., 2114:2115] > 0).to(x.dtype)
    text = (x[..., 1280:1664] * has_c + x[..., 1664:2048] * has_s) / torch.clamp(has_c + has_s, min=1.0)
    return torch.cat([x[..., 0:1280], text, torch.zeros_like(x[..., 1664:2048]), x[..., 2048:]], dim=-1)


def split_sides(xs):
    """Standardised rows [..., D] -> (visual [..., 1350], text [..., 770])."""
    visual = torch.cat([xs[..., 0:1280], xs[..., 2048:2113], xs[..., 2115:2120]], dim=-1)
    text = torch.cat([xs[..., 1280:2048], xs[..., 2113:2115]], dim=-1)
    return visual, text


def context(window):
    """Rows a training window needs before its first scored tick (see the module doc)."""
    return 3 * (window - 1)


def windows(seq, n):
    """[B, T, d] -> [B, T, n, d]: for each position the n positions ending at it, oldest
    first, zeros before the start. [B, T] -> [B, T, n] likewise."""
    if seq.dim() == 2:
        return F.pad(seq, (n - 1, 0)).unfold(1, n, 1)
    return F.pad(seq, (0, 0, n - 1, 0)).unfold(1, n, 1).transpose(2, 3)


def attend(q, k, v, valid, heads, width, bias=None):
    """Multi-head attention of one query per row over m slots.

    q [N, width], k [N, m, width], v [N, m, width], valid [N, m] (1.0 real, 0.0 masked),
    bias [heads, m] or None. Returns [N, width]. (width is passed, not read from the
    tensors, so that traced graphs keep no shape arithmetic.)"""
    m = k.shape[1]
    hd = width // heads
    qh = q.reshape(-1, heads, 1, hd)
    kh = k.reshape(-1, m, heads, hd).transpose(1, 2)
    vh = v.reshape(-1, m, heads, hd).transpose(1, 2)
    # (indexing, not squeeze: the ONNX export turns a squeeze of a dynamic shape into an If)
    scores = torch.matmul(qh, kh.transpose(2, 3))[:, :, 0] * (1.0 / math.sqrt(hd))  # [N, heads, m]
    if bias is not None:
        scores = scores + bias
    scores = scores + (valid.unsqueeze(1) - 1.0) * NEG
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.unsqueeze(2), vh)[:, :, 0]  # [N, heads, width/heads]
    return out.reshape(-1, width)


class Encoder(nn.Module):
    """One side's projection: Linear -> GELU -> Linear -> LayerNorm."""

    def __init__(self, width, hidden):
        super().__init__()
        self.inp = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.norm(self.out(F.gelu(self.inp(x))))


class MTAM(nn.Module):
    """Modality temporal alignment: the frame v_i reads the text of the last n ticks, with
    one learned bias per lag (lag_bias[k] is the bias for text k ticks older than the
    frame), so it can learn how far chat trails the picture."""

    def __init__(self, hidden, window):
        super().__init__()
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.lag_bias = nn.Parameter(torch.zeros(window))
        self.hidden = hidden

    def project(self, z):
        """Keys and values of text tokens [..., h] (per tick, before windowing)."""
        return self.k(z), self.v(z)

    def forward(self, v, kw, vw, valid):
        bias = self.lag_bias.flip(0).unsqueeze(0)  # slot order: oldest (lag n-1) first
        return self.norm(self.o(attend(self.q(v), kw, vw, valid, 1, self.hidden, bias)))

    def weights(self, v, kw, valid):
        """Attention weights [N, n] (slot order), for the card's lag report."""
        bias = self.lag_bias.flip(0).unsqueeze(0)
        scores = (kw @ self.q(v).unsqueeze(-1)).squeeze(-1) * (1.0 / math.sqrt(self.hidden))
        return torch.softmax(scores + bias + (valid - 1.0) * NEG, dim=-1)


class PerceiverBlock(nn.Module):
    """Cross-attention from the query (the streamer embedding, then the previous block's
    output) to the window's e tokens (keys get a learned lag embedding) and the streamer
    token, then an MLP; residuals with post layer norm."""

    def __init__(self, hidden, window, heads):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.q = nn.Linear(hidden, hidden)
        self.k_e = nn.Linear(2 * hidden, hidden)
        self.v_e = nn.Linear(2 * hidden, hidden)
        self.k_s = nn.Linear(hidden, hidden)
        self.v_s = nn.Linear(hidden, hidden)
        self.lag = nn.Parameter(torch.zeros(window, hidden))  # slot order, oldest first
        self.s_pos = nn.Parameter(torch.zeros(hidden))
        self.o = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        nn.init.normal_(self.lag, std=0.02)

    def project(self, e):
        """Keys and values of e tokens [..., 2h] (per tick, before windowing)."""
        return self.k_e(e), self.v_e(e)

    def forward(self, q, kw, vw, s, valid):
        k = torch.cat([kw + self.lag, (self.k_s(s) + self.s_pos).unsqueeze(1)], dim=1)
        v = torch.cat([vw, self.v_s(s).unsqueeze(1)], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        q = self.norm1(q + self.o(attend(self.q(q), k, v, valid, self.heads, self.hidden)))
        return self.norm2(q + self.mlp(q))


class Decoder(nn.Module):
    """Causal self-attention of p_i over p_{i-n+1..i} (lag embedding on the keys), MLP,
    and a linear head to the logit."""

    def __init__(self, hidden, window, heads):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.lag = nn.Parameter(torch.zeros(window, hidden))
        self.o = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.lag, std=0.02)

    def project(self, p):
        return self.k(p), self.v(p)

    def forward(self, p, kw, vw, valid):
        d = self.norm1(p + self.o(attend(self.q(p), kw + self.lag, vw, valid, self.heads, self.hidden)))
        d = self.norm2(d + self.mlp(d))
        return self.head(d)[:, 0]


class Highlight(nn.Module):
    def __init__(self, window=32, layers=2, hidden=64, heads=4, mtam=True, mean=None, std=None, dropout=0.0):
        super().__init__()
        # Dropout on the standardised rows (training only; the exported step has none):
        # the input layers are most of the weights and see few rooms.
        self.drop = nn.Dropout(dropout)
        self.window, self.layers, self.hidden, self.heads, self.use_mtam = window, layers, hidden, heads, mtam
        self.register_buffer("mean", torch.zeros(D) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(D) if std is None else torch.as_tensor(std, dtype=torch.float32))
        self.enc_v = Encoder(VISUAL_WIDTH, hidden)
        self.enc_z = Encoder(TEXT_WIDTH, hidden)
        # The streamer embedding reuses the two encoders' first layers (a linear map of a
        # mean is the mean of the linear maps), then its own small MLP.
        self.enc_s = nn.Sequential(nn.GELU(), nn.Linear(2 * hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden), nn.LayerNorm(hidden))
        self.mtam = MTAM(hidden, window) if mtam else None
        self.blocks = nn.ModuleList([PerceiverBlock(hidden, window, heads) for _ in range(layers)])
        self.decoder = Decoder(hidden, window, heads)

    @property
    def dims(self):
        return {"x": D, "z": self.hidden, "e": 2 * self.hidden, "p": self.hidden}

    def config(self):
        return {"window": self.window, "layers": self.layers, "hidden": self.hidden,
                "heads": self.heads, "mtam": self.use_mtam}

    def standardise(self, x):
        return (x - self.mean) / self.std

    def encode(self, x):
        visual, text = split_sides(self.drop(self.standardise(merge_text(x))))
        return self.enc_v(visual), self.enc_z(text)

    def encode_streamer(self, m):
        visual, text = split_sides(self.drop(self.standardise(merge_text(m))))
        return self.enc_s(torch.cat([self.enc_v.inp(visual), self.enc_z.inp(text)], dim=-1))

    # Each attention projects its tokens to keys and values per tick and then reads
    # windows of them: `win` maps per-tick tensors [..., d] to [N, n, d] windows (the
    # full forward unfolds the sequence; the step concatenates history and newest tick).

    def align(self, v, z, win, valid):
        """z~ for each row: the MTAM output, or the current text z when MTAM is off."""
        if not self.use_mtam:
            return z
        k, val = self.mtam.project(z)
        return self.mtam(v, win(k), win(val), valid)

    def perceive(self, s, e, win, valid):
        q = s
        for block in self.blocks:
            k, v = block.project(e)
            q = block(q, win(k), win(v), s, valid)
        return q

    def decode(self, p, tokens, win, valid):
        """Logits of the queries p [N, h] over windows of the p tokens."""
        k, v = self.decoder.project(tokens)
        return self.decoder(p, win(k), win(v), valid)

    def forward(self, x, streamer, valid):
        """Full sequences: x, streamer [B, T, D], valid [B, T] (1.0 for real rows; rows
        before a sequence's start are treated as absent). Returns a dict of
        logit [B, T], v, z, p [B, T, h], e [B, T, 2h]."""
        B, T, _ = x.shape
        n, h = self.window, self.hidden
        v, z = self.encode(x)
        s = self.encode_streamer(streamer)
        vw = windows(valid, n).reshape(-1, n)

        def win(t):  # [B, T, d] -> [B*T, n, d]
            return windows(t, n).reshape(B * T, n, t.shape[-1])

        zt = self.align(v.reshape(-1, h), z, win, vw)
        e = torch.cat([v, zt.reshape(B, T, h)], dim=-1)
        p = self.perceive(s.reshape(-1, h), e, win, vw).reshape(B, T, h)
        logit = self.decode(p.reshape(-1, h), p, win, vw).reshape(B, T)
        return {"logit": logit, "v": v, "z": z, "e": e, "p": p}


class Step(nn.Module):
    """The online step: the newest tick of each room from cached histories.

    Inputs: x, streamer [B, D]; z_hist [B, n-1, h]; e_hist [B, n-1, 2h];
    p_hist [B, n-1, h]; valid [B, n-1] (oldest first; empty slots at the front are 0.0).
    Outputs: score, logit [B]; z [B, h]; e [B, 2h]; p [B, h]."""

    INPUTS = ["x", "streamer", "z_hist", "e_hist", "p_hist", "valid"]
    OUTPUTS = ["score", "logit", "z", "e", "p"]

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, streamer, z_hist, e_hist, p_hist, valid):
        m = self.model
        v, z = m.encode(x)
        s = m.encode_streamer(streamer)
        vw = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        zs = torch.cat([z_hist, z.unsqueeze(1)], dim=1)  # [B, n, h], oldest first
        zt = m.align(v, zs[:, -1] if not m.use_mtam else zs, lambda t: t, vw)
        e = torch.cat([v, zt], dim=-1)
        p = m.perceive(s, torch.cat([e_hist, e.unsqueeze(1)], dim=1), lambda t: t, vw)
        logit = m.decode(p, torch.cat([p_hist, p.unsqueeze(1)], dim=1), lambda t: t, vw)
        return torch.sigmoid(logit), logit, z, e, p


# ---- losses

def pointwise_loss(logit, y, weight, mask):
    """BCE between sigmoid(logit) and the lvtr y, weighted by impressions, over mask."""
    w = weight * mask
    total = w.sum()
    if total <= 0:
        return logit.sum() * 0.0
    return (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * w).sum() / total


def pairwise_loss(logit, y, mask):
    """Border-aware pairwise loss within each sequence (row of the batch).

    Over labelled pairs with y_i > y_j, keep those with (y_i - y_j) - (s_i - s_j) >= 0
    (wrong order, or right order by less than the label gap) and average
    -log sigmoid(s_i - s_j) over the kept pairs; pairs beyond the border add nothing."""
    dy = y.unsqueeze(2) - y.unsqueeze(1)
    ds = logit.unsqueeze(2) - logit.unsqueeze(1)
    m = mask > 0
    pairs = m.unsqueeze(2) & m.unsqueeze(1) & (dy > 0)
    keep = pairs & ((dy - ds.detach()) >= 0)
    if not bool(keep.any()):
        return logit.sum() * 0.0
    return -F.logsigmoid(ds[keep]).mean()


def soft_dtw(cost, gamma):
    """Soft-DTW value of each cost matrix [N, a, b] (Cuturi and Blondel's recursion
    R[i,j] = C[i,j] + softmin_gamma(R[i-1,j-1], R[i-1,j], R[i,j-1])), computed one
    anti-diagonal at a time. Returns [N]."""
    N, a, b = cost.shape
    big = 1e10
    i = torch.arange(a + 1, device=cost.device)
    prev2 = torch.full((N, a + 1), big, dtype=cost.dtype, device=cost.device)
    prev2[:, 0] = 0.0  # diagonal 0: R[0,0]
    prev1 = torch.full((N, a + 1), big, dtype=cost.dtype, device=cost.device)  # diagonal 1
    pad = torch.full((N, 1), big, dtype=cost.dtype, device=cost.device)
    for k in range(2, a + b + 1):
        j = k - i
        inside = (i >= 1) & (j >= 1) & (j <= b)
        c = cost[:, (i - 1).clamp(0, a - 1), (j - 1).clamp(0, b - 1)]
        up = torch.cat([pad, prev1[:, :-1]], dim=1)  # R[i-1, j]
        left = prev1  # R[i, j-1]
        diag = torch.cat([pad, prev2[:, :-1]], dim=1)  # R[i-1, j-1]
        soft = -gamma * torch.logsumexp(torch.stack([diag, up, left], dim=-1) / -gamma, dim=-1)
        prev2, prev1 = prev1, torch.where(inside, c + soft, torch.full_like(c, big))
    return prev1[:, a]


def alignment_loss(v, z, starts, width, generator, perms=7, gamma=0.1):
    """MTAM's alignment loss. For each (batch row, start) window of `width` ticks, the soft-DTW
    of the cosine-distance matrix between the text sequence z and the frame sequence v must
    be lower for the true frame order than for `perms` random permutations of it:
    cross-entropy on the logits -softDTW with the true order as class 0.

    v, z [B, T, h]; starts: list of (batch row, first tick)."""
    if not starts:
        return v.sum() * 0.0
    rows = torch.tensor([r for r, _ in starts])
    idx = torch.tensor([t for _, t in starts]).unsqueeze(1) + torch.arange(width)
    zs = F.normalize(z[rows.unsqueeze(1), idx], dim=-1)  # [W, w, h]
    vs = F.normalize(v[rows.unsqueeze(1), idx], dim=-1)
    order = [torch.arange(width).expand(len(starts), width)]
    for _ in range(perms):
        order.append(torch.stack([torch.randperm(width, generator=generator) for _ in starts]))
    order = torch.stack(order, dim=1)  # [W, 1+perms, w]
    vp = vs[torch.arange(len(starts)).view(-1, 1, 1), order]  # [W, 1+perms, w, h]
    cost = 1.0 - torch.einsum("wih,wkjh->wkij", zs, vp)
    sdtw = soft_dtw(cost.reshape(-1, width, width), gamma).reshape(len(starts), 1 + perms)
    return F.cross_entropy(-sdtw, torch.zeros(len(starts), dtype=torch.long))
