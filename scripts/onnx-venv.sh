#!/usr/bin/env bash
# A Python venv with pinned onnx and numpy under .cache/onnx-venv, for the scripts that write or
# rewrite ONNX models (scripts/tiny_models.py, scripts/ocr_fuse.py). Idempotent: made once, and
# remade only when the pins change. Prints the venv's python on the last line.
set -euo pipefail

ONNX_VERSION="1.23.2"
NUMPY_VERSION="2.4.6"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/onnx-venv"
py="$venv/bin/python"

if ! command -v python3 >/dev/null 2>&1; then
    echo "onnx-venv.sh: python3 is not installed (apt-get install python3 python3-venv)" >&2
    exit 1
fi

mkdir -p "$root/.cache"
exec 9>"$root/.cache/onnx-venv.lock"
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
    echo "onnx-venv.sh: setting up $venv (onnx==$ONNX_VERSION numpy==$NUMPY_VERSION)" >&2
    # Made afresh: a venv that is there but not ready (other pins, a broken interpreter or an
    # interrupted install) is not repaired in place.
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || {
        echo "onnx-venv.sh: 'python3 -m venv' failed; install the venv module (apt-get install python3-venv)" >&2
        exit 1
    }
    "$py" -m pip install --disable-pip-version-check --quiet "onnx==$ONNX_VERSION" "numpy==$NUMPY_VERSION" >&2
    if ! ready; then
        echo "onnx-venv.sh: onnx==$ONNX_VERSION / numpy==$NUMPY_VERSION still not importable from $py" >&2
        exit 1
    fi
fi

echo "$py"
