"""Exports a trained MMBee checkpoint as the engine's two online models.

    python export.py --checkpoint CKPT --out DIR [--metrics metrics.json] [--version 1]

Writes DIR/mfq.onnx and DIR/ranker.onnx (opset 17, dynamic batch), DIR/mfq.pt and
DIR/ranker.pt (TorchScript, traced) and DIR/mmbee.json (format "mmbee-v1": dims, input
and output names in graph order with shapes and meanings, the streamer vocabulary, the
context features' definitions, the content layout, the graph version and training data,
and a "card" with every method's test metrics from evaluate.py's --metrics).

Only a model with both MFQ and GIE exports (the contract feeds graph embeddings and MFQ
tokens; the ablations are for the card). Checks before anything is written: the ONNX
files pass onnx.checker, and they (run by onnxruntime when it is importable, else by
onnx's reference evaluator) and the TorchScript modules reproduce the eager model within
1e-4 at batch 1, 2 and 5, on inputs that include an empty content segment (all masks
0), an unknown streamer (index 0, zero graph row), an unknown user, empty sequences and
an out-of-vocabulary index.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import CONTEXT, COLS, LAYOUT, SEQ_FEATURES, WIDTH  # noqa: E402
from model import (COMMENTS, FRAME, FRAMES, MFQ_INPUTS, MFQ_OUTPUTS, RANKER_INPUTS, RANKER_OUTPUTS,  # noqa: E402
                   TEXT, TRANSCRIPTS, RankerExport, set_threads)

TOLERANCE = 1e-4


def prefix_mask(g, batch, n):
    """[batch, n] masks with the first k slots set, k uniform in 0..n."""
    k = torch.randint(0, n + 1, (batch,), generator=g)
    return (torch.arange(n)[None, :] < k[:, None]).float()


def mfq_example(model, batch, seed):
    """MFQ inputs: rows drawn around the training means; row 0 is an empty segment of an
    unknown streamer, row 1 (if any) has an out-of-vocabulary index."""
    m, c = model.mfq, model.config()
    g = torch.Generator().manual_seed(seed)

    def tok(enc, n, width):
        return (enc.std.mean + enc.std.std * torch.randn(batch, n, width, generator=g)).clamp(min=-5.0)

    frames = tok(m.enc[0], FRAMES, FRAME)
    comments = tok(m.enc[1], COMMENTS, TEXT)
    transcripts = tok(m.enc[2], TRANSCRIPTS, TEXT)
    fm, cm, tm = prefix_mask(g, batch, FRAMES), prefix_mask(g, batch, COMMENTS), prefix_mask(g, batch, TRANSCRIPTS)
    index = torch.randint(0, c["vocab"], (batch,), generator=g)
    graph = torch.randn(batch, c["graph_dim"], generator=g) * 0.3
    fm[0], cm[0], tm[0], index[0], graph[0] = 0.0, 0.0, 0.0, 0, 0.0
    for x, mk in ((frames, fm), (comments, cm), (transcripts, tm)):
        x[mk == 0] = 0.0  # the contract: unused slots are zeros
    if batch > 1:
        index[1] = c["vocab"] + 7
    return frames, fm, comments, cm, transcripts, tm, index, graph


def ranker_example(model, batch, seed):
    """Ranker inputs; row 0 has empty sequences, an unknown streamer and an unknown user."""
    c = model.config()
    g = torch.Generator().manual_seed(seed)
    G, L, K = c["graph_dim"], c["seq_len"], c["exp_len"]
    tokens = torch.randn(batch, c["queries"], c["d"], generator=g)
    index = torch.randint(0, c["vocab"], (batch,), generator=g)
    sg, ug = torch.randn(batch, G, generator=g) * 0.3, torch.randn(batch, G, generator=g) * 0.3
    seq_mask, exp_mask = prefix_mask(g, batch, L), prefix_mask(g, batch, K)
    seq = torch.randn(batch, L, G, generator=g) * 0.3 * seq_mask[..., None]
    feats = torch.stack([torch.rand(batch, L, generator=g) * 7, torch.rand(batch, L, generator=g) * 5,
                         (torch.rand(batch, L, generator=g) < 0.3).float()], -1) * seq_mask[..., None]
    exp = torch.randn(batch, K, G, generator=g) * 0.3 * exp_mask[..., None]
    scores = torch.rand(batch, K, generator=g) * exp_mask
    context = torch.rand(batch, c["context"], generator=g) * 3
    index[0], sg[0], ug[0], seq_mask[0], exp_mask[0], seq[0], feats[0], exp[0], scores[0] = 0, 0, 0, 0, 0, 0, 0, 0, 0
    return tokens, index, sg, ug, seq, feats, seq_mask, exp, scores, exp_mask, context


def max_diff(a, b):
    return max(float(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max()) for u, v in zip(a, b))


def onnx_runner(path):
    """run(feeds) -> outputs, with onnxruntime when it is importable, else onnx's reference
    evaluator (numpy); and the runner's name."""
    try:
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return (lambda feeds: sess.run(None, feeds)), "onnxruntime"
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator
        ref = ReferenceEvaluator(onnx.load(path))
        return (lambda feeds: ref.run(None, feeds)), "onnx reference evaluator"


def export_pair(module, make, names_in, names_out, onnx_path, pt_path, log, batches=(1, 2, 5)):
    """Exports one module to ONNX and TorchScript and checks both against eager torch on
    make(batch, seed) inputs. Returns the largest difference seen."""
    import onnx
    module.eval()
    ex = make(3, 0)
    with torch.no_grad():
        want = {b: [o.numpy() for o in as_tuple(module(*make(b, 100 + b)))] for b in batches}
    torch.onnx.export(module, ex, onnx_path, input_names=names_in, output_names=names_out,
                      dynamic_axes={k: {0: "batch"} for k in names_in + names_out},
                      opset_version=17, do_constant_folding=True, dynamo=False)
    graph = onnx.load(onnx_path)
    onnx.checker.check_model(graph, full_check=True)
    got_in, got_out = [i.name for i in graph.graph.input], [o.name for o in graph.graph.output]
    if got_in != names_in or got_out != names_out:
        raise SystemExit(f"export: {onnx_path}: names {got_in} -> {got_out}, want {names_in} -> {names_out}")
    run, runner = onnx_runner(onnx_path)
    worst = 0.0
    for b, outs in want.items():
        feeds = {k: v.numpy() for k, v in zip(names_in, make(b, 100 + b))}
        d = max_diff(run(feeds), outs)
        if not d < TOLERANCE:
            raise SystemExit(f"export: {os.path.basename(onnx_path)} ({runner}) differs from torch by {d} at batch {b}")
        log(f"{os.path.basename(onnx_path)} ({runner}), batch {b}: max |diff| {d:.2e}")
        worst = max(worst, d)
    traced = torch.jit.trace(module, ex, check_trace=False)
    torch.jit.save(traced, pt_path)
    loaded = torch.jit.load(pt_path)
    for b, outs in want.items():
        with torch.no_grad():
            d = max_diff([o.numpy() for o in as_tuple(loaded(*make(b, 100 + b)))], outs)
        if not d < TOLERANCE:
            raise SystemExit(f"export: {os.path.basename(pt_path)} differs from torch by {d} at batch {b}")
        log(f"{os.path.basename(pt_path)}, batch {b}: max |diff| {d:.2e}")
        worst = max(worst, d)
    return worst


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def graph_method(meta):
    """How the graph's embeddings were made: the engine's graph job writes
    `embeddings.method` (and its report), the fixture a top-level `method`."""
    emb = meta.get("embeddings")
    if isinstance(emb, dict) and emb.get("method"):
        return {"method": emb["method"], "params": emb.get("params"), "report": emb.get("report")}
    return meta.get("method")


def graph_inputs(meta):
    """What the graph was built from: the engine's `inputs` (gift files), the fixture's `built_from`."""
    inputs = [os.path.basename(os.path.dirname(os.path.dirname(k)))
              for k, v in (meta.get("inputs") or {}).items() if isinstance(v, dict)]
    return sorted(inputs) or meta.get("built_from")


def card(path):
    """Every method's test metrics from evaluate.py's metrics.json."""
    if not path:
        return None
    with open(path) as f:
        m = json.load(f)
    keep = ("auc", "uauc", "gauc", "logloss", "positive_rate", "mean_probability", "pairs", "users",
            "users_both_classes")
    return {"source": os.path.basename(path), "days": m["days"], "test_pairs": m["test_pairs"],
            "test_positive_rate": m["test_positive_rate"],
            "methods": {k: {f: v.get(f) for f in keep} for k, v in m["methods"].items()}}


def contract(model, vocab, context):
    """Input/output shapes and meanings of both files (mmbee.json's "mfq" and "ranker")."""
    c = model.config()
    N, d, G, L, K, C = c["queries"], c["d"], c["graph_dim"], c["seq_len"], c["exp_len"], c["context"]
    graph_row = ("the node's row of embeddings.f32 in the graph version `graph.version` (nodes.tsv order); "
                 "zeros when the node is not in the graph")
    mfq = {
        "inputs": MFQ_INPUTS, "outputs": MFQ_OUTPUTS,
        "shapes": {"frames": ["batch", FRAMES, FRAME], "frame_mask": ["batch", FRAMES],
                   "comments": ["batch", COMMENTS, TEXT], "comment_mask": ["batch", COMMENTS],
                   "transcripts": ["batch", TRANSCRIPTS, TEXT], "transcript_mask": ["batch", TRANSCRIPTS],
                   "streamer_index": ["batch"], "streamer_graph": ["batch", G], "tokens": ["batch", N, d]},
        "dtypes": {k: ("int64" if k == "streamer_index" else "float32") for k in MFQ_INPUTS + MFQ_OUTPUTS},
        "meaning": {
            "frames": "the content row's columns 0..3840 as [3, 1280] (MobileNetV2 pooled)",
            "comments": "columns 3840..6912 as [8, 384] (e5-small, L2-normalised)",
            "transcripts": "columns 6912..7680 as [2, 384]",
            "frame_mask": "1.0 for the first `frames` slots (the content line's count), else 0.0; likewise "
                          "comment_mask (comment_tokens) and transcript_mask (transcript_tokens)",
            "streamer_index": "1 + the streamer's position in `vocab`; 0 when it is not there",
            "streamer_graph": "the streamer's graph embedding: " + graph_row,
            "tokens": "the segment's content representation; viewer-independent: compute once per room "
                      "segment and reuse for every viewer",
            "no_segment": "a room with no segment ending at or before t: run MFQ on zeros with all masks "
                          "0.0 (the model has a learned null token for this)",
        },
        "order": "within a modality the output does not depend on the order of the valid slots",
    }
    ranker = {
        "inputs": RANKER_INPUTS, "outputs": RANKER_OUTPUTS,
        "shapes": {"tokens": ["batch", N, d], "streamer_index": ["batch"], "streamer_graph": ["batch", G],
                   "user_graph": ["batch", G], "seq": ["batch", L, G], "seq_feats": ["batch", L, 3],
                   "seq_mask": ["batch", L], "exp": ["batch", K, G], "exp_scores": ["batch", K],
                   "exp_mask": ["batch", K], "context": ["batch", C], "probability": ["batch"],
                   "logit": ["batch"]},
        "dtypes": {k: ("int64" if k == "streamer_index" else "float32") for k in RANKER_INPUTS + RANKER_OUTPUTS},
        "meaning": {
            "tokens": "MFQ tokens of the room's latest content segment ending at or before t",
            "streamer_index": "as in mfq (the candidate streamer: the room's)",
            "streamer_graph": "the candidate streamer's graph embedding: " + graph_row,
            "user_graph": "the viewer's graph embedding: " + graph_row,
            "seq": f"the viewer's last {L} gifts (any room) with t_ms strictly before t, most recent "
                   "first, in the first slots: each gift's streamer's graph embedding (zeros when that "
                   "streamer is not in the graph); empty slots zeros",
            "seq_feats": f"per slot: {SEQ_FEATURES}, value = the gift's value, age_hours = (t - gift "
                         "t_ms) / 3,600,000, same_streamer = 1.0 when the gift's streamer is the "
                         "candidate streamer; empty slots zeros",
            "seq_mask": "1.0 for filled slots, 0.0 for empty ones",
            "exp": f"the first {K} entries of the viewer's `expanded` list in neighbors.jsonl (in file "
                   "order): each streamer's graph embedding; empty slots zeros",
            "exp_scores": "the raw scores of those entries (the model takes log1p(max(score, 0)))",
            "exp_mask": "1.0 for filled slots",
            "context": "the features named in `context` in that order, raw (standardised inside)",
            "probability": "P(the viewer sends >= 1 gift in this room within (t, t + horizon])",
            "logit": "the logit of probability",
        },
    }
    return mfq, ranker


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", help="evaluate.py's metrics.json, for the card")
    ap.add_argument("--version", type=int, default=1)
    args = ap.parse_args()
    set_threads()
    from train import load_checkpoint

    model, ck = load_checkpoint(args.checkpoint)
    c = model.config()
    if not (c["mfq"] and c["gie"]):
        raise SystemExit(f"export: {args.checkpoint} is an ablation ({ck['train']['name']}); only the full model exports")
    log = lambda s: print(f"export: {s}", file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    ranker = RankerExport(model.ranker).eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: os.path.join(tmp, k) for k in ("mfq.onnx", "mfq.pt", "ranker.onnx", "ranker.pt")}
        d1 = export_pair(model.mfq, lambda b, s: mfq_example(model, b, s), MFQ_INPUTS, MFQ_OUTPUTS,
                         files["mfq.onnx"], files["mfq.pt"], log)
        d2 = export_pair(ranker, lambda b, s: ranker_example(model, b, s), RANKER_INPUTS, RANKER_OUTPUTS,
                         files["ranker.onnx"], files["ranker.pt"], log)
        for k, p in files.items():
            os.replace(p, os.path.join(args.out, k))
    info = ck["train"]
    mfq, rk = contract(model, ck["vocab"], ck["context"])
    meta = {
        "format": "mmbee-v1", "version": args.version,
        "dims": {"d": c["d"], "queries": c["queries"], "graph": c["graph_dim"], "seq_len": c["seq_len"],
                 "exp_len": c["exp_len"], "context": c["context"], "heads": c["heads"]},
        "mfq": {"file": "mfq.onnx", "torchscript": "mfq.pt", **mfq},
        "ranker": {"file": "ranker.onnx", "torchscript": "ranker.pt", **rk},
        "vocab": ck["vocab"],
        "vocab_rule": "streamer_index = 1 + position in vocab; 0 = unknown streamer",
        "context": [{"name": n, "definition": CONTEXT[n]} for n in ck["context"]],
        "content": {"layout": LAYOUT, "width": WIDTH, "columns": {k: list(v) for k, v in COLS.items()},
                    "slots": {"frames": [FRAMES, FRAME], "comments": [COMMENTS, TEXT],
                              "transcripts": [TRANSCRIPTS, TEXT]},
                    "masks": "from the content line's frames, comment_tokens, transcript_tokens: the first k slots"},
        "graph": {"version": info["graph_version"], "dim": c["graph_dim"],
                  "path": os.path.relpath(info["graph"], info["root"]),
                  "method": graph_method(info["graph_meta"]), "built_from": graph_inputs(info["graph_meta"]),
                  "rule": "feed embeddings, neighbour lists and known-flags of this graph version only: "
                          "another version's embeddings are another space; retrain with it"},
        "trained_on": {"root": info["root"], "days": info["days"], "train_pairs": info["train_pairs"],
                       "train_positive_rate": info["train_positive_rate"], "val_pairs": info["val_pairs"],
                       "epochs": info["epochs"], "best_epoch": info["best_epoch"],
                       "best_val_auc": info["best_val_auc"], "seed": info["seed"], "method": info["name"],
                       "parameters": info["parameters"]},
        "check": {"tolerance": TOLERANCE, "max_diff_mfq": d1, "max_diff_ranker": d2},
        "card": card(args.metrics),
    }
    with open(os.path.join(args.out, "mmbee.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    sizes = {k: os.path.getsize(os.path.join(args.out, k)) for k in ("mfq.onnx", "mfq.pt", "ranker.onnx", "ranker.pt",
                                                                        "mmbee.json")}
    log(f"wrote {args.out}: {sizes}")


if __name__ == "__main__":
    main()
