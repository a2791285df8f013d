#!/usr/bin/env bash
# Writes the tiny ONNX models the tests use (no real CLIP weights ship in any package registry):
# .cache/tiny-models/{clip_image,clip_text,classifier}.onnx, 32x32 test PNGs and reference.json
# (expected outputs computed with numpy). See scripts/tiny_models.py for the exact models.
# Idempotent: the pinned onnx/numpy venv comes from scripts/onnx-venv.sh, and the models are
# rewritten only when missing or when scripts/tiny_models.py or the pins have changed.
# Prints the models directory on the last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.cache/tiny-models"
gen="$root/scripts/tiny_models.py"

# The pinned onnx/numpy venv's python.
py="$("$root/scripts/onnx-venv.sh" | tail -n 1)"

mkdir -p "$root/.cache"
exec 9>"$root/.cache/tiny-models.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

# The generator's and the venv script's (its pins) hashes, recorded after a complete run.
stamp="$(cat "$gen" "$root/scripts/onnx-venv.sh" | sha256sum | cut -d' ' -f1)"
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
