"""Exports a trained checkpoint as the engine's online step model.

    python export.py --checkpoint CKPT --out DIR (--metrics metrics.json | --val DIR...) [--version 1]

Writes DIR/model.onnx (opset 17), DIR/model.pt (TorchScript, traced) and
DIR/highlight.json (window, dims, input/output names and shapes, hysteresis thresholds).
The step scores the newest tick of each room from cached histories (see model.Step).
Thresholds come from evaluate.py's metrics.json (the checkpoint's method) or are
calibrated here on the --val rooms the same way.

Checks before anything is written: the step reproduces the full-sequence forward on every
position of a random room (logits within 1e-4, including the first n-1 ticks); the ONNX
file passes onnx.checker and, run by onnx's reference evaluator (numpy), gives the torch
step's outputs; the TorchScript module does too, at other batch sizes than it was
traced with.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import D, Step, set_threads  # noqa: E402
from train import load_checkpoint  # noqa: E402

TOLERANCE = 1e-4


def example(model, batch, seed):
    """Step inputs for `batch` rooms: rows drawn around the training mean, random histories,
    the first room with only 2 past ticks."""
    g = torch.Generator().manual_seed(seed)
    n, h = model.window, model.hidden
    x = model.mean + model.std * torch.randn(batch, D, generator=g)
    streamer = model.mean + 0.3 * model.std * torch.randn(batch, D, generator=g)
    valid = torch.ones(batch, n - 1)
    valid[0, : n - 3] = 0.0
    hist = [torch.randn(batch, n - 1, k, generator=g) for k in (h, 2 * h, h)]
    for t in hist:
        t[valid == 0] = 0.0
    return (x, streamer, *hist, valid)


def max_diff(a, b):
    return max(float(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max()) for u, v in zip(a, b))


def check_step_matches_full(model, length):
    step, n, h = Step(model), model.window, model.hidden
    g = torch.Generator().manual_seed(7)
    x = model.mean + model.std * torch.randn(length, D, generator=g)
    m = (torch.cumsum(x.double(), 0) / torch.arange(1, length + 1).unsqueeze(1)).float()
    with torch.no_grad():
        full = model(x.unsqueeze(0), m.unsqueeze(0), torch.ones(1, length))["logit"][0]
        hist = [torch.zeros(1, n - 1, k) for k in (h, 2 * h, h)]
        valid = torch.zeros(1, n - 1)
        worst = 0.0
        for t in range(length):
            _, logit, z, e, p = step(x[t:t + 1], m[t:t + 1], *hist, valid)
            worst = max(worst, abs(logit.item() - full[t].item()))
            hist = [torch.cat([hh[:, 1:], new.unsqueeze(1)], 1) for hh, new in zip(hist, (z, e, p))]
            valid = torch.cat([valid[:, 1:], torch.ones(1, 1)], 1)
    if worst >= TOLERANCE:
        sys.exit(f"export: step differs from the full forward by {worst}")
    return worst


def thresholds(args, model, name):
    if args.metrics:
        with open(args.metrics) as f:
            return json.load(f)["methods"][name]["threshold"], os.path.basename(args.metrics)
    from data import load_dirs
    from evaluate import calibrate, model_scores
    val = load_dirs(args.val)
    th, _ = calibrate(val, [model_scores(model, r) for r in val])
    return th, [os.path.basename(d) for d in args.val]


def card(args, name):
    """The model card's held-out figures for this method (from --metrics), which the
    engine's integration test holds the live events to."""
    if not args.metrics:
        return None
    with open(args.metrics) as f:
        m = json.load(f)
    r = m["methods"][name]
    return {"test_rooms": m["test_rooms"], "test_ticks": m["test_ticks"], "iou": m["iou"],
            "frame": {"auc": r["auc"], "ndcg10": r["ndcg10"], "ap": r["ap"]},
            "event": {"precision": r["precision"], "recall": r["recall"], "f1": r["f1"],
                      "predicted": r["events_predicted"], "true": r["events_true"]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", help="evaluate.py's metrics.json: take this checkpoint's calibrated thresholds")
    ap.add_argument("--val", nargs="+", help="calibrate the thresholds on these directories' rooms")
    ap.add_argument("--version", type=int, default=1)
    args = ap.parse_args()
    if not args.metrics and not args.val:
        ap.error("one of --metrics or --val is needed for the thresholds")
    set_threads()
    import onnx
    from onnx.reference import ReferenceEvaluator

    model, ck = load_checkpoint(args.checkpoint)
    step = Step(model).eval()
    n, dims = model.window, model.dims
    log = lambda s: print(f"export: {s}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"step == full forward: max |logit diff| {check_step_matches_full(model, 3 * n + 5):.2e}")

    os.makedirs(args.out, exist_ok=True)
    names_in, names_out = Step.INPUTS, Step.OUTPUTS
    ex = example(model, 3, 0)
    with torch.no_grad():
        want = {b: [o.numpy() for o in step(*example(model, b, b))] for b in (1, 2, 5)}

    with tempfile.TemporaryDirectory() as tmp:
        onnx_tmp = os.path.join(tmp, "model.onnx")
        torch.onnx.export(step, ex, onnx_tmp, input_names=names_in, output_names=names_out,
                          dynamic_axes={k: {0: "batch"} for k in names_in + names_out},
                          opset_version=17, do_constant_folding=True, dynamo=False)
        graph = onnx.load(onnx_tmp)
        onnx.checker.check_model(graph, full_check=True)
        got_in = [i.name for i in graph.graph.input]
        got_out = [o.name for o in graph.graph.output]
        if got_in != names_in or got_out != names_out:
            sys.exit(f"export: ONNX names {got_in} -> {got_out}, want {names_in} -> {names_out}")
        ref = ReferenceEvaluator(graph)
        for b, outs in want.items():
            feeds = {k: v.numpy() for k, v in zip(names_in, example(model, b, b))}
            d = max_diff(ref.run(None, feeds), outs)
            if d >= TOLERANCE:
                sys.exit(f"export: ONNX (reference evaluator) differs from torch by {d} at batch {b}")
            log(f"onnx (reference evaluator), batch {b}: max |diff| {d:.2e}")

        traced = torch.jit.trace(step, ex, check_trace=False)
        pt_tmp = os.path.join(tmp, "model.pt")
        torch.jit.save(traced, pt_tmp)
        loaded = torch.jit.load(pt_tmp)
        for b, outs in want.items():
            with torch.no_grad():
                d = max_diff([o.numpy() for o in loaded(*example(model, b, b))], outs)
            if d >= TOLERANCE:
                sys.exit(f"export: TorchScript differs from torch by {d} at batch {b}")
            log(f"torchscript, batch {b}: max |diff| {d:.2e}")

        th, source = thresholds(args, model, ck["train"]["name"])
        shapes = {"x": ["batch", D], "streamer": ["batch", D], "z_hist": ["batch", n - 1, dims["z"]],
                  "e_hist": ["batch", n - 1, dims["e"]], "p_hist": ["batch", n - 1, dims["p"]],
                  "valid": ["batch", n - 1], "score": ["batch"], "logit": ["batch"],
                  "z": ["batch", dims["z"]], "e": ["batch", dims["e"]], "p": ["batch", dims["p"]]}
        info = ck["train"]
        meta = {
            "window": n, "dims": dims, "inputs": names_in, "outputs": names_out, "shapes": shapes,
            "threshold": {"enter": float(th["enter"]), "exit": float(th["exit"]),
                          "hold_ticks": int(th["hold_ticks"]), "min_ticks": int(th["min_ticks"])},
            "calibration": "global",
            "calibrated_on": source,
            "card": card(args, ck["train"]["name"]),
            "trained_on": {"data": [os.path.basename(d) for d in info["data"]],
                           "val": [os.path.basename(d) for d in info["val"]],
                           "rooms": info["train_rooms"], "ticks": info["train_ticks"], "epochs": info["epochs"],
                           "best_epoch": info["best_epoch"], "seed": info["seed"], "method": info["name"]},
            "version": args.version,
            "model": {**model.config(), "parameters": info["parameters"]},
            "streamer": "mean of the room's raw rows over its ticks so far, this one included "
                        "(sum in float64; at the room's first tick: that row)",
            "valid": "1.0 where a history slot holds one of the room's previous n-1 ticks; empty "
                     "slots are at the front, zero-filled; a gap in the room's ticks empties the history",
        }
        os.replace(onnx_tmp, os.path.join(args.out, "model.onnx"))
        os.replace(pt_tmp, os.path.join(args.out, "model.pt"))
    with open(os.path.join(args.out, "highlight.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    sizes = {k: os.path.getsize(os.path.join(args.out, k)) for k in ("model.onnx", "model.pt", "highlight.json")}
    log(f"wrote {args.out}: {sizes}")


if __name__ == "__main__":
    main()
