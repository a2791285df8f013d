#!/usr/bin/env bash
# Renders the OCR accuracy test images (idempotent): PNGs with known strings in several fonts and
# sizes, plus manifest.json listing each image's expected text lines, into .cache/ocr-testimages/.
#
# Fonts: the DejaVu TTFs bundled in the PyPI wheel matplotlib==$MPL_VERSION (DejaVu licence: a
# free Bitstream Vera derivative), downloaded with pip (not installed) and unpacked into
# .cache/ocr-testimages/fonts/. Rendering uses Pillow==$PILLOW_VERSION in the venv
# .cache/ocr-venv. Nothing here is committed. Prints the output directory on the last line.
# Used by tests/ocr_accuracy.rs (which also needs scripts/setup-onnx.sh for the models).
set -euo pipefail

PILLOW_VERSION="11.3.0"
MPL_VERSION="3.10.3"
# Bump when the rendered set changes, so that an older set is re-rendered.
SET_VERSION="3"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.cache/ocr-testimages"
venv="$root/.cache/ocr-venv"
py="$venv/bin/python"
# shellcheck source=lib/install.sh
source "$root/scripts/lib/install.sh"

mkdir -p "$out"
# fd 7: venv_pin takes fd 9 for the venv's own lock.
exec 7>"$out/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 7
fi

if [ -f "$out/manifest.json" ] && [ "$(cat "$out/.set-version" 2>/dev/null)" = "$SET_VERSION" ]; then
    echo "$out"
    exit 0
fi

venv_pin ocr-testimages.sh "$venv" PIL "Pillow==$PILLOW_VERSION" || exit 1

fonts="$out/fonts"
if ! ls "$fonts"/DejaVuSans.ttf >/dev/null 2>&1; then
    wheels="$out/wheels"
    mkdir -p "$wheels" "$fonts"
    if ! ls "$wheels"/matplotlib-"$MPL_VERSION"-*.whl >/dev/null 2>&1; then
        echo "ocr-testimages.sh: downloading the matplotlib==$MPL_VERSION wheel for its DejaVu fonts" >&2
        "$py" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --platform manylinux_2_17_x86_64 "matplotlib==$MPL_VERSION" -d "$wheels" >&2
    fi
    "$py" - "$fonts" "$wheels"/matplotlib-"$MPL_VERSION"-*.whl <<'PYEOF'
import os, sys, zipfile
dest, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("matplotlib/mpl-data/fonts/ttf/DejaVu") and name.endswith(".ttf"):
            with open(os.path.join(dest, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PYEOF
fi

"$py" "$root/scripts/ocr_testimages.py" "$fonts" "$out"
echo "$SET_VERSION" > "$out/.set-version"
echo "$out"
