"""Writes an 8-bit (int8) copy of a PP-OCR ONNX model (det or rec) for faster OCR on CPUs.

    python ocr_quantize.py det|rec SRC.onnx DST.onnx

ONNX Runtime's static quantization (`onnxruntime.quantization.quantize_static`, QDQ format:
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html): weights as signed
integers with one scale per output channel, activations as unsigned 8-bit integers with one scale
per tensor, those scales taken from the smallest and largest value each tensor takes on a
calibration set (MinMax). ONNX Runtime then runs the convolutions and matrix products in integer
arithmetic, about a third less CPU for both models than float32. The weights use 7 of their 8
bits (`reduce_range`): on x86 CPUs without VNNI, ONNX Runtime multiplies uint8 by int8 in pairs
summed into 16 bits, which full-range weights can overflow (saturate); with 7-bit weights no sum
can, so every x86 CPU computes the same results as a VNNI one (ONNX Runtime's advice for models
that run on CPUs without VNNI).

Unlike scripts/ocr_fuse.py's rewrites this is not exact: every activation is rounded to one of
256 levels. So the calibration set is made here, deterministically (fixed seeds), and never from
what the tests read: pictures drawn with Pillow's built-in font (Aileron, not one of the DejaVu
fonts of the rendered test set, scripts/ocr-testimages.sh) in random sizes, colours and
backgrounds, with and without text, prepared exactly as the gateway prepares its inputs
(gateway/src/eval/ocr.rs: B, G, R planes, `(v / 255 - 0.5) / 0.5`; the detector's input at most
416 px on its longer side in multiples of 32, the recogniser's 48 px high).

Before the copy is written it is checked against SRC on a second set drawn the same way with
other seeds: the detector's text map, binarized at the gateway's threshold (0.3), must agree on
at least 99% of pixels, and the recogniser's greedy readings of the drawn lines (spaces left out)
may have at most 1% fewer characters right than the float model's. Otherwise nothing is written and the script exits 1. tests/ocr_accuracy.rs then checks
that the gateway reads the rendered-text set with the copies as accurately as with the float
models. Prints what it measured.
"""

import logging
import os
import random
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image, ImageDraw, ImageFont

# The quantizer's and the runtime's notes (unused initializers, per-tensor fallbacks) are not
# errors; errors still show.
logging.getLogger().setLevel(logging.ERROR)
ort.set_default_logger_severity(3)

DET_SIDE = 416
REC_HEIGHT = 48
DET_THRESH = 0.3
# Least agreement of the copy with SRC on the check set (see the docstring).
DET_MIN_AGREEMENT = 0.99
# Most character accuracy the recogniser's copy may lose on the check set's drawn lines.
REC_MAX_LOSS = 0.01

WORDS = (
    "open sale exit 24h Metro cafe ZEBRA quartz harbor 2047 delta Bakery north WAY fresh -50% "
    "hotel No. 9 river park Jumping fox lazy dog MENU today's special $4.99 gate B12 welcome "
    "Kiosk PIZZA taxi Sunrise winter 7:30 pm LOTUS east @home #1 brand new street EXPRESS"
).split()


def colour(rng):
    return tuple(rng.randrange(256) for _ in range(3))


def contrasting(rng, bg):
    # Text a reader can see: far from the background in brightness.
    while True:
        c = colour(rng)
        if abs(sum(c) - sum(bg)) > 180:
            return c


def phrase(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 4)))


def background(rng, size):
    w, h = size
    kind = rng.randrange(3)
    if kind == 0:
        return Image.new("RGB", size, colour(rng))
    if kind == 1:
        a, b = np.array(colour(rng), np.float32), np.array(colour(rng), np.float32)
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        grad = np.broadcast_to(a + (b - a) * t, (h, w, 3))
        return Image.fromarray(grad.astype(np.uint8))
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize(size, Image.BILINEAR)


def scene(rng, size=(1024, 1024)):
    """A picture with shapes and zero to three lines of text."""
    img = background(rng, size)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randrange(0, 10)):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        box = [x, y, x + rng.randrange(10, 400), y + rng.randrange(10, 400)]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour(rng))
    for _ in range(rng.randrange(0, 4)):
        font = ImageFont.load_default(rng.randrange(20, 90))
        x, y = rng.randrange(0, size[0] // 2), rng.randrange(0, size[1] - 100)
        area = img.crop((x, y, x + 8, y + 8)).resize((1, 1)).getpixel((0, 0))
        d.text((x, y), phrase(rng), font=font, fill=contrasting(rng, area))
    return img


def line(rng):
    """A crop around one line of text, as the detector's boxes give them (a margin around it),
    and the text."""
    font = ImageFont.load_default(rng.randrange(16, 80))
    text = phrase(rng)
    left, top, right, bottom = font.getbbox(text)
    mx, my = rng.randrange(2, 16), rng.randrange(2, 12)
    img = background(rng, (right - left + 2 * mx, bottom - top + 2 * my))
    bg = img.resize((1, 1)).getpixel((0, 0))
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=contrasting(rng, bg))
    return img, text


def planes(img):
    a = np.asarray(img.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    a = (a / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


def det_input(img):
    w, h = img.size
    s = min(1.0, DET_SIDE / max(w, h))
    nw, nh = max(32, round(w * s / 32) * 32), max(32, round(h * s / 32) * 32)
    return planes(img.resize((nw, nh), Image.BILINEAR))


def rec_input(img):
    w, h = img.size
    return planes(img.resize((max(1, int(np.ceil(REC_HEIGHT * w / h))), REC_HEIGHT), Image.BILINEAR))


def inputs(kind, seed, count):
    rng = random.Random(seed)
    if kind == "det":
        sizes = [(1024, 1024), (768, 768), (1536, 1024), (512, 512)]
        return [(det_input(scene(rng, sizes[i % len(sizes)])), None) for i in range(count)]
    lines = [line(rng) for _ in range(count)]
    return [(rec_input(img), text) for img, text in lines]


class Reader(CalibrationDataReader):
    def __init__(self, name, items):
        self.name, self.items = name, iter(items)

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {self.name: x[0]}


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def greedy(y, charset):
    """The recogniser's greedy CTC reading of output `y` `[1, T, classes]`, spaces left out."""
    out, prev = [], 0
    for i in y.argmax(-1)[0]:
        if i != prev and i != 0 and i <= len(charset):
            out.append(charset[i - 1])
        prev = i
    return "".join(out).replace(" ", "")


def edits(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a):
        diag, row[0] = row[0], i + 1
        for j, cb in enumerate(b):
            diag, row[j + 1] = row[j + 1], min(diag + (ca != cb), row[j] + 1, row[j + 1] + 1)
    return row[-1]


def det_agreement(src, dst, check):
    """The share of text-map pixels on the same side of the threshold in both detectors."""
    a, b = session(src), session(dst)
    name = a.get_inputs()[0].name
    same = total = 0
    for x, _ in check:
        ya, yb = a.run(None, {name: x})[0], b.run(None, {name: x})[0]
        same += int(np.sum((ya > DET_THRESH) == (yb > DET_THRESH)))
        total += ya.size
    return same / total


def rec_accuracy(src, dst, check):
    """(float accuracy, copy accuracy): characters read right against the drawn lines' text."""
    a, b = session(src), session(dst)
    name = a.get_inputs()[0].name
    charset = a.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]
    wrong = [0, 0]
    total = 0
    for x, text in check:
        want = text.replace(" ", "")
        total += len(want)
        for k, s in enumerate((a, b)):
            wrong[k] += edits(greedy(s.run(None, {name: x})[0], charset), want)
    return 1 - wrong[0] / total, 1 - wrong[1] / total


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("det", "rec"):
        sys.exit(__doc__)
    kind, src, dst = sys.argv[1:]
    name = session(src).get_inputs()[0].name
    calibration = inputs(kind, 1, 48 if kind == "det" else 160)
    check = inputs(kind, 2, 12 if kind == "det" else 60)
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        out = os.path.join(tmp, "int8.onnx")
        # Shape inference and constant folding first, as the quantizer's documentation asks.
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(
            pre,
            out,
            Reader(name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        base = os.path.basename(dst)
        if kind == "det":
            got = det_agreement(src, out, check)
            print(f"ocr_quantize.py: {base}: {got:.2%} of text-map pixels as the float model's (need {DET_MIN_AGREEMENT:.0%})")
            if got < DET_MIN_AGREEMENT:
                sys.exit(f"ocr_quantize.py: {base} not written: {got:.2%} of text-map pixels as the float model's")
        else:
            want, got = rec_accuracy(src, out, check)
            print(f"ocr_quantize.py: {base}: {got:.2%} of characters read right ({want:.2%} by the float model; need at most {REC_MAX_LOSS:.1%} less)")
            if got < want - REC_MAX_LOSS:
                sys.exit(f"ocr_quantize.py: {base} not written: {got:.2%} of characters read right against {want:.2%}")
        os.replace(out, dst)


if __name__ == "__main__":
    main()
