#!/usr/bin/env bash
# A Python venv with pinned onnx, numpy, onnxruntime and Pillow under .cache/onnx-venv, for the
# scripts that write or rewrite ONNX models (scripts/tiny_models.py, scripts/ocr_fuse.py,
# scripts/ocr_quantize.py: its quantizer and calibration pictures). Idempotent: made once, and
# remade only when the pins change. Prints the venv's python on the last line.
set -euo pipefail

ONNX_VERSION="1.23.2"
NUMPY_VERSION="2.4.6"
# The same release as the runtime library scripts/setup-onnx.sh fetches.
ORT_VERSION="1.31.1"
PILLOW_VERSION="11.3.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"
venv="$root/.cache/onnx-venv"

venv_pin onnx-venv.sh "$venv" onnx,numpy,onnxruntime,PIL "onnx==$ONNX_VERSION" "numpy==$NUMPY_VERSION" \
    "onnxruntime==$ORT_VERSION" "Pillow==$PILLOW_VERSION" || exit 1

echo "$venv/bin/python"
