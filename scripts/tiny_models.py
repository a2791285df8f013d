#!/usr/bin/env python3
"""Writes the tiny ONNX models and reference outputs that tests/clip.rs (and the custom safety
classifier tests) use, into the directory given as the only argument (scripts/tiny-models.sh
passes .cache/tiny-models). Needs the `onnx` and `numpy` packages (scripts/tiny-models.sh makes a
venv with pinned versions). Deterministic: the weights come from a seeded generator, so every run
writes the same models and the same reference.json.

No real CLIP weights ship in any package registry, so the CLIP tests run on a stand-in with the
same input/output contract as the real ONNX exports (separate vision and text encoders):

  clip_image.onnx  pixel_values float32 [1,3,32,32]  ->  image_embeds float32 [1,8]
                   per-channel mean over the image, then MatMul by a fixed [3,8] matrix plus a
                   fixed [8] bias.
  clip_text.onnx   input_ids int64 [1,77]  ->  text_embeds float32 [1,8]
                   ids modulo 512, Gather from a fixed [512,8] table, mean over the 77 positions
                   (zero padding included; row 0 of the table is all zeros).
  classifier.onnx  input float32 [1,3,16,16]  ->  logits float32 [1,3]
                   GlobalAveragePool then logits = 8 * [B, G, R] - 4 on the per-channel means,
                   so with mean 0 / std 1 normalisation (RGB scaled to 0..1) labels are
                   0 = "blue", 1 = "green", 2 = "red": a solid red image gives [-4, -4, 4],
                   a solid blue one [4, -4, -4], a solid green one [-4, 4, -4].

The test images (32x32 PNGs, so the CLIP model needs no resize) and reference.json are written
beside the models. reference.json holds, computed here with numpy from the same weights and the
same preprocessing (RGB / 255, then (x - mean) / std with CLIP's mean and std):
  - per image: the image embedding;
  - per token-id list (77 ids, zero padded): the text embedding;
  - per (image, id list): the cosine similarity;
  - per image: the classifier's logits (mean 0, std 1 normalisation).
"""

import json
import os
import struct
import sys
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20261125
EMBED = 8
TABLE = 512
CONTEXT = 77
CLIP_SIZE = 32
CLASSIFIER_SIZE = 16
OPSET = 17
IR_VERSION = 8
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CLASSIFIER_LABELS = ["blue", "green", "red"]
# logits[j] = sum over channels c (R, G, B) of means[c] * CLASSIFIER_W[c, j], plus CLASSIFIER_B[j]
CLASSIFIER_W = np.array([[0, 0, 8], [0, 8, 0], [8, 0, 0]], dtype=np.float32)  # rows R, G, B
CLASSIFIER_B = np.array([-4, -4, -4], dtype=np.float32)

# Token ids as the OpenAI CLIP tokenizer gives them (start 49406, end 49407); "hi there" is the
# example in instant-clip-tokenizer's documentation.
TOKEN_LISTS = {
    "hi there": [49406, 1883, 997, 49407],
    "hi": [49406, 1883, 49407],
    "ids-1-2-3": [49406, 1, 2, 3, 49407],
}


def weights():
    rng = np.random.default_rng(SEED)
    w_img = rng.standard_normal((3, EMBED)).astype(np.float32)
    b_img = rng.standard_normal((EMBED,)).astype(np.float32) * np.float32(0.1)
    table = rng.standard_normal((TABLE, EMBED)).astype(np.float32)
    table[0] = 0.0  # the padding id adds nothing, so prompts stay apart
    return w_img, b_img, table


def save(model, path):
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    tmp = path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)


def image_model(w_img, b_img):
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, CLIP_SIZE, CLIP_SIZE])
    y = helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [1, EMBED])
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["image_embeds"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_clip_image", [x], [y],
        initializer=[numpy_helper.from_array(w_img, "w"), numpy_helper.from_array(b_img, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="acc-tiny-models")


def text_model(table):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, CONTEXT])
    y = helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, [1, EMBED])
    nodes = [
        helper.make_node("Mod", ["input_ids", "table_rows"], ["rows"], fmod=0),
        helper.make_node("Gather", ["table", "rows"], ["gathered"], axis=0),
        helper.make_node("ReduceMean", ["gathered"], ["text_embeds"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny_clip_text", [x], [y],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array(TABLE, dtype=np.int64), "table_rows"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="acc-tiny-models")


def classifier_model():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier", [x], [y],
        initializer=[numpy_helper.from_array(CLASSIFIER_W, "w"), numpy_helper.from_array(CLASSIFIER_B, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="acc-tiny-models")


def images():
    """32x32 RGB uint8 test images by file name."""
    n = CLIP_SIZE
    red = np.zeros((n, n, 3), dtype=np.uint8)
    red[:, :, 0] = 255
    blue = np.zeros((n, n, 3), dtype=np.uint8)
    blue[:, :, 2] = 255
    ys, xs = np.mgrid[0:n, 0:n]
    gradient = np.stack([xs * 8, ys * 8, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    return {"red.png": red, "blue.png": blue, "gradient.png": gradient}


def write_png(path, rgb):
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def preprocess(rgb, mean, std):
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - mean) / std
    return x.transpose(2, 0, 1)[None]  # [1,3,H,W]


def image_embedding(rgb, w_img, b_img):
    x = preprocess(rgb, MEAN, STD)
    return x.mean(axis=(2, 3)) @ w_img + b_img


def padded(ids):
    return ids + [0] * (CONTEXT - len(ids))


def text_embedding(ids, table):
    rows = np.array(padded(ids), dtype=np.int64) % TABLE
    return table[rows].mean(axis=0)


def cosine(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    w_img, b_img, table = weights()
    save(image_model(w_img, b_img), os.path.join(out, "clip_image.onnx"))
    save(text_model(table), os.path.join(out, "clip_text.onnx"))
    save(classifier_model(), os.path.join(out, "classifier.onnx"))

    imgs = images()
    ref = {
        "input_size": CLIP_SIZE,
        "context_length": CONTEXT,
        "mean": MEAN.tolist(),
        "std": STD.tolist(),
        "images": [],
        "texts": [],
        "similarities": [],
        "classifier": {
            "model": "classifier.onnx",
            "input": "input",
            "output": "logits",
            "input_size": CLASSIFIER_SIZE,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "labels": CLASSIFIER_LABELS,
            "images": [],
        },
    }
    embeds = {}
    for name, rgb in imgs.items():
        write_png(os.path.join(out, name), rgb)
        e = image_embedding(rgb, w_img, b_img)[0]
        embeds[name] = e
        ref["images"].append({"file": name, "image_embeds": [float(v) for v in e]})
        pooled = (rgb.astype(np.float32) / np.float32(255.0)).reshape(-1, 3).mean(axis=0)
        logits = pooled @ CLASSIFIER_W + CLASSIFIER_B
        ref["classifier"]["images"].append({"file": name, "logits": [float(v) for v in logits]})
    for text, ids in TOKEN_LISTS.items():
        t = text_embedding(ids, table)
        ref["texts"].append({"text": text, "input_ids": padded(ids), "text_embeds": [float(v) for v in t]})
        for name in imgs:
            ref["similarities"].append({"image": name, "text": text, "cosine": cosine(embeds[name], t)})
    tmp = os.path.join(out, "reference.json.tmp")
    with open(tmp, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "reference.json"))


if __name__ == "__main__":
    main()
