#!/usr/bin/env bash
# A Python venv with pinned onnx and numpy under .cache/onnx-venv, for the scripts that write or
# rewrite ONNX models (scripts/tiny_models.py, scripts/ocr_fuse.py). Idempotent: made once, and
# remade only when the pins change. Prints the venv's python on the last line.
set -euo pipefail

ONNX_VERSION="1.23.2"
NUMPY_VERSION="2.4.6"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"
venv="$root/.cache/onnx-venv"

venv_pin onnx-venv.sh "$venv" onnx,numpy "onnx==$ONNX_VERSION" "numpy==$NUMPY_VERSION" || exit 1

echo "$venv/bin/python"
