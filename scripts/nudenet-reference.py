#!/usr/bin/env python3
"""Writes the reference detections of the real Python NudeNet package, for the Rust parity test.

    python3 scripts/nudenet-reference.py

1. makes (once) a virtual environment .cache/nudenet-venv with the pinned packages below,
   installed from PyPI (nudenet 3.4.2 and what it needs: onnxruntime, opencv-python-headless,
   numpy), and re-runs itself there;
2. runs scripts/fetch-testimages.sh (test images into .cache/testimages/, SHA-256 checked);
3. runs `nudenet.NudeDetector().detect(path)` (the package's own bundled 320n.onnx) on each
   image and writes tests/fixtures/nudenet/<image>.json: the image's SHA-256 and size, the
   package versions, the model's SHA-256, and the detections exactly as the package returns
   them (class, score, box = [x, y, width, height] truncated to integers).

The fixtures are committed; the images, the model and the venv are not.
"""
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".cache", "nudenet-venv")
PINS = [
    "nudenet==3.4.2",
    "onnxruntime==1.31.1",
    "opencv-python-headless==5.0.0.93",
    "numpy==2.4.6",
]
IMAGES = [
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "color.png",
    "synthetic-grey-640x360.png",
    "synthetic-gradient-300x500.png",
]
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "nudenet")


def venv_python():
    return os.path.join(VENV, "bin", "python")


def ensure_venv():
    py = venv_python()
    check = "import importlib.metadata as m, sys; pins = sys.argv[1:]; " \
            "sys.exit(0 if all(m.version(p.split('==')[0]) == p.split('==')[1] for p in pins) else 1)"
    if os.path.exists(py) and subprocess.call([py, "-c", check, *PINS], stderr=subprocess.DEVNULL) == 0:
        return py
    print(f"nudenet-reference.py: setting up {VENV} ({', '.join(PINS)})", file=sys.stderr)
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    subprocess.check_call([py, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *PINS])
    return py


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    if os.path.realpath(sys.prefix) != os.path.realpath(VENV):
        py = ensure_venv()
        os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])

    images_dir = subprocess.check_output([os.path.join(ROOT, "scripts", "fetch-testimages.sh")], text=True).strip().splitlines()[-1]

    import importlib.metadata as metadata

    import cv2
    import nudenet
    from nudenet import NudeDetector

    model = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
    detector = NudeDetector()
    versions = {p.split("==")[0]: metadata.version(p.split("==")[0]) for p in PINS}
    os.makedirs(OUT_DIR, exist_ok=True)
    for name in IMAGES:
        path = os.path.join(images_dir, name)
        mat = cv2.imread(path)
        detections = detector.detect(path)
        record = {
            "image": name,
            "image_sha256": sha256_file(path),
            "width": int(mat.shape[1]),
            "height": int(mat.shape[0]),
            "model_sha256": sha256_file(model),
            "packages": versions,
            "detections": [
                {"class": d["class"], "score": round(float(d["score"]), 6), "box": [int(v) for v in d["box"]]}
                for d in detections
            ],
        }
        out = os.path.join(OUT_DIR, os.path.splitext(name)[0] + ".json")
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        summary = ", ".join(f"{d['class']} {d['score']:.3f} {d['box']}" for d in record["detections"]) or "none"
        print(f"{name}: {summary}")


if __name__ == "__main__":
    main()
