"""Writes a faster, numerically equivalent copy of a PP-OCR ONNX model (det or rec).

    python ocr_fuse.py SRC.onnx DST.onnx

PaddleOCR's PP-OCRv4 models (as paddle2onnx exported them for rapidocr-onnxruntime 1.4.4) spell
out in elementwise nodes what ONNX Runtime could run inside its convolutions:

- hard-swish as `Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(6)`, rewritten as the ONNX
  `HardSwish` operator (opset 14, https://onnx.ai/onnx/operators/onnx__HardSwish.html), which
  ONNX Runtime fuses into the convolution before it;
- PP-LCNetV3's learnable affine blocks, `y * s + b` with scalar `s` and `b`, after
  convolutions and after activations. After a convolution they are folded into its weights and
  bias (`W * s`, `bias * s + b`). Before one they are folded into the next convolution's weights
  (`* s`, exact because zero padding stays zero) and, when that convolution has no padding,
  its bias (`+ b * sum(W)`); before a padded convolution `y * s + b` becomes `(y + b / s) * s`
  so that only the addition stays.

Every rewrite is exact in real arithmetic; in float32 results differ by rounding only. The copy
is checked against the unrewritten model with onnx's reference evaluator on a small input before
it is written, and tests/ocr_accuracy.rs compares both models through ONNX Runtime on the rendered-text
set. Anything that does not match a pattern exactly is left as it is. Prints what was rewritten.
"""

import collections
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator

# Largest difference accepted between the original's and the copy's outputs on the check input.
TOLERANCE = 1e-3


def load(src):
    model = version_converter.convert_version(onnx.load(src), 14)
    graph = model.graph
    # Constant nodes become initializers, so that weights can be read and rewritten in one place.
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


class Graph:
    def __init__(self, model):
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.stats = collections.Counter()

    def array(self, name):
        return numpy_helper.to_array(self.inits[name])

    def set(self, name, value):
        self.inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))

    def scalar(self, name):
        """The value of a one-element float initializer, else None."""
        if name not in self.inits:
            return None
        a = self.array(name)
        return float(a.reshape(-1)[0]) if a.size == 1 and a.dtype == np.float32 else None

    def links(self):
        producer = {o: n for n in self.g.node for o in n.output}
        users = collections.defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                users[i].append(n)
        for o in self.g.output:
            users[o.name].append(None)
        return producer, users

    def remove(self, drop):
        keep = [n for n in self.g.node if id(n) not in drop]
        del self.g.node[:]
        self.g.node.extend(keep)

    def conv_bias(self, conv):
        """The convolution's (weights, bias), adding a zero bias when it has none."""
        w = self.array(conv.input[1])
        if len(conv.input) < 3:
            name = conv.output[0] + ".acc_bias"
            self.g.initializer.append(numpy_helper.from_array(np.zeros(w.shape[0], np.float32), name))
            self.inits[name] = self.g.initializer[-1]
            conv.input.append(name)
        return w, self.array(conv.input[2])

    def hard_swish(self):
        producer, users = self.links()
        drop = set()
        for div in self.g.node:
            if div.op_type != "Div" or self.scalar(div.input[1]) != 6.0:
                continue
            mul = producer.get(div.input[0])
            if mul is None or mul.op_type != "Mul":
                continue
            for x, other in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
                clip = producer.get(other)
                if clip is not None and clip.op_type == "Clip":
                    break
            else:
                continue
            if len(clip.input) != 3 or self.scalar(clip.input[1]) != 0.0 or self.scalar(clip.input[2]) != 6.0:
                continue
            add = producer.get(clip.input[0])
            if add is None or add.op_type != "Add" or x not in add.input:
                continue
            three = add.input[1] if add.input[0] == x else add.input[0]
            if self.scalar(three) != 3.0 or any(len(users[n.output[0]]) != 1 for n in (add, clip, mul)):
                continue
            drop |= {id(add), id(clip), id(mul)}
            div.op_type = "HardSwish"
            del div.input[:]
            div.input.append(x)
            del div.attribute[:]
            self.stats["hard-swish"] += 1
        self.remove(drop)

    def fold_one(self):
        """Folds one scalar Mul or Add into a neighbouring convolution; False when none is left."""
        producer, users = self.links()

        def plain_conv(u, x):
            # A convolution reading x as its input, with weights of its own.
            return (u is not None and u.op_type == "Conv" and u.input[0] == x and u.input[1] in self.inits
                    and len(users[u.input[1]]) == 1 and (len(u.input) < 3 or len(users[u.input[2]]) == 1))

        def unpadded(u):
            return all(p == 0 for a in u.attribute if a.name == "pads" for p in a.ints) and not any(
                a.name == "auto_pad" and a.s not in (b"", b"NOTSET", b"VALID") for a in u.attribute)

        for n in self.g.node:
            if n.op_type not in ("Mul", "Add") or len(n.input) != 2:
                continue
            consts = [i for i in n.input if self.scalar(i) is not None]
            if len(consts) != 1 or len(users[consts[0]]) != 1:
                continue
            c = self.scalar(consts[0])
            x = n.input[1] if n.input[0] == consts[0] else n.input[0]
            conv = producer.get(x)
            if conv is not None and conv.op_type == "Conv" and len(users[x]) == 1 and plain_conv(conv, conv.input[0]):
                w, b = self.conv_bias(conv)
                if n.op_type == "Mul":
                    self.set(conv.input[1], w * c)
                    self.set(conv.input[2], b * c)
                else:
                    self.set(conv.input[2], b + c)
                conv.output[0] = n.output[0]
                self.remove({id(n)})
                self.stats[f"{n.op_type} into the convolution before"] += 1
                return True
            after = users[n.output[0]]
            if after and all(plain_conv(u, n.output[0]) for u in after):
                if n.op_type == "Add" and not all(unpadded(u) for u in after):
                    continue
                for u in after:
                    w, b = self.conv_bias(u)
                    if n.op_type == "Mul":
                        self.set(u.input[1], w * c)
                    else:
                        self.set(u.input[2], b + c * w.reshape(w.shape[0], -1).sum(axis=1))
                    u.input[0] = x
                self.remove({id(n)})
                self.stats[f"{n.op_type} into the convolution after"] += 1
                return True
            # y * s + b before padded convolutions: (y + b / s) * s, the * s into the convolutions.
            if n.op_type == "Mul" and c != 0.0 and len(after) == 1 and after[0] is not None and after[0].op_type == "Add":
                add = after[0]
                bias = [i for i in add.input if i != n.output[0]]
                if len(bias) != 1 or self.scalar(bias[0]) is None or len(users[bias[0]]) != 1:
                    continue
                convs = users[add.output[0]]
                if not convs or not all(plain_conv(u, add.output[0]) for u in convs):
                    continue
                self.set(bias[0], self.array(bias[0]) / np.float32(c))
                for u in convs:
                    self.set(u.input[1], self.array(u.input[1]) * c)
                del add.input[:]
                add.input.extend([x, bias[0]])
                self.remove({id(n)})
                self.stats["Mul moved after the Add, into the convolution"] += 1
                return True
        return False


def check(original, fused):
    """Runs both models on one small input with onnx's reference evaluator; the largest difference.

    The input looks like a line of text (dark strokes on white, a little noise), so that the
    detector answers with more than saturated zeros and the recogniser reads something.
    """
    inp = original.graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    # NCHW: batch 1, 3 channels, the model's height when fixed (rec: 48), else 64; width 64.
    n, c, h, w = 1, dims[1] or 3, dims[2] or 64, dims[3] or 64
    x = np.random.default_rng(7).uniform(0.9, 1.0, (n, c, h, w)).astype(np.float32)
    top, bottom = h * 3 // 8, h * 5 // 8
    for k in range(6):
        x[:, :, top:bottom, 6 + 9 * k:10 + 9 * k] = -1.0
    x[:, :, (top + bottom) // 2 - 1:(top + bottom) // 2 + 2, 6:w - 6] = -1.0
    a = ReferenceEvaluator(original).run(None, {inp.name: x})
    b = ReferenceEvaluator(fused).run(None, {inp.name: x})
    return max(float(np.max(np.abs(p - q))) for p, q in zip(a, b))


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: ocr_fuse.py SRC.onnx DST.onnx")
    src, dst = sys.argv[1:]
    # The reference: the same model at opset 14, before any rewrite (onnx's reference evaluator
    # and ONNX Runtime disagree on the opset-12 original, not on this).
    original = load(src)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = Graph(model)
    graph.hard_swish()
    while graph.fold_one():
        pass
    onnx.checker.check_model(model)
    diff = check(original, model)
    if not diff <= TOLERANCE:
        sys.exit(f"ocr_fuse.py: {dst} would differ from {src} by {diff} (more than {TOLERANCE}); not written")
    onnx.save(model, dst + ".part")
    os.replace(dst + ".part", dst)
    done = ", ".join(f"{k}: {v}" for k, v in sorted(graph.stats.items())) or "nothing matched"
    print(f"ocr_fuse.py: {os.path.basename(dst)}: {done}; largest output difference {diff:.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
