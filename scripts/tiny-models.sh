#!/usr/bin/env bash
# Writes the tiny ONNX models the tests use (no real CLIP weights ship in any package registry):
# .cache/tiny-models/{clip_image,clip_text,classifier}.onnx, 32x32 test PNGs and reference.json
# (expected outputs computed with numpy). See scripts/tiny_models.py for the exact models.
# Idempotent: a venv with pinned onnx and numpy is made once under .cache/tiny-venv, and the
# models are rewritten only when missing or when scripts/tiny_models.py has changed.
# Prints the models directory on the last line.
set -euo pipefail

ONNX_VERSION="1.23.2"
NUMPY_VERSION="2.4.6"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/tiny-venv"
py="$venv/bin/python"
out="$root/.cache/tiny-models"
gen="$root/scripts/tiny_models.py"

if ! command -v python3 >/dev/null 2>&1; then
    echo "tiny-models.sh: python3 is not installed (apt-get install python3 python3-venv)" >&2
    exit 1
fi

mkdir -p "$root/.cache"
exec 9>"$root/.cache/tiny-models.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

ready() {
    [ -x "$py" ] && "$py" - "$ONNX_VERSION" "$NUMPY_VERSION" >/dev/null 2>&1 <<'PYEOF'
import sys
import numpy, onnx
sys.exit(0 if (onnx.__version__, numpy.__version__) == (sys.argv[1], sys.argv[2]) else 1)
PYEOF
}

if ! ready; then
    echo "tiny-models.sh: setting up $venv (onnx==$ONNX_VERSION numpy==$NUMPY_VERSION)" >&2
    if [ ! -x "$py" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv" >&2 || {
            echo "tiny-models.sh: 'python3 -m venv' failed; install the venv module (apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    "$py" -m pip install --disable-pip-version-check --quiet "onnx==$ONNX_VERSION" "numpy==$NUMPY_VERSION" >&2
    if ! ready; then
        echo "tiny-models.sh: onnx==$ONNX_VERSION / numpy==$NUMPY_VERSION still not importable from $py" >&2
        exit 1
    fi
fi

# The generator's hash and the pinned versions, recorded after a complete run.
stamp="$(sha256sum "$gen" | cut -d' ' -f1) onnx==$ONNX_VERSION numpy==$NUMPY_VERSION"
complete=1
for f in clip_image.onnx clip_text.onnx classifier.onnx reference.json red.png blue.png gradient.png; do
    [ -f "$out/$f" ] || complete=0
done
if [ "$complete" = 0 ] || [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "tiny-models.sh: writing $out" >&2
    mkdir -p "$out"
    rm -f "$out/.stamp"
    "$py" "$gen" "$out"
    echo "$stamp" >"$out/.stamp"
fi

echo "$out"
